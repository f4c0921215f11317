"""End-to-end throughput and batch-1 decode latency on a GPU, porter's engine vs HF transformers.

One run, one GPU, the same random-weight checkpoint for every contender:
  * a Qwen3-0.6B-shaped model (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
    intermediate 3072, vocab 151936, tied), random bf16 weights;
  * workload: N requests, prompt lengths uniform 100..512, output lengths uniform 64..256, EOS ignored;
  * porter (the converted qwen3 model file on the triton backend with CUDA graphs), HF `generate` with one
    static batch (each request's useful tokens counted, padding and overrun are HF's cost), and HF's
    continuous batching (`generate_batch` manager with per-request max_new_tokens);
  * batch-1 decode step time vs the floor weight_bytes / measured copy bandwidth;
  * porter is also timed with asynchronous scheduling off (the same engine, one step at a time).

    python benchmarks/bench_e2e.py --model-file q.py [--requests 64 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from triton_compiles import TritonCompiles

QWEN3_06B = dict(
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
)


def make_checkpoint(path: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**QWEN3_06B, architectures=["Qwen3ForCausalLM"], eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():  # random, not init-time zeros/ones: realistic activations
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(path, safe_serialization=True)
    del model


def workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed + n)
    plens = torch.randint(100, 513, (n,), generator=g).tolist()
    olens = torch.randint(64, 257, (n,), generator=g).tolist()
    prompts = [torch.randint(10, 150000, (p,), generator=g).tolist() for p in plens]
    return prompts, olens


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the memory-bandwidth ceiling)."""
    import triton.testing

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_porter(ckpt: Path, model_file: str, prompts, olens, max_num_seqs: int) -> dict:
    from porter.engine import LLM, SamplingParams

    llm = LLM(model=str(ckpt), model_file=model_file, dtype="bfloat16", device="cuda", max_num_seqs=max_num_seqs,
              max_model_len=1024, skip_tokenizer_init=True)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in olens]
    llm.generate(prompts[:4], params[:4])  # warm-up: kernels compiled, graphs captured
    with TritonCompiles() as compiles:
        outs, secs = timed(lambda: llm.generate(prompts, params))
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    assert gen == sum(olens), (gen, sum(olens))
    print(f"porter, {len(prompts)} requests: {llm.runner.num_kv_blocks} KV blocks, "
          f"{llm.scheduler.num_preemptions} preemptions, {secs:.2f} s; in the timed run: {compiles.summary()}")
    llm.async_scheduling = False  # the same engine, one step at a time (host work not overlapped)
    llm.reset_prefix_cache()  # else the second run skips every prefill
    _, sync_secs = timed(lambda: llm.generate(prompts, params))
    llm.async_scheduling = True
    return {"llm": llm, "seconds": secs, "sync_seconds": sync_secs, "tokens": gen}


def porter_decode_step(llm, steps: int = 256, async_scheduling: bool = True) -> float:
    """Seconds per batch-1 decode step: (time for 1+steps tokens - time for 1 token) / steps."""
    from porter.engine import SamplingParams

    llm.async_scheduling = async_scheduling
    prompt = [[7] * 128]
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    _, t1 = timed(lambda: llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)))
    _, tn = timed(lambda: llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1 + steps, ignore_eos=True)))
    llm.async_scheduling = True
    return (tn - t1) / steps


def bench_hf_static(ckpt: Path, prompts, olens) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generation requires
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=max(olens), max_new_tokens=max(olens))
    with torch.no_grad():
        model.generate(input_ids=ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
        _, secs = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **kw))
    del model
    return {"seconds": secs, "tokens": sum(olens)}  # useful tokens only: the static batch runs to the longest


def bench_hf_continuous(ckpt: Path, prompts, olens) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = None
    for impl in ("paged|sdpa", "sdpa_paged", "paged|eager"):  # the name changed across transformers 5.x
        try:
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation=impl)
            break
        except ValueError:
            continue
    if model is None:
        raise RuntimeError("no paged attention implementation in this transformers")
    model = model.cuda().eval()
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(olens), eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:2], generation_config=cfg, max_new_tokens=4)  # warm-up
    manager = model.init_continuous_batching(generation_config=cfg)
    manager.start()

    def run():
        for i, (p, o) in enumerate(zip(prompts, olens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o)
        got = 0
        for _ in prompts:
            result = manager.get_result(timeout=600)
            got += len(result.generated_tokens)
        return got

    got, secs = timed(run)
    manager.stop(block=True)
    del model
    return {"seconds": secs, "tokens": got}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-file", required=True, help="converted qwen3 engine model (porter convert qwen3)")
    ap.add_argument("--requests", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--skip-hf-static", action="store_true")
    ap.add_argument("--skip-hf-cb", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    bw = copy_bandwidth()
    rows, results = [], {"copy_bandwidth_GBps": bw / 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "qwen3-0.6b-random"
        make_checkpoint(ckpt)
        for n in args.requests:
            prompts, olens = workload(n)
            ours = bench_porter(ckpt, args.model_file, prompts, olens, max_num_seqs=min(n, 256))
            entry = {"porter_tok_s": ours["tokens"] / ours["seconds"],
                     "porter_sync_tok_s": ours["tokens"] / ours["sync_seconds"]}
            if n == args.requests[0]:
                step = porter_decode_step(ours["llm"])
                sync_step = porter_decode_step(ours["llm"], async_scheduling=False)
                weights = {p.data_ptr(): p.numel() * p.element_size() for p in ours["llm"].model_parameters()}
                floor = sum(weights.values()) / bw
                results["batch1_decode"] = {"step_ms": step * 1e3, "floor_ms": floor * 1e3, "ratio": step / floor,
                                            "sync_step_ms": sync_step * 1e3}
            del ours
            gc.collect(); torch.cuda.empty_cache()
            for name, fn, skip in (("hf_static", bench_hf_static, args.skip_hf_static),
                                   ("hf_cb", bench_hf_continuous, args.skip_hf_cb)):
                if skip:
                    continue
                try:
                    r = fn(ckpt, prompts, olens)
                    entry[f"{name}_tok_s"] = r["tokens"] / r["seconds"]
                    entry[f"speedup_vs_{name}"] = entry["porter_tok_s"] / entry[f"{name}_tok_s"]
                except Exception as e:  # report, keep the rest of the table
                    entry[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                gc.collect(); torch.cuda.empty_cache()
            results[f"requests_{n}"] = entry
            rows.append((n, entry))

    print(f"\ncopy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    b1 = results.get("batch1_decode")
    if b1:
        print(f"batch-1 decode step: {b1['step_ms']:.3f} ms, floor {b1['floor_ms']:.3f} ms, ratio {b1['ratio']:.2f}x "
              f"(without async scheduling: {b1['sync_step_ms']:.3f} ms)")
    print(f"{'requests':>8} {'porter tok/s':>13} {'(sync)':>8} {'HF static':>10} {'x':>6} {'HF CB':>10} {'x':>6}")
    for n, e in rows:
        print(f"{n:>8} {e['porter_tok_s']:>13.0f} {e['porter_sync_tok_s']:>8.0f} "
              f"{e.get('hf_static_tok_s', float('nan')):>10.0f} "
              f"{e.get('speedup_vs_hf_static', float('nan')):>6.1f} {e.get('hf_cb_tok_s', float('nan')):>10.0f} "
              f"{e.get('speedup_vs_hf_cb', float('nan')):>6.1f}")
        for k, v in e.items():
            if k.endswith("_error"):
                print(f"  {k}: {v}")
    out = args.json or (os.path.join(os.environ["OUT"], "bench_e2e.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
