"""What the TMA-fed persistent kernels (kernels/linear, kernels/decay) share: whether matrices can
go by tensor descriptors, and how many programs a persistent grid launches."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import knobs


def matrices_ok(*matrices: Tensor) -> bool:
    """TMA takes these 2-D tensors: Hopper or later (always under the interpreter), positive
    widths, unit inner strides, 16-byte aligned bases and rows."""
    if not knobs.interpret and torch.cuda.get_device_capability(matrices[0].device)[0] < 9:
        return False
    return all(
        t.shape[1] > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in matrices
    )


def programs(device: torch.device, tiles: int) -> int:
    """A persistent grid: one program per SM (4 under the interpreter), never more than tiles."""
    sms = 4 if knobs.interpret else torch.cuda.get_device_properties(device).multi_processor_count
    return min(sms, tiles)
