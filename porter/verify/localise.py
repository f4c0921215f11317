"""Find the first module whose output diverges between HF and the engine.

Both models run the same prompts with forward hooks on every module. HF runs prompt by prompt
([1, S, ...] tensors), the engine runs the flat batch ([T, ...]); HF tensors are made tokens-first and
concatenated in the engine's ragged order, so each module gives one [T, X] tensor per side.

Modules are matched by name (the engine keeps HF's state-dict names). Special cases:
- fused engine modules (qkv_proj, gate_up_proj, per `packed_modules_mapping`) compare with the
  concatenation of their HF parts' outputs;
- the engine's `Attention` layer compares with the q/k/v inputs and output of the HF attention
  function (captured by wrapping the attention interface), so rope and scaling faults separate;
- engine decoder layers return (hidden, residual) and fused norms take (x, residual): the true
  hidden state is their sum (inputs) or the hidden part (norm outputs);
- the final logits compare as the virtual point `compute_logits`.
Points are walked in the engine's execution order. The first point whose output differs is blamed if
its inputs agree; if its inputs already differ, the fault is in code between modules (rotary,
positions, an inline op), so the nearest enclosing module whose input agrees is blamed instead.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from porter.verify.engine_side import flat_batch

DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
ATTENTION_KEY = "@attention"  # HF virtual point: the attention function called by module X is "X.@attention"
LOGITS = "compute_logits"
# relative error (max abs diff / max abs reference) beyond which a module output "differs"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# low precision with an HF fp32 run: a module differs when its error against HF fp32 exceeds this many
# times HF's own low-precision error there (noise alone stays near 1)
LOW_PRECISION_RATIO = 2.0


@dataclass
class Capture:
    out: torch.Tensor | None = None  # [T, X]
    inputs: list[torch.Tensor] = field(default_factory=list)  # each [T, X]
    order: int = 0
    hf_name: str | None = None  # the HF point it compares with, when not its own name


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _floats(args, kwargs) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _tokens_first(t: torch.Tensor | None, s: int) -> torch.Tensor | None:
    """An HF tensor of one prompt of length s as [s, X], or None if it has no token dimension."""
    if t is None or not t.is_floating_point() or t.dim() < 2:
        return None
    if t.shape[0] == 1 and t.shape[1] == s:
        return t.reshape(s, -1)
    if t.dim() == 4 and t.shape[0] == 1 and t.shape[2] == s:  # [1, heads, s, head_dim]
        return t.transpose(1, 2).reshape(s, -1)
    if t.shape[0] == s:
        return t.reshape(s, -1)
    return None


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().cpu()


def _flat(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if t is None or not t.is_floating_point() or t.dim() == 0 or t.shape[0] != n:
        return None
    return t.detach().reshape(n, -1).float().cpu()


# ---------------------------------------------------------------- HF side


@contextmanager
def _wrapped_attention_functions(model: torch.nn.Module, sink):
    """Wrap the attention function(s) the HF model can call so q/k/v/out reach `sink(module, q, k, v, out)`."""
    from transformers.modeling_utils import AttentionInterface

    def wrap(fn):
        def capturing(module, query, key, value, *args, **kwargs):
            result = fn(module, query, key, value, *args, **kwargs)
            sink(module, query, key, value, _first_tensor(result))
            return result

        return capturing

    restore = []
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in AttentionInterface._global_mapping:
        restore.append((AttentionInterface._global_mapping, impl, AttentionInterface._global_mapping[impl]))
    # "eager" is the modeling file's own module-level function, looked up at call time
    for mod_name in {type(m).__module__ for m in model.modules()}:
        mod = sys.modules.get(mod_name)
        if mod is not None and callable(getattr(mod, "eager_attention_forward", None)):
            restore.append((mod.__dict__, "eager_attention_forward", mod.eager_attention_forward))
    for table, key, fn in restore:
        table[key] = wrap(fn)
    try:
        yield
    finally:
        for table, key, fn in restore:
            table[key] = fn


@torch.no_grad()
def capture_hf(model: torch.nn.Module, prompts: list[list[int]], device: str) -> dict[str, Capture]:
    names = {id(m): n for n, m in model.named_modules() if n}
    calls: dict[str, list[tuple[list, torch.Tensor | None]]] = {}
    s_now = [0]

    def record(name, inputs, out):
        s = s_now[0]
        host = [_to_host(_tokens_first(t, s)) for t in (*inputs, out)]  # off the GPU at once: big models
        calls.setdefault(name, []).append((host[:-1], host[-1]))

    def hook(module, args, kwargs, output):
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if first is None:
            first = kwargs.get("hidden_states", next(iter(_floats((), kwargs)), None))
        record(names[id(module)], [first] if first is not None else [], _first_tensor(output))

    def attention_sink(module, q, k, v, out):
        if id(module) in names:
            record(f"{names[id(module)]}.{ATTENTION_KEY}", [q, k, v], out)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with _wrapped_attention_functions(model, attention_sink):
            for prompt in prompts:
                s_now[0] = len(prompt)
                logits = model(input_ids=torch.tensor([prompt], device=device), use_cache=False).logits
                record(LOGITS, [], logits)
    finally:
        for h in handles:
            h.remove()
    caps = {}
    for name, per_call in calls.items():
        if len(per_call) != len(prompts):  # called more or less than once per forward: no 1:1 packing
            continue
        outs = [o for _, o in per_call]
        cap = Capture(out=torch.cat(outs) if all(o is not None for o in outs) else None)
        n_in = len(per_call[0][0])
        for j in range(n_in):
            parts = [i[j] if j < len(i) else None for i, _ in per_call]
            if all(p is not None for p in parts):
                cap.inputs.append(torch.cat(parts))
        caps[name] = cap
    return caps


# ---------------------------------------------------------------- engine side


def _is_engine_attention(module) -> bool:
    try:
        from porter.engine.layers.attention import Attention
    except ImportError:  # pragma: no cover - engine layers not installed
        return type(module).__name__ == "Attention"
    return isinstance(module, Attention)


def _is_layer(name: str) -> bool:
    return name.rsplit(".", 1)[-1].isdigit()


def _summed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Sum of the leading tensors that share the first one's shape: (x, residual) -> x + residual."""
    if not tensors:
        return None
    same = [t for t in tensors if t.shape == tensors[0].shape]
    return same[0] if len(same) == 1 else sum(same[1:], same[0])


