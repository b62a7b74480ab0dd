"""The decay kernels (kernels/decay) compile for sm_90 (Hopper) on a machine without one, at the
125M model's bottleneck (R = 192, as parts of 128 and 64) and the benchmark block's (R = 256, one
part) with the launch configs they use (TF32 products in fp32):
wgmma dots, no register spills, shared memory within the H100/H200's 227 KB. Triton's compiler
runs on the CPU, so CPU CI catches a config that would not fit (with this machine's Triton; the
GPU machine's may allocate differently)."""

import pytest
import torch

from kernels.decay import kernel
from tests.kernels.sm90 import assert_fits, compile_sm90

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run on the GPU here")

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _signature(fn, dtype: torch.dtype, cfg, hidden: int) -> tuple[dict, dict, int]:
    bm, bk, bn, warps, stages, n_stages = cfg
    lo, hi = kernel.hidden_split(hidden)
    consts = {"PRECISION": "tf32" if dtype == torch.float32 else "ieee", "UPCAST": False, "R_LO": lo}
    consts |= {"R_HI": hi or 16, "HAS_HI": hi > 0, "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}
    consts |= {"STAGES": stages, "N_STAGES": n_stages}
    hi = hi or 16
    blocks = {"XD": [bm, bk], "ZD": [bm, bk], "KD": [bm, bk], "OD": [bm, bn], "GD": [bm, bn]}
    for w in ("W1", "C1"):
        blocks |= {w + "LO": [lo, bk], w + "HI": [hi, bk]}
    for w in ("W2", "C2"):
        blocks |= {w + "LO": [bn, lo], w + "HI": [bn, hi]}
    name = DTYPES[dtype]

    def arg(a):
        if a in consts:
            return "constexpr"
        if a in blocks:
            return f"tensordesc<{name}{blocks[a]}>"
        if a in ("B1", "B2", "CB1", "CB2"):
            return f"*{name}"
        return "fp32" if a == "EPS" else "i32"

    return {a: arg(a) for a in fn.arg_names}, consts, warps


@pytest.mark.parametrize("hidden", [192, 256], ids=["R192-two-parts", "R256-one-part"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("which", ["mlp", "decay"])
def test_decay_kernels_compile_for_sm90_without_spills(which, dtype, hidden):
    fn, table = (kernel._mlp_fwd, kernel.MLP_CONFIGS) if which == "mlp" else (kernel._decay_fwd, kernel.DECAY_CONFIGS)
    signature, consts, warps = _signature(fn, dtype, table[dtype], hidden)
    compiled = compile_sm90(fn, signature, consts, warps)
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    if not assert_fits(compiled, fn.__name__):
        pytest.skip("no cuobjdump in this Triton wheel to read the register use")
