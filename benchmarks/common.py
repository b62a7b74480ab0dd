"""What every benchmark records and prints first: the device, versions, date and command."""

from __future__ import annotations

import datetime
import platform
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