@torch.no_grad()
def capture_engine(model: torch.nn.Module, prompts: list[list[int]], device: str) -> dict[str, Capture]:
    from porter.engine.config import set_current_engine_config
    from porter.engine.forward_context import AttentionMetadata, set_forward_context

    n = sum(len(p) for p in prompts)
    caps: dict[str, Capture] = {}
    counter = [0]

    def make_hook(name, attention):
        def hook(module, args, kwargs, output):
            counter[0] += 1
            if name in caps:  # called twice in one forward: no 1:1 counterpart
                caps[name].out = None
                return
            if attention:
                inputs = [_flat(t, n) for t in _floats(args, kwargs)[:3]]
                out = _flat(_first_tensor(output), n)
                hf_name = f"{name.rsplit('.', 1)[0]}.{ATTENTION_KEY}"
                caps[name] = Capture(out, [i for i in inputs if i is not None], counter[0], hf_name)
                return
            inp = _summed([t for t in _floats(args, kwargs) if t.dim() and t.shape[0] == n])
            if _is_layer(name) and isinstance(output, (tuple, list)):
                out = _summed([t for t in output if isinstance(t, torch.Tensor)][:2])
            else:
                out = _first_tensor(output)
            caps[name] = Capture(_flat(out, n), [x for x in [_flat(inp, n)] if x is not None], counter[0])

        return hook

    handles = [
        m.register_forward_hook(make_hook(name, _is_engine_attention(m)), with_kwargs=True)
        for name, m in model.named_modules() if name
    ]
    ids, positions = flat_batch(prompts, device)
    meta = AttentionMetadata.for_prefill([len(p) for p in prompts], device=device)
    try:
        with set_current_engine_config(model.engine_config), set_forward_context(meta):
            hidden = model(input_ids=ids, positions=positions)
            logits = model.compute_logits(hidden)
    finally:
        for h in handles:
            h.remove()
    caps[LOGITS] = Capture(_flat(logits, n), [], counter[0] + 1)
    return caps


# ---------------------------------------------------------------- matching and blame


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).abs().max().item()
    if diff != diff:  # NaN
        return float("inf"), float("inf")
    return diff, diff / max(b.abs().max().item(), 1e-6)


def _hf_counterpart(name: str, hf: dict[str, Capture], packed: dict[str, list[str]]) -> Capture | None:
    if name in hf:
        return hf[name]
    parent, _, last = name.rpartition(".")
    parts = [f"{parent}.{p}" if parent else p for p in packed.get(last, [])]
    if parts and all(p in hf and hf[p].out is not None for p in parts):
        return Capture(torch.cat([hf[p].out for p in parts], dim=-1), hf[parts[0]].inputs)
    return None


def _ratio(engine: torch.Tensor, low: torch.Tensor, fp32: torch.Tensor) -> float:
    """||engine_lowp - HF_fp32|| / ||HF_lowp - HF_fp32||: how much more error than HF's own low precision."""
    den = torch.linalg.vector_norm(low - fp32).item()
    num = torch.linalg.vector_norm(engine - fp32).item()
    if num != num:
        return float("inf")
    return num / max(den, 1e-6 * torch.linalg.vector_norm(fp32).item(), 1e-30)


