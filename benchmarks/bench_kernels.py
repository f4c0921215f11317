"""Kernel benchmark (CUDA): copy-bandwidth ceiling, paged decode attention vs that ceiling and vs
torch SDPA (flash) on contiguous KV, a few prefill points, after bf16 correctness checks of every
kernel against its torch reference.

    python benchmarks/bench_kernels.py            # checks + decode grid + prefill points (~2-3 min)
    python benchmarks/bench_kernels.py --sweep    # also sweep decode tile configs on three shapes

Timing: triton.testing.do_bench, median, of a CUDA graph replaying GRAPH_CALLS calls (as the engine
runs decode; "eager" columns time one plain call and so include Python launch overhead). KV inputs
rotate over several block-table sets (disjoint blocks) so successive calls do not read from L2
(do_bench also flushes L2 before each replay). Writes JSON to $OUT/bench_kernels.json when OUT is set.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from porter.kernels import reference as ref
from porter.kernels.activation import gelu_and_mul, silu_and_mul
from porter.kernels.decode_attention import DEFAULT_CONFIG, DecodeConfig, choose_num_splits, decode_attention
from porter.kernels.kv_cache import write_kv_cache
from porter.kernels.prefill_attention import PrefillConfig, prefill_attention
from porter.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from porter.kernels.rotary import apply_rotary

DEV = "cuda"
DT = torch.bfloat16
HQ, HKV, D, BS = 16, 8, 128, 16
ROTATE_BYTES = 512 << 20  # rotate over at least this many bytes of KV (L2 is 50-60 MB)
GRAPH_CALLS = 8


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")  # ms


def bench_graph(fn):
    """Median ms of one call, from a CUDA graph of GRAPH_CALLS calls (no launch overhead)."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    ms = bench(graph.replay) / GRAPH_CALLS
    del graph
    return ms


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- (a) copy bandwidth
def copy_bandwidth():
    n = 1 << 30  # 1 GiB each way
    src = torch.randn(n // 2, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / ms / 1e6  # GB/s, bytes read + written


# ---------------------------------------------------------------- (c) correctness
def check_kernels():
    torch.manual_seed(0)
    results = {}
    # paged cache write (strided k/v views, padding slots)
    t = 300
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device=DEV, dtype=DT)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(t, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(t, HKV, D)
    slots = torch.randperm(64 * BS, device=DEV)[:t]
    slots[::7] = -1
    kc, vc = (torch.randn(64, BS, HKV, D, device=DEV, dtype=DT) for _ in range(2))
    kr, vr = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    ref.write_kv_cache_ref(k, v, kr, vr, slots)
    results["write_kv_cache"] = float(not (torch.equal(kc, kr) and torch.equal(vc, vr)))

    # attention: decode (several split counts) and prefill, each feature set
    seq_lens = [1000, 4097, 33, 2500, 1]
    feats = {
        "plain": {},
        "window+softcap": dict(sliding_window=300, logits_soft_cap=30.0),
        "alibi+sinks": dict(alibi_slopes=torch.rand(HQ, device=DEV) * 0.1, sinks=torch.randn(HQ, device=DEV)),
    }
    for name, f in feats.items():
        q_lens = [1] * len(seq_lens)
        q, kc, vc, tables, starts, lens = paged_inputs(seq_lens, q_lens)
        expect = ref.paged_attention_ref(q, kc, vc, starts, lens, tables, scale=D ** -0.5, **f)
        for splits in (1, 5, 32):
            out = decode_attention(q, kc, vc, tables, lens, scale=D ** -0.5, num_splits=splits, **f)
            results[f"decode[{name},splits={splits}]"] = rel(out, expect)
        q_lens = [300, 4097, 1, 17, 1]
        q, kc, vc, tables, starts, lens = paged_inputs(seq_lens, q_lens)
        expect = ref.paged_attention_ref(q, kc, vc, starts, lens, tables, scale=D ** -0.5, **f)
        out = prefill_attention(q, kc, vc, starts, lens, tables, max(q_lens), scale=D ** -0.5, **f)
        results[f"prefill_paged[{name}]"] = rel(out, expect)
        k, v = torch.randn(2, q.shape[0], HKV, D, device=DEV, dtype=DT)
        q_only = torch.tensor(q_lens, dtype=torch.int32, device=DEV)
        out = prefill_attention(q, k, v, starts, q_only, None, max(q_lens), scale=D ** -0.5, **f)
        expect = ref.attention_no_cache_ref(q, k, v, starts, scale=D ** -0.5, **f)
        results[f"prefill_no_cache[{name}]"] = rel(out, expect)

    # rotary (neox, interleaved, partial), norms, activations
    pos = torch.randint(0, 4096, (t,), device=DEV)
    for neox, rot in itertools.product((True, False), (128, 64)):
        inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=DEV).float() / rot))
        fr = torch.outer(torch.arange(4096, device=DEV).float(), inv)
        cache = torch.cat([fr.cos(), fr.sin()], -1)
        qkv = torch.randn(t, (HQ + 2 * HKV) * D, device=DEV, dtype=DT)
        q, k = qkv[:, :HQ * D], qkv[:, HQ * D:(HQ + HKV) * D]
        qr, kr = ref.rotary_ref(pos, q, k, cache, D, neox)
        apply_rotary(pos, q, k, cache, D, neox)
        results[f"rotary[neox={neox},rot={rot}]"] = max(rel(q, qr), rel(k, kr))
    x, r = torch.randn(2, t, 4096, device=DEV, dtype=DT)
    w = 1 + 0.1 * torch.randn(4096, device=DEV, dtype=DT)
    results["rms_norm"] = rel(rms_norm(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6))
    o, nr = fused_add_rms_norm(x, r, w, 1e-6)
    o_ref, nr_ref = ref.fused_add_rms_norm_ref(x, r, w, 1e-6)
    results["fused_add_rms_norm"] = max(rel(o, o_ref), rel(nr, nr_ref))
    g = torch.randn(t, 2 * 11008, device=DEV, dtype=DT)
    results["silu_and_mul"] = rel(silu_and_mul(g), ref.silu_and_mul_ref(g))
    for a in ("none", "tanh"):
        results[f"gelu_and_mul[{a}]"] = rel(gelu_and_mul(g, a), ref.gelu_and_mul_ref(g, a))
    return results


