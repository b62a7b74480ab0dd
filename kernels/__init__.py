"""Kernels: for each MM-Rec op family a folder with its plain-PyTorch reference (the oracle),
its Triton kernels where they exist, and its torch custom-op registration.

The entry points below are what the runtime calls. `linear_scan`, `gated_recurrence` and the
softmax of `hds_query` are `torch.ops.mmrec.*` custom ops: Triton on CUDA, the reference
elsewhere; with TRITON_INTERPRET=1 they run the Triton kernels on CPU tensors through Triton's
interpreter.
"""

from .checks import KernelInputError
from .config import knobs
from .decay.reference import mdi_decay
from .memory.op import hds_query, memory_write, memory_write_
from .memory.reference import Memory, MemorySpec, reset_rows
from .nn.reference import moe, rmsnorm, swiglu, uboo_loss
from .recurrence.op import gated_recurrence
from .scan.op import linear_scan

__all__ = [
    "KernelInputError",
    "Memory",
    "MemorySpec",
    "gated_recurrence",
    "hds_query",
    "knobs",
    "linear_scan",
    "mdi_decay",
    "memory_write",
    "memory_write_",
    "moe",
    "reset_rows",
    "rmsnorm",
    "swiglu",
    "uboo_loss",
]
