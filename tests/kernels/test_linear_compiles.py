"""The persistent TMA SwiGLU GEMM (kernels/linear) compiles for sm_90 (Hopper) on a machine without
one, with and without the RMSNorm applied in its epilogue, at the block's FFN shape and the tiles the H200 sweep
chose (fp32: 128 x 256 x 32, bf16: 128 x 256 x 64; 8 warps, 3 stages): wgmma dots, no register
spills, shared memory within 227 KB. CPU CI runs Triton's compiler, so a change that would make
the kernel spill or overflow shared memory fails here (with this machine's Triton)."""

import pytest
import torch

from kernels.linear import kernel
from tests.kernels.sm90 import assert_fits, compile_sm90

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel runs on the GPU here")


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "rmsnorm"])
@pytest.mark.parametrize(("dtype", "block_k"), [("fp32", 32), ("bf16", 64)])
def test_tma_swiglu_compiles_for_sm90_without_spills(dtype, block_k, norm):
    fn = kernel._swiglu_tma
    bm, half = 128, kernel.HALF
    consts = {"SAVE": True, "PRECISION": "tf32" if dtype == "fp32" else "ieee", "UPCAST": False, "HALF": half}
    consts |= {"BLOCK_M": bm, "BLOCK_K": block_k, "GROUP_M": 8, "STAGES": 3, "DTYPE": dtype, "NORM": norm}
    blocks = {"XD": [bm, block_k], "WD": [2 * half, block_k], "OD": [bm, half], "GD": [bm, half], "UD": [bm, half]}

    def arg(a):
        if a in consts:
            return "constexpr"
        if a in blocks:
            return f"tensordesc<{dtype}{blocks[a]}>"
        return "*fp32" if a == "RSTD" else "i32"

    compiled = compile_sm90(fn, {a: arg(a) for a in fn.arg_names}, consts, 8)
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    if not assert_fits(compiled, fn.__name__):
        pytest.skip("no cuobjdump in this Triton wheel to read the register use")


@pytest.mark.parametrize("epilogue", ["residual", "rmsnorm"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_epilogue_gemm_compiles_for_sm90_without_spills(dtype, epilogue):
    """kernels/linear/gemm.py at its launcher's untuned tile (fp32: 128 x 256, bf16: the flattened
    128 x 128 loop; both with the epilogue in quarters): wgmma, no spills, fits."""
    from kernels.linear import gemm

    fn = gemm._gemm_tma
    bm, bn, bk, warps, stages, split, flat = gemm.TILES[{"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]][0]
    consts = {"PRECISION": "tf32" if dtype == "fp32" else "ieee", "UPCAST": False, "BLOCK_M": bm, "BLOCK_N": bn}
    consts |= {"BLOCK_K": bk, "GROUP_M": 8, "STAGES": stages, "SPLIT": split, "FLATTEN": flat, "DTYPE": dtype}
    consts |= {"HAS_RES": epilogue == "residual", "NORM": epilogue == "rmsnorm"}
    blocks = {"XD": [bm, bk], "WD": [bn, bk], "OD": [bm, bn // split]}

    def arg(a):
        if a in consts:
            return "constexpr"
        if a in blocks:
            return f"tensordesc<{dtype}{blocks[a]}>"
        return {"R": f"*{dtype}", "RSTD": "*fp32"}.get(a, "i32")

    compiled = compile_sm90(fn, {a: arg(a) for a in fn.arg_names}, consts, warps)
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    if not assert_fits(compiled, fn.__name__):
        pytest.skip("no cuobjdump in this Triton wheel to read the register use")


def test_autotuning_tries_the_tiles_of_the_operands_dtype():
    """The autotuner holds both dtypes' tiles; its pruning keeps the three of the call's dtype
    (fp32's would not fit bf16's sweep winners and the reverse), fp16 taking bf16's."""
    from kernels.linear import gemm

    configs = gemm._configs()
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.bfloat16)):
        kept = gemm._for_dtype(configs, {}, DTYPE=name)
        assert [gemm._tile(c) for c in kept] == gemm.TILES[dtype]