def paged_inputs(seq_lens, q_lens, num_sets=1):
    """Random paged caches holding num_sets disjoint copies of the batch's blocks (shuffled)."""
    need = [triton.cdiv(n, BS) for n in seq_lens]
    per_set = sum(need)
    num_blocks = per_set * num_sets
    perm = torch.randperm(num_blocks, device=DEV, dtype=torch.int64).to(torch.int32)
    width = max(need)
    tables = []
    for s in range(num_sets):
        tb = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=DEV)
        used = s * per_set
        for i, n in enumerate(need):
            tb[i, :n] = perm[used:used + n]
            used += n
        tables.append(tb)
    kc = torch.randn(num_blocks, BS, HKV, D, device=DEV, dtype=DT)
    vc = torch.randn(num_blocks, BS, HKV, D, device=DEV, dtype=DT)
    q = torch.randn(sum(q_lens), HQ, D, device=DEV, dtype=DT)
    starts = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, (tables if num_sets > 1 else tables[0]), starts, lens


# ---------------------------------------------------------------- (b) decode attention
def kv_bytes(batch, ctx):
    return 2 * batch * ctx * HKV * D * 2


def decode_inputs(batch, ctx):
    sets = max(1, min(256, triton.cdiv(ROTATE_BYTES, kv_bytes(batch, ctx))))
    q, kc, vc, tables, _, lens = paged_inputs([ctx] * batch, [1] * batch, sets)
    return q, kc, vc, (tables if isinstance(tables, list) else [tables]), lens


