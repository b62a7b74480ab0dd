"""Kernels: for each MM-Rec op family a folder with its plain-PyTorch reference (the oracle),
its Triton kernels where they exist, and its torch custom-op registration.

The entry points below are what the runtime calls. `linear_scan`, `gated_recurrence`,
`decay_recurrence` and the softmax of `hds_query` are `torch.ops.mmrec.*` custom ops: Triton on
CUDA, the reference elsewhere; with TRITON_INTERPRET=1 they run the Triton kernels on CPU
tensors through Triton's interpreter. `pointwise` runs a Triton kernel generated from its
expression (kernels/pointwise). kernels/library.py registers the custom ops and, for export,
lets every entry point run the plain bodies instead (`tracing_references`).
"""

from .checks import KernelInputError
from .config import knobs
from .decay.op import mdi_decay_fused, mdi_decay_logits
from .decay.reference import decay_gate, mdi_decay
from .linear.op import linear_residual, linear_swiglu, rms_linear, rms_linear_swiglu
from .memory.op import hds_query, memory_write, memory_write_
from .memory.reference import Memory, MemorySpec, reset_rows
from .nn.reference import moe, swiglu, uboo_loss
from .norm.op import add_rmsnorm, add_rstd, rmsnorm
from .pointwise.op import pointwise
from .recurrence.op import decay_recurrence, gated_recurrence
from .scan.op import linear_scan

__all__ = [
    "KernelInputError",
    "Memory",
    "MemorySpec",
    "add_rmsnorm",
    "add_rstd",
    "decay_gate",
    "decay_recurrence",
    "gated_recurrence",
    "hds_query",
    "knobs",
    "linear_residual",
    "linear_scan",
    "linear_swiglu",
    "mdi_decay",
    "mdi_decay_fused",
    "mdi_decay_logits",
    "memory_write",
    "memory_write_",
    "moe",
    "pointwise",
    "reset_rows",
    "rms_linear",
    "rms_linear_swiglu",
    "rmsnorm",
    "swiglu",
    "uboo_loss",
]
