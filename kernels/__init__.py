"""Kernels: for each MM-Rec op a plain-PyTorch reference (the oracle), in `kernels/<op>/`.

The entry points below are what the runtime calls. Triton implementations registered as
torch custom ops take these names over per device as they land (issues #3, #4).
"""

from .gated_recurrence.reference import gated_recurrence
from .hds.reference import Memory, MemorySpec, hds_query, memory_write, reset_rows
from .linear_scan.reference import linear_scan
from .mdi_decay.reference import mdi_decay
from .nn.reference import moe, rmsnorm, swiglu, uboo_loss

__all__ = [
    "Memory",
    "MemorySpec",
    "gated_recurrence",
    "hds_query",
    "linear_scan",
    "mdi_decay",
    "memory_write",
    "moe",
    "reset_rows",
    "rmsnorm",
    "swiglu",
    "uboo_loss",
]
