"""What every Triton kernel with `tl.dot` shares: the operand cast and the product precision."""

from __future__ import annotations

import triton
import triton.language as tl

from .config import fp32_dot_precision, knobs


@triton.jit
def operand(x, UPCAST: tl.constexpr):
    # Triton 3.8's interpreter returns garbage for bf16 tl.dot operands (docs/kernels.md).
    if UPCAST:
        x = x.to(tl.float32)
    return x


def dot_meta(dtype) -> dict:
    """PRECISION: exact fp32 under the interpreter, else torch's float32 matmul setting for fp32
    (config.fp32_dot_precision); UPCAST: fp32 operands under the interpreter."""
    return {"PRECISION": "ieee" if knobs.interpret else fp32_dot_precision(dtype), "UPCAST": knobs.interpret}


def tensor_cores(dtype) -> bool:
    """Whether a dot of `dtype` operands runs on tensor cores here: not for fp32 under torch's
    default "highest" precision (nor fp64), where Triton multiplies on the CUDA cores. Our GEMM
    kernels keep [128, 256] fp32 accumulators that only wgmma's register layout holds without
    spilling (exact fp32 compiled for sm_90: 2-8 KB of stack a thread), so there cuBLAS runs
    instead. Always true under the interpreter, which tests the kernels' logic in exact fp32."""
    return knobs.interpret or fp32_dot_precision(dtype) != "ieee"
