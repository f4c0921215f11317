"""`porter verify --tp N`: the engine side on N gloo ranks (two worker processes here) against HF in this
process. Parity for the fixture Llama (built-in model) and converted tiny models; planted faults show
what is localised under TP (rank 0's whole-tensor points) and what the TP=1 rerun adds."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from porter.cli import app
from porter.convert import convert_file
from porter.verify import checkpoint
from porter.verify.engine_side import resolve_model_class
from porter.verify.model_source import ModelSource
from porter.verify.run import VerifyOptions, check_engine, cpu_threads, reference_run, verify
from porter.verify.tiny import make_tiny_checkpoint
from porter.verify.tp_engine import TP_FAULT_HINT, merge_weight_reports
from porter.verify.weights import WeightReport

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"


def test_fixture_tp2_passes_from_the_cli(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["verify", str(FIXTURE), "--builtin", "--tp", "2", "--prompts", "3",
                                      "--max-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "TP=2" in result.output and "PARITY" in result.output
    report = json.loads(out.read_text())
    assert report["tensor_parallel_size"] == 2 and report["passed"]
    assert [c["name"] for c in report["checks"]] == ["prefill_logits", "greedy_tokens", "logprobs"]
    assert report["checks"][0]["metrics"]["max_abs"] < 1e-4  # same math as TP=1, other summation order
    assert report["weights"]["ok"] and report["localisation"] is None and report["tp1"] is None


def test_converted_qwen2_tp2_passes_and_rank0_compares_whole_tensors_only():
    """GQA with 2 KV heads, biased q/k/v: the converted file, sharded in two. With --localise the
    trace shows which points rank 0 can compare: blocks, norms, embeddings, logits, not the shards."""
    report = verify(VerifyOptions(target="qwen2", tiny=True, tp=2, prompts=3, max_tokens=4, always_localise=True))
    assert report.passed, report.to_dict()
    assert report.engine_model == "converted:modeling_qwen2.py"
    compared = {t["module"] for t in report.localisation["trace"]}
    assert {"model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1",
            "model.norm", "compute_logits"} <= compared
    assert not compared & {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj",
                           "model.layers.0.self_attn.attn"}  # a rank's shard has another shape than HF's
    assert report.divergence is None and "rank 0 of 2" in report.localisation["scope"]


def test_bf16_tp2_meets_the_error_ratio_rule():
    """bf16 over gloo: each rank's partial sums are rounded before the all-reduce, one rounding more than
    at TP=1; the port must still add no more error than HF itself in bf16 (ratio <= 1.2)."""
    report = verify(VerifyOptions(target=str(FIXTURE), builtin=True, tp=2, dtype="bfloat16", prompts=3, max_tokens=4))
    assert report.passed, report.to_dict()
    prefill = report.checks[0]
    assert prefill.name == "prefill_logits" and 0.5 < prefill.metrics["error_ratio"] <= 1.2


@pytest.mark.parametrize("args, message", [
    (["--tp", "4"], "cannot be split over --tp 4: num_attention_heads=6 is not divisible by 4"),
    (["--tp", "0"], "--tp must be at least 1"),
])
def test_bad_tp_is_a_usage_error(args, message):
    result = CliRunner().invoke(app, ["verify", str(FIXTURE), "--builtin", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_merged_weight_report_names_ranks_of_a_one_sided_problem():
    both = "model.norm.weight"
    merged = merge_weight_reports([WeightReport(partial_params=[both, "a"]), WeightReport(partial_params=[both])])
    assert merged.partial_params == [both, "a (rank 0 only)"]
    assert not merged.ok


# --- planted faults in the converted Llama, one HF reference shared ------------------------------------

DOWN_PROJ = 'bias=config.mlp_bias,\n            prefix=f"{prefix}.down_proj"'
NORM_EPS = 'eps=config.rms_norm_eps,\n            prefix=f"{prefix}.post_attention_layernorm"'
MLP_INIT = "        self.down_proj = RowParallelLinear("


@pytest.fixture(scope="module")
def converted_llama() -> str:
    import transformers.models.llama.modeling_llama as hf_llama

    return convert_file(hf_llama.__file__, model_type="llama").code


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    ckpt = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"))
    opts = VerifyOptions(target=str(ckpt), prompts=3, max_tokens=4, tp=2)
    hf_config = checkpoint.load_config(ckpt)
    with cpu_threads("cpu", ckpt):
        ref = reference_run(opts, ckpt, hf_config)
    return opts, ckpt, hf_config, ref


def verify_planted(shared, source: str, old: str, new: str, path: Path):
    opts, ckpt, hf_config, ref = shared
    assert source.count(old) == 1, "the converted file changed: cannot plant the fault"
    path.write_text(source.replace(old, new))
    with cpu_threads("cpu", ckpt):
        cls = resolve_model_class(hf_config, path)
        return check_engine(opts, ckpt, hf_config, cls, ModelSource(path, f"file:{path}"), ref)


def test_missing_all_reduce_is_a_tp_fault_located_at_the_mlp(shared, converted_llama, tmp_path):
    """down_proj without its all-reduce: right at TP=1, half the sum per rank at TP=2."""
    report = verify_planted(shared, converted_llama, DOWN_PROJ,
                            DOWN_PROJ.replace("prefix=", "reduce_results=False,\n            prefix="), tmp_path / "f.py")
    assert not report.passed and report.weights.ok
    assert report.divergence["module"] == "model.layers.0.mlp", report.localisation
    assert report.tp1["passed"] and report.tp1["localisation"] is None
    assert TP_FAULT_HINT in report.notes


def test_port_fault_fails_at_tp1_too_with_full_localisation(shared, converted_llama, tmp_path):
    report = verify_planted(shared, converted_llama, NORM_EPS, NORM_EPS.replace("config.rms_norm_eps", "1e-2"),
                            tmp_path / "f.py")
    assert not report.passed
    assert report.divergence["module"] == "model.layers.0.post_attention_layernorm"  # whole on rank 0
    assert not report.tp1["passed"]
    assert report.tp1["localisation"]["divergence"]["module"] == "model.layers.0.post_attention_layernorm"
    assert any("fails at TP=1 too" in n for n in report.notes)


def test_model_that_only_fails_to_build_on_ranks_reports_build_and_the_tp1_verdict(
        shared, converted_llama, tmp_path):
    report = verify_planted(shared, converted_llama, MLP_INIT,
                            "        from porter.engine.distributed import get_tp_world_size\n"
                            "        assert get_tp_world_size() == 1, 'planted: refuses to shard'\n" + MLP_INIT,
                            tmp_path / "f.py")
    assert [c.name for c in report.checks] == ["build"] and not report.passed
    assert "TP=2 engine did not start" in report.checks[0].detail
    assert "planted: refuses to shard" in report.checks[0].detail  # the worker's own error
    assert report.tp1["passed"] and TP_FAULT_HINT in report.notes


def test_rank_that_raises_mid_decode_stops_the_engine_and_the_report_says_so(shared, converted_llama, tmp_path):
    final_norm = "        hidden_states, _ = self.norm(hidden_states, residual)\n        return hidden_states\n"
    report = verify_planted(shared, converted_llama, final_norm,
                            "        from porter.engine.distributed import get_tp_rank\n"
                            "        from porter.engine.forward_context import get_forward_context\n"
                            "        if get_tp_rank() == 1 and get_forward_context().attn_metadata.max_query_len == 1:\n"
                            "            raise RuntimeError('planted: rank 1 fails in decode')\n" + final_norm,
                            tmp_path / "f.py")
    checks = {c.name: c for c in report.checks}
    assert not report.passed and not checks["greedy_tokens"].passed
    detail = checks["greedy_tokens"].detail
    assert detail.startswith("engine failed: rank 1 failed during 'execute': RuntimeError: planted: rank 1 fails")
    assert detail.endswith("(at f.py:%d)" % (final_norm_line(tmp_path / "f.py") - 1))  # the worker's frame
    stopped = "not run: the TP engine stopped when greedy_tokens failed"
    assert not checks["prefill_logits"].passed and checks["prefill_logits"].detail == stopped
    assert report.weights is None and f"weight report: {stopped}" in report.notes
    assert f"localisation under TP: {stopped}" in report.notes
    assert report.tp1["passed"] and TP_FAULT_HINT in report.notes


def final_norm_line(path: Path) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                if line.strip() == "hidden_states, _ = self.norm(hidden_states, residual)")
