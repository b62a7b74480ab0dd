"""What every benchmark records and prints first: the device, versions, date and command."""

from __future__ import annotations

import datetime
import platform
import shutil
import statistics
import subprocess
import sys
import time

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


def clock_samples(lines: list[str]) -> tuple[float, float] | None:
    """Median SM clock (MHz) and board power (W) from `nvidia-smi --query-gpu=clocks.sm,power.draw
    --format=csv,noheader,nounits` lines ("1785, 689.51"); lines that are not two numbers (a
    header, "[N/A]") are left out. None if no line is."""
    clocks, watts = [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            clock, power = (float(p) for p in parts)
        except ValueError:  # not two numbers
            continue
        clocks.append(clock)
        watts.append(power)
    return (statistics.median(clocks), statistics.median(watts)) if clocks else None


def sustained(fn, seconds: float = 2.0) -> tuple[float, float, float] | str:
    """fn run back to back for `seconds` while nvidia-smi samples the SM clock and the board power
    every 100 ms -> (us a call, median MHz, median W), or a one-line reason where they cannot be
    sampled (then fn does not run). Under the board's power cap a kernel that spends more energy
    gets a lower clock (the memory forward: 1770-1785 against cuDNN's 1845-1860 MHz, BENCHMARKS.md
    session 33), which a ratio of times alone does not show; training runs in this regime."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "not sampled (no nvidia-smi)"
    # nvidia-smi numbers GPUs its own way (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER): name it by UUID.
    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    if uuid is None:
        return "not sampled (this torch gives no device UUID)"
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    query = [smi, "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "100",
             "-i", f"GPU-{uuid}"]  # fmt: skip
    proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, calls = time.monotonic(), 0
    start.record()
    while time.monotonic() - t0 < seconds:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    proc.terminate()
    out, _ = proc.communicate()
    sampled = clock_samples(out.splitlines()[3:])  # the first samples catch the clock's ramp
    if sampled is None:
        return "not sampled (nvidia-smi gave no clock)"
    return start.elapsed_time(end) / calls * 1e3, *sampled


def under_load(fn, seconds: float = 2.0) -> str:
    """`sustained` as a line: "340.1 us a call at 1845 MHz, 690 W"."""
    got = sustained(fn, seconds)
    if isinstance(got, str):
        return got
    return f"{got[0]:.1f} us a call at {got[1]:.0f} MHz, {got[2]:.0f} W"
