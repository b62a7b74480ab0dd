"""What every benchmark records and prints first: the device, versions, date and command."""

from __future__ import annotations

import datetime
import platform
import statistics
import sys

import torch
import triton


def run_info(script: str) -> dict[str, str]:
    """Exits with a one-line message without CUDA; otherwise prints and returns the run's facts."""
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device")
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "python": platform.python_version(),
    }
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return info


def checked_time(label: str, make, bench, tol: float) -> float | None:
    """Time one sweep config: `make()` -> (run, got, want). The config runs once and is checked
    against `want` (relative error < tol) before it is timed; a wrong or failing config is
    printed and gives None, so one bad tile does not end a sweep."""
    try:
        run, got, want = make()
        run()
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        if not err < tol:
            print(f"  {label}: WRONG (rel err {err:.1e})", flush=True)
            return None
        return bench(run)
    except Exception as e:  # a config that does not compile (registers, shared memory) is reported
        print(f"  {label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
        return None


def graph_time(fn, bench) -> float:
    """Median ms (by `bench`) of one CUDA-graph replay of fn, warmed up outside the capture: GPU
    time without the host's launch gaps, which wall-clock timings of small calls include."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles, fills caches
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def spread(ratios: list[float]) -> str:
    """Ratios of alternating rounds as their median and range: "1.053x (1.052-1.059)"."""
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"
