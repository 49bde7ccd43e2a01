"""Decode-stage memory does not grow with file length (benchmarks/memory.py, run at two lengths)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("memory_bench", Path(__file__).parents[1] / "benchmarks" / "memory.py")
memory_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_bench)


def test_peak_memory_is_bounded_for_long_files(capsys):
    short = memory_bench.main(["--minutes", "15"])
    long = memory_bench.main(["--minutes", "60"])
    print(capsys.readouterr().out)
    # a design that holds the decoded file would grow by >= 220 MB more for the hour than for 15 minutes
    assert long["growth_mb"] - short["growth_mb"] < 50
    assert long["growth_mb"] < 0.75 * long["waveform_float32_mb"]
    assert long["windows"] >= 120
