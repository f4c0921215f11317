"""`porter run` through the real CLI app: streams a completion, reports stats, fails cleanly."""
import json
import subprocess
import sys

from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from porter.cli import app
from porter.commands.run import bundled_fixture
from porter.engine import LLM, SamplingParams

runner = CliRunner()


def test_run_on_bundled_fixture_streams_the_greedy_completion():
    result = runner.invoke(app, ["run", "--prompt", "Once upon a time", "--max-tokens", "12", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    expected = LLM(model=bundled_fixture(), device="cpu").generate(
        ["Once upon a time"], SamplingParams(temperature=0, max_tokens=12))[0]
    first_line = result.output.splitlines()[0]
    assert first_line.startswith("Once upon a time")
    assert expected.outputs[0].text.strip() in first_line
    n = len(expected.outputs[0].token_ids)
    assert f"prompt tokens: {len(expected.prompt_token_ids)}, generated tokens: {n}" in result.output
    assert "tokens/s" in result.output


def test_run_sampling_with_seed_is_reproducible():
    args = ["run", str(bundled_fixture()), "-p", "The cat", "--max-tokens", "10", "--temperature", "1.0",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--ignore-eos", "--dtype", "float32"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.output
    assert "generated tokens: 10" in a.output
    assert a.output.splitlines()[0] == b.output.splitlines()[0]


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "missing"), "--prompt", "hi"])
    assert result.exit_code == 1
    assert "error:" in result.output and "not found" in result.output
    assert "Traceback" not in result.output


def test_unknown_architecture_and_bad_params_are_clear_errors(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["architectures"] = ["MysteryForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["run", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 1 and "MysteryForCausalLM" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["run", "--prompt", "hi", "--top-p", "0"])
    assert result.exit_code == 1 and "top_p" in result.output


def test_porter_run_as_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "porter.cli", "run", "--prompt", "The cat", "--max-tokens", "4",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The cat") and "generated tokens:" in proc.stdout


def test_custom_code_checkpoint_needs_trust_remote_code():
    custom = bundled_fixture().parent / "custom_model"
    args = ["run", str(custom), "--model-file", str(custom / "parallax_engine.py"), "-p", "The cat",
            "--tokenizer", str(bundled_fixture())]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "trust_remote_code" in refused.output
    # with it the model loads; this tokenizer's ids do not fit its 256-token vocabulary: one clear error
    loaded = runner.invoke(app, args + ["--trust-remote-code"])
    assert loaded.exit_code == 1 and "outside the vocabulary" in loaded.output
    assert "Traceback" not in loaded.output
