"""The memory query's forward (kernels/memory) compiled for sm_90 (Hopper) on a machine without
one, at its launcher's bf16 tile: what its speed rests on, checked in the code the compiler
writes (with this machine's Triton; the device's may differ). Its fixed-shift walk must run
wgmma products with no shuffle (the row sums kept in parts, `_row_parts`) and no spill inside a
loop; the CUDA-core walk (exact fp32) no spill inside a loop either."""

import pytest
import torch

from kernels.memory import kernel
from tests.kernels.sm90 import compile_sm90, sass_loops

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel runs on the GPU here")

TYPES = {"POS": "*i64", "LSE": "*fp32", "qk_scale": "fp32"}
SIZES = ("T", "n_slots", "HEADS")


def compile_forward(dtype: torch.dtype, precision: str):
    """`_attend_fwd` at the tiles and register cap its launcher takes for `dtype` (`_tiles`)."""
    fn = kernel._attend_fwd
    tiles = kernel._tiles("fwd", dtype)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    consts = {"DH": 64, "BLOCK_D": 64, "PRECISION": precision, "UPCAST": False, "TMA": False, "HAS_RES": False}
    consts |= {"BLOCK_T": tiles["BLOCK_T"], "BLOCK_S": tiles["BLOCK_S"], "GROUP": 1}
    consts |= {"RINGS": (240, 240, 460), "SPANS": (64, 256, 1024)}  # the benchmark's levels
    signature = {
        a: "constexpr" if a in consts else "i32" if a in SIZES else TYPES.get(a, f"*{name}") for a in fn.arg_names
    }
    # 16-byte aligned pointers and sizes, as the launcher's tensors give.
    attrs = {
        (k,): [["tt.divisibility", 16]]
        for k, a in enumerate(fn.arg_names)
        if (signature[a].startswith("*") and a != "POS") or a in ("T", "n_slots", "HEADS")
    }
    options = {"num_stages": tiles["num_stages"], **({"maxnreg": tiles["maxnreg"]} if tiles["maxnreg"] else {})}
    return compile_sm90(fn, signature, consts, tiles["num_warps"], attrs, **options)


def test_bf16_forward_walk_has_no_shuffle_and_no_spill_in_its_loops():
    compiled = compile_forward(torch.bfloat16, "tf32")
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    loops = sass_loops(compiled)
    if loops is None:
        pytest.skip("no cuobjdump in this Triton wheel to read the SASS")
    # The fixed-shift walk's loops: tensor-core products and no running max (FMNMX); the online
    # fallback's loops take a max, whose shuffles are its own.
    walk = [ops for ops in loops if any(o.startswith("HGMMA") for o in ops) and "FMNMX" not in ops]
    assert walk, f"no fixed-shift loop found among {len(loops)} loops"
    for ops in walk:
        assert "SHFL" not in " ".join(ops), f"a shuffle in the fixed-shift walk ({len(ops)} instructions)"
        assert not {"LDL", "STL"} & set(ops), f"a spill in the fixed-shift walk ({len(ops)} instructions)"


def test_exact_fp32_forward_has_no_spill_in_its_loops():
    # Its products on the CUDA cores: one masked loop a level and plain row sums. A first form
    # with the tensor-core walk's whole and half tiles spilled in its loops under Triton 3.6 (the
    # device's); this machine's Triton may compile either form without a spill.
    compiled = compile_forward(torch.float32, "ieee")
    assert "wgmma" not in compiled.asm["ptx"]
    loops = sass_loops(compiled)
    if loops is None:
        pytest.skip("no cuobjdump in this Triton wheel to read the SASS")
    for ops in loops:
        assert not {"LDL", "STL"} & set(ops), f"a spill in a loop of {len(ops)} instructions"


def test_forward_tiles_follow_the_row_width():
    # 128-token programs where a row fits 64 columns (session 33, BENCHMARKS.md); wider rows keep
    # 64-token programs (a 128 x 128 fp32 accumulator alone is 128 registers a thread); opt-in TMA
    # keeps its own tiles at any width.
    assert kernel._tiles("fwd", torch.bfloat16, False, 64)["BLOCK_T"] == 128
    assert kernel._tiles("fwd", torch.float16, False, 32)["maxnreg"] == 168
    assert kernel._tiles("fwd", torch.bfloat16, False, 128)["BLOCK_T"] == 64
    assert kernel._tiles("fwd", torch.bfloat16, True, 128) == kernel._tiles("fwd", torch.bfloat16, True, 64)
    assert kernel._tiles("dq", torch.bfloat16, False, 128) == kernel._tiles("dq", torch.bfloat16, False, 64)
