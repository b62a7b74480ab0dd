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
