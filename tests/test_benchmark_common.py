"""The benchmarks' shared helpers that run without a GPU: formatting and parsing."""

from __future__ import annotations

from benchmarks import common


def test_clock_samples_take_the_median_of_the_numeric_lines():
    lines = ["1785, 689.51", "[N/A], [N/A]", "clocks.sm [MHz], power.draw [W]", "1845, 700.00", "1800, 695.2", ""]
    assert common.clock_samples(lines) == (1800.0, 695.2)
    assert common.clock_samples(["[N/A], [N/A]"]) is None
    assert common.clock_samples([]) is None


def test_under_load_says_so_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    calls = []
    assert common.under_load(lambda: calls.append(1)) == "not sampled (no nvidia-smi)"
    assert not calls  # nothing ran


def test_spread_is_the_median_and_range():
    assert common.spread([1.06, 1.05, 1.2]) == "1.060x (1.050-1.200)"