def compare_points(engine: dict[str, Capture], hf: dict[str, Capture], packed: dict[str, list[str]], tol: float,
                   hf_fp32: dict[str, Capture] | None = None) -> list[dict]:
    """Every comparable point in engine execution order, with its output and input errors. With HF fp32
    captures (low-precision runs) a point differs when its error ratio exceeds LOW_PRECISION_RATIO."""
    points = []
    for name, e in sorted(engine.items(), key=lambda kv: kv[1].order):
        h = _hf_counterpart(e.hf_name or name, hf, packed)
        entry = {"module": name, "order": e.order, "matched": False}
        if h is not None and e.out is not None and h.out is not None and e.out.shape == h.out.shape:
            pairs = list(zip(e.inputs, h.inputs)) if len(e.inputs) == len(h.inputs) else []
            if all(a.shape == b.shape for a, b in pairs):  # e.g. SiluAndMul vs SiLU: same name, other input
                max_abs, rel = _rel(e.out, h.out)
                in_rel = max((_rel(a, b)[1] for a, b in pairs), default=None)
                entry.update(matched=True, max_abs=max_abs, max_rel=rel, input_max_rel=in_rel, ok=rel <= tol,
                             input_ok=in_rel is None or in_rel <= tol)
                h32 = _hf_counterpart(e.hf_name or name, hf_fp32, packed) if hf_fp32 is not None else None
                if h32 is not None and h32.out is not None and h32.out.shape == e.out.shape:
                    ratio = _ratio(e.out, h.out, h32.out)
                    in_pairs = list(zip(e.inputs, h.inputs, h32.inputs)) if len(h32.inputs) == len(pairs) else []
                    in_ratio = max((_ratio(a, b, c) for a, b, c in in_pairs), default=None)
                    entry.update(error_ratio=ratio, input_error_ratio=in_ratio, ok=ratio <= LOW_PRECISION_RATIO,
                                 input_ok=in_ratio is None or in_ratio <= LOW_PRECISION_RATIO)
        points.append(entry)
    return points


def blame(points: list[dict]) -> dict | None:
    """The first diverging module, per the rules in the module docstring; None if every point agrees."""
    matched = [p for p in points if p["matched"]]
    first = next((p for p in matched if not p["ok"]), None)
    if first is None:
        return None
    by_name = {p["module"]: p for p in matched}
    culprit, reason = first, "its output differs while its inputs agree"
    if not first["input_ok"]:
        culprit, reason = first, "its inputs already differ, and no enclosing module's inputs agree"
        parts = first["module"].split(".")
        for i in range(len(parts) - 1, 0, -1):
            ancestor = by_name.get(".".join(parts[:i]))
            if ancestor is not None and ancestor["input_ok"]:
                culprit = ancestor
                reason = (f"the inputs of {first['module']} already differ while every module before it agrees: "
                          f"the fault is in {ancestor['module']}'s own code between its submodules")
                break
    last_ok = max((p["order"] for p in matched if p["ok"] and p["order"] < first["order"]), default=0)
    scope = culprit["module"] + "."
    suspects = [p["module"] for p in points if not p["matched"] and last_ok < p["order"] < first["order"]
                and p["module"].startswith(scope)]
    summary = f"{culprit['module']}: max abs {culprit['max_abs']:.1e} (first divergence)"
    return {"module": culprit["module"], "max_abs": culprit["max_abs"], "max_rel": culprit["max_rel"],
            "first_differing_point": first["module"], "reason": reason, "suspects": suspects, "summary": summary}


def localise(engine_model, hf_model, prompts: list[list[int]], device: str, dtype: torch.dtype,
             hf_fp32_model=None) -> dict:
    """Module-by-module comparison; `hf_fp32_model` (low-precision runs) switches to error ratios."""
    engine = capture_engine(engine_model, prompts, device)
    packed = getattr(engine_model, "packed_modules_mapping", None)
    return localise_captures(engine, packed, hf_model, prompts, device, dtype, hf_fp32_model)


def localise_captures(engine: dict[str, Capture], packed_modules_mapping: dict | None, hf_model,
                      prompts: list[list[int]], device: str, dtype: torch.dtype, hf_fp32_model=None) -> dict:
    """`localise` from engine captures taken elsewhere (under TP: by rank 0 in its worker process).
    Points whose engine output has another shape than HF's (a rank's shard) are left unmatched."""
    hf = capture_hf(hf_model, prompts, device)
    hf_fp32 = capture_hf(hf_fp32_model, prompts, device) if hf_fp32_model is not None else None
    packed = dict(DEFAULT_PACKED)
    packed.update(packed_modules_mapping or {})
    tol = TOLERANCE.get(dtype, 1e-4)
    points = compare_points(engine, hf, packed, tol, hf_fp32)
    keys = ("module", "max_abs", "max_rel", "input_max_rel", "error_ratio", "input_error_ratio", "ok")
    trace = [{k: p[k] for k in keys if k in p} for p in points if p["matched"]]
    rule = (f"error ratio vs HF fp32 <= {LOW_PRECISION_RATIO}" if hf_fp32 is not None
            else f"max abs diff / max abs HF <= {tol:g}")
    return {"divergence": blame(points), "tolerance_rel": tol, "rule": rule, "trace": trace}
