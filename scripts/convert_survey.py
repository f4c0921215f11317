"""Survey: how many of the installed transformers' decoder-only softmax-attention causal LMs convert
and pass `porter verify --tiny`.

Candidates are the model types of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES minus those that are clearly not
softmax-attention decoders, judged from their config and modeling source (no hand list):
encoder-decoder configs, encoders that become causal only with `is_decoder=True` (their causal-LM
class warns so), configs without attention heads, and configs with state-space / recurrent /
linear-attention settings. Each candidate runs `porter convert TYPE -o FILE` and then
`porter verify TYPE --tiny --model-file FILE --max-tokens 12` in subprocesses with a timeout.

    python scripts/convert_survey.py [--only gpt2,opt] [--jobs 2] [--timeout 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# config attributes that mean layers other than softmax attention carry state (SSM, RNN, linear attention)
_NOT_SOFTMAX = re.compile(r"mamba|ssm|conv_kernel|state_size|rwkv|linear_attn|linear_conv|recurrent|lru_width|"
                          r"mlstm|slstm|xlstm|mamba_chunk|short_conv")
_ENCODER_AS_DECODER = re.compile(r"add `is_decoder=True")


def modeling_source(model_type: str) -> str:
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    path = Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    return path.read_text() if path.is_file() else ""


def classify(model_type: str) -> str | None:
    """None for a candidate, else why the model type is not a softmax-attention decoder."""
    import warnings

    from transformers import AutoConfig, PretrainedConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = AutoConfig.for_model(model_type)
        except Exception as exc:  # noqa: BLE001 - a config that cannot be built is a reason to skip
            return f"config does not build: {type(exc).__name__}"
        if getattr(config, "is_encoder_decoder", False):
            return "encoder-decoder"
        keys = set(vars(config)) - set(vars(PretrainedConfig()))  # what this config class adds
        stateful = sorted(k for k in keys if _NOT_SOFTMAX.search(k))
        if stateful:
            return f"state-space/recurrent layers ({stateful[0]})"
        heads = next((h for a in ("num_attention_heads", "n_head", "num_heads") if (h := _attr(config, a))), None)
        if not heads:
            return "no attention heads in its config"
    if _ENCODER_AS_DECODER.search(modeling_source(model_type)):
        return "encoder, causal only with is_decoder=True"
    return None


def _attr(config, name: str):
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer (heterogeneous) configs refuse global reads
        return "per-layer"


def _first_error(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if "Traceback" in text:  # a crash: its exception line, not a frame
        crash = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", l)]
        if crash:
            return crash[-1][:200]
    for pat in (r"^refused ", r"^error", r"Error", r"FAIL", r"fail", r"✗"):
        hit = next((l for l in lines if re.search(pat, l)), None)
        if hit:
            return hit[:200]
    return (lines[-1] if lines else "no output")[:200]


def _first_failed_check(report: Path) -> str | None:
    if not report.is_file():
        return None
    checks = json.loads(report.read_text()).get("checks", [])
    bad = next((c for c in checks if not c.get("passed")), None)
    return f"{bad['name']}: {bad.get('detail', '')}"[:200] if bad else None


def run_one(model_type: str, work: Path, timeout: int) -> dict:
    out = work / f"{model_type.replace('-', '_')}_engine.py"
    row = {"model_type": model_type, "convert": False, "verify": False, "error": "", "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["porter", "convert", model_type, "-o", str(out), "-q"], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"convert timed out after {timeout} s"
        return row
    if p.returncode != 0:
        row["error"] = _first_error(p.stderr + p.stdout)
        row["seconds"] = time.perf_counter() - t0
        return row
    row["convert"] = True
    report = out.with_suffix(".verify.json")
    try:
        p = subprocess.run(["porter", "verify", model_type, "--tiny", "--model-file", str(out), "--max-tokens", "12",
                            "--json", str(report)], capture_output=True, text=True, timeout=timeout)
        row["verify"] = p.returncode == 0
        if not row["verify"]:
            row["error"] = _first_failed_check(report) or _first_error(p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        row["error"] = f"verify timed out after {timeout} s"
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types (default: every candidate)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per convert and per verify")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args()

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.only.split(",") if args.only else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    skipped, candidates = {}, []
    for t in types:
        why = classify(t)
        (skipped.__setitem__(t, why) if why else candidates.append(t))
    print(f"{len(types)} causal-LM model types; {len(candidates)} softmax-attention decoder candidates; "
          f"{len(skipped)} skipped")
    for t, why in skipped.items():
        print(f"  skip {t:28s} {why}")
    with tempfile.TemporaryDirectory(prefix="porter-survey-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        rows = []
        for row in pool.map(lambda t: run_one(t, Path(tmp), args.timeout), candidates):
            rows.append(row)
            status = "PASS" if row["verify"] else ("converts, verify fails" if row["convert"] else "convert fails")
            print(f"{row['model_type']:28s} {status:24s} {row['seconds']:6.1f}s  {row['error']}", flush=True)
    converted = sum(r["convert"] for r in rows)
    passed = sum(r["verify"] for r in rows)
    print(f"\nsummary: {len(rows)} candidates, {converted} convert, {passed} pass porter verify --tiny")
    if args.json:
        args.json.write_text(json.dumps({"skipped": skipped, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
