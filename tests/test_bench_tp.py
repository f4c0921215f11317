"""benchmarks/bench_tp.py's CPU-side parts: arguments and the printed table (the runs need 2 GPUs)."""
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_tp(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/bench_tp.py` sees it
    monkeypatch.delitem(sys.modules, "bench_tp", raising=False)
    import bench_tp

    return bench_tp


def test_arguments(bench_tp):
    args = bench_tp.parse_args(["--model-file", "q.py"])
    assert args.requests == [64, 256] and args.decode_steps == 256 and not args.enforce_eager
    assert bench_tp.parse_args(["--model-file", "q.py", "--requests", "8"]).requests == [8]
    for bad in (["--requests", "64"], ["--model-file", "q.py", "--requests", "0"]):
        with pytest.raises(SystemExit):
            bench_tp.parse_args(bad)


def test_table_ratios_errors_and_decode_floors(bench_tp):
    results = {
        "copy_bandwidth_GBps": 3000.0,
        "requests_64": {"tp1_tok_s": 4000.0, "tp2_tok_s": 5000.0},
        "requests_256": {"tp1_tok_s": 12000.0, "tp2_error": "WorkerDiedError: rank 1 was killed"},
        "tp1_batch1_decode": {"step_ms": 1.5, "floor_ms": 0.4, "ratio": 3.75, "max_rank_weight_bytes": 1200 * 2**20},
        "tp2_batch1_decode": {"step_ms": 1.25, "floor_ms": 0.2, "ratio": 6.25, "max_rank_weight_bytes": 600 * 2**20},
    }
    lines = bench_tp.format_table(results).splitlines()
    assert lines[0].split() == ["requests", "TP1", "tok/s", "TP2", "tok/s", "TP2/TP1"]
    assert lines[1].split() == ["64", "4000", "5000", "1.25"]
    assert lines[2].split() == ["256", "12000", "-", "-"]
    assert lines[3] == "  tp2 error: WorkerDiedError: rank 1 was killed"
    assert lines[4] == "batch-1 decode step TP1: 1.500 ms, floor 0.400 ms (largest rank 1200 MiB), ratio 3.75x"
    assert lines[5].startswith("batch-1 decode step TP2: 1.250 ms, floor 0.200 ms (largest rank 600 MiB)")
    assert "3000 GB/s" in lines[6]


def test_record_takes_the_decode_floor_from_the_largest_rank(bench_tp, capsys):
    results, entry = {}, {}
    r = {"tok_s": 900.0, "tokens": 90, "seconds": 0.1, "decode_step_s": 0.002,
         "weight_bytes_per_rank": [100_000_000, 120_000_000]}
    bench_tp.record(results, entry, 64, 2, r, bw=1e11)
    assert entry == {"tp2_tok_s": 900.0}
    decode = results["tp2_batch1_decode"]
    assert decode["floor_ms"] == pytest.approx(1.2) and decode["ratio"] == pytest.approx(2 / 1.2)
    assert "requests=64 TP=2: 900 tok/s" in capsys.readouterr().out
