"""The generated pointwise kernels compile for the GPU (sm_90, Hopper) on a machine without one:
Triton's compiler runs on the CPU, so code the interpreter accepts and the compiler would reject
fails here, in CPU CI, and the kernels stay free of register spills."""

import pytest
import torch

from kernels.pointwise import kernel
from mmrec_ir.pointwise import parse_expr
from tests.kernels.sm90 import assert_fits, compile_sm90

# A stand-in for CPU CI: on a GPU machine the kernels themselves run (test_triton_pointwise.py).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run on the GPU here")


def _compile(fn, dtype: str, blocks: dict):
    ints = {"M", "N", "SG"} | {a for a in fn.arg_names if a[0] == "S" and a[1:].isdigit()}
    sig = {a: "constexpr" if a in blocks else ("i32" if a in ints else f"*{dtype}") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    return compile_sm90(fn, sig, blocks, num_warps=4, attrs=attrs)


EXPRS = ["mul(silu(%0), %1)", "scale(gelu(sub(exp(neg(%0)), log(clamp(%1, min=0.1, max=inf)))), factor=-0.5)"]


# the contiguous launch (one row) and a strided one of narrow rows (64 rows of 16 columns a tile)
BLOCKS = [{"BLOCK_M": 1, "BLOCK_N": kernel.BLOCK}, {"BLOCK_M": 64, "BLOCK_N": 16}]


@pytest.mark.parametrize("blocks", BLOCKS, ids=["one-row", "strided-rows"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("text", EXPRS)
def test_generated_kernels_compile_for_sm90_without_spills(text, dtype, blocks):
    expr = parse_expr(text)
    module = kernel.compiled(expr, len(expr.inputs()))
    for fn in (module.pointwise_kernel, module.pointwise_backward):
        compiled = _compile(fn, dtype, blocks)
        assert "ld.global" in compiled.asm["ptx"] and "st.global" in compiled.asm["ptx"]
        # local memory only: the narrow strided form's backward keeps 8 bytes of stack (Triton 3.9)
        assert_fits(compiled, fn.__name__, stack=False)