def time_decode(inputs, batch, ctx, config=DEFAULT_CONFIG, eager=True):  # D=128: the default
    q, kc, vc, tables, lens = inputs
    splits = choose_num_splits(batch, HKV, ctx, config)
    it = itertools.cycle(tables)
    out = torch.empty_like(q)

    def run():
        return decode_attention(q, kc, vc, next(it), lens, scale=D ** -0.5, num_splits=splits, out=out,
                                config=config)

    ms = bench_graph(run)
    nbytes = kv_bytes(batch, ctx) + 2 * q.numel() * q.element_size()
    row = dict(batch=batch, ctx=ctx, splits=splits, sets=len(tables), triton_us=ms * 1e3,
               triton_gbs=nbytes / ms / 1e6)
    if eager:
        row["triton_eager_us"] = bench(run) * 1e3
    return row


def decode_point(batch, ctx):
    inputs = decode_inputs(batch, ctx)
    row = time_decode(inputs, batch, ctx)
    del inputs
    nbytes = kv_bytes(batch, ctx) + 2 * batch * HQ * D * 2
    row.update(sdpa_point(batch, ctx, row["sets"], nbytes))
    return row


def sdpa_point(batch, ctx, sets, nbytes):
    qs = [torch.randn(batch, HQ, 1, D, device=DEV, dtype=DT) for _ in range(sets)]
    ks = [torch.randn(batch, HKV, ctx, D, device=DEV, dtype=DT) for _ in range(sets)]
    vs = [torch.randn(batch, HKV, ctx, D, device=DEV, dtype=DT) for _ in range(sets)]
    it = itertools.cycle(range(sets))

    def run():
        i = next(it)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=True)

    try:
        ms = bench_graph(run)
        return dict(sdpa_us=ms * 1e3, sdpa_gbs=nbytes / ms / 1e6, sdpa_eager_us=bench(run) * 1e3)
    except RuntimeError as e:  # flash may refuse GQA on some torch builds: record why, time nothing
        return dict(sdpa_us=float("nan"), sdpa_gbs=float("nan"), sdpa_error=str(e).splitlines()[0][:100])


def prefill_point(batch, q_len, configs=None):
    q, kc, vc, tables, starts, lens = paged_inputs([q_len] * batch, [q_len] * batch)
    flops = 4 * batch * HQ * D * q_len * q_len / 2  # causal: half the score matrix
    row = dict(batch=batch, q_len=q_len)
    for cfg in configs or [None]:
        kw = {} if cfg is None else dict(config=cfg)
        ms = bench_graph(lambda: prefill_attention(q, kc, vc, starts, lens, tables, q_len, scale=D ** -0.5, **kw))
        tag = "" if cfg is None else f"[{cfg.block_m},{cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}]"
        row[f"triton{tag}_us"] = ms * 1e3
        row[f"triton{tag}_tflops"] = flops / ms / 1e9
    qd = q.view(batch, q_len, HQ, D).transpose(1, 2)
    kd = torch.randn(batch, HKV, q_len, D, device=DEV, dtype=DT)
    vd = torch.randn_like(kd)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    ms_sdpa = bench_graph(sdpa)
    row.update(sdpa_us=ms_sdpa * 1e3, sdpa_tflops=flops / ms_sdpa / 1e9)
    return row


def sweep():
    """Decode: split heuristic (target programs, max splits) x two tiles; prefill: tile configs."""
    rows = []
    tiles = [(64, 4, 3), (128, 4, 3), (32, 4, 2)]
    for batch, ctx in [(1, 32768), (4, 4096), (16, 8192), (32, 4096), (128, 2048)]:
        inputs = decode_inputs(batch, ctx)
        for (bn, warps, stages), mult, max_splits in itertools.product(tiles, (1, 2, 3, 4, 8), (32,)):
            cfg = DecodeConfig(block_n=bn, num_warps=warps, num_stages=stages, programs_per_sm=mult,
                               max_splits=max_splits)
            r = time_decode(inputs, batch, ctx, cfg, eager=False)
            r.update(block_n=bn, num_warps=warps, num_stages=stages, target_mult=mult, max_splits=max_splits)
            rows.append(r)
        del inputs
        torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["batch"], r["ctx"], -r["triton_gbs"]))
    print("\nsweep (graph timing; best 5 per shape, then the current default):")
    for (b, c), grp in itertools.groupby(rows, key=lambda r: (r["batch"], r["ctx"])):
        for r in list(grp)[:5]:
            print(f"  B={b:4d} ctx={c:6d} bn={r['block_n']:4d} warps={r['num_warps']} stages={r['num_stages']} "
                  f"mult={r['target_mult']:2d} max_splits={r['max_splits']:3d} splits={r['splits']:3d} "
                  f"{r['triton_us']:8.1f} us {r['triton_gbs']:7.0f} GB/s")
    cfgs = [PrefillConfig(bm, bn, w, st) for bm, bn, w, st in
            [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3)]]
    print("prefill tiles (TFLOP/s):")
    pre = []
    for b, n in ((1, 4096), (16, 512)):
        r = prefill_point(b, n, cfgs)
        pre.append(r)
        print(f"  B={b} q_len={n}: " + ", ".join(f"{k[:-7]} {v:.0f}" for k, v in r.items() if k.endswith("_tflops")))
    return dict(decode=rows, prefill=pre)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs CUDA")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    report = {"device": props.name, "config": DEFAULT_CONFIG.__dict__}

    checks = check_kernels()
    bad = {k: v for k, v in checks.items() if not v < 2e-2}
    print(f"correctness (bf16 rel. error vs torch reference): {len(checks) - len(bad)}/{len(checks)} pass, "
          f"worst {max(checks.values()):.2e}")
    for k, v in bad.items():
        print(f"  FAIL {k}: {v:.3e}")
    report["checks"] = checks

    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    report["copy_gbs"] = copy_gbs

    if args.sweep:
        report["sweep"] = sweep()

    grid = [(b, c) for b in (1, 4, 16, 32, 64, 128, 256) for c in (512, 2048, 4096, 8192, 16384, 32768)
            if b * c <= (1 << 21)]
    print(f"\ndecode attention, bf16, Hq={HQ} Hkv={HKV} D={D} block={BS}; bytes = KV + q + out")
    print(f"{'batch':>5} {'ctx':>6} {'splits':>6} {'triton us':>10} {'GB/s':>7} {'%copy':>6} "
          f"{'sdpa us':>9} {'sdpa GB/s':>9} {'sdpa/triton':>11} {'eager us: triton':>16} {'sdpa':>7}")
    rows = []
    for b, c in grid:
        r = decode_point(b, c)
        r["pct_copy"] = 100 * r["triton_gbs"] / copy_gbs
        r["speedup_vs_sdpa"] = r["sdpa_us"] / r["triton_us"]
        rows.append(r)
        print(f"{b:5d} {c:6d} {r['splits']:6d} {r['triton_us']:10.1f} {r['triton_gbs']:7.0f} {r['pct_copy']:6.1f} "
              f"{r['sdpa_us']:9.1f} {r['sdpa_gbs']:9.0f} {r['speedup_vs_sdpa']:11.2f} "
              f"{r['triton_eager_us']:16.1f} {r.get('sdpa_eager_us', float('nan')):7.1f}"
              + (f"  ({r['sdpa_error']})" if "sdpa_error" in r else ""))
        torch.cuda.empty_cache()
    report["decode"] = rows

    print("\nprefill attention (paged, causal; graph timing), bf16 vs SDPA flash on contiguous KV")
    pre = [prefill_point(b, n) for b, n in ((1, 4096), (4, 2048), (16, 512))]
    for r in pre:
        print(f"  B={r['batch']:3d} q_len={r['q_len']:5d}  triton {r['triton_us']:8.1f} us "
              f"{r['triton_tflops']:6.1f} TFLOP/s   sdpa {r['sdpa_us']:8.1f} us {r['sdpa_tflops']:6.1f} TFLOP/s")
    report["prefill"] = pre

    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
