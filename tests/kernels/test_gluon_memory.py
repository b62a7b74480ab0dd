"""The split backward's Gluon dk/dv kernel (kernels/memory/dkv_gluon.py).

Gluon has no interpreter, so on the CPU machine the kernel is compiled for sm_90 with the installed
Triton's own ptxas, and its SASS is checked for what the kernel exists for: the tensor-core
products left in flight across the softmax (a `WARPGROUP.DEPBAR.LE gsb0, 0x1` wait, which ptxas
drops when it serializes them). On a Hopper GPU it is compared elementwise with the Triton kernel,
the one the interpreter tests check against the reference."""

import pytest
import torch

import kernels
from kernels.memory import dkv_gluon
from kernels.memory import kernel as memory_kernel
from tests.kernels import sm90

needs_gluon = pytest.mark.skipif(dkv_gluon.gluon is None, reason="this Triton has no Gluon Hopper API")


def _compile_for_sm90(dtype: torch.dtype, dim: int):
    """The kernel compiled for sm_90 here (no GPU), with the launch's constexprs."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    try:
        from triton.experimental.gluon._runtime import GluonASTSource  # noqa: F401 (sm90.compile_sm90's)
        from triton.runtime.jit import mangle_type
    except ImportError as e:  # internals this test leans on moved
        pytest.skip(f"cannot compile Gluon ahead of time with this Triton: {e}")
    block_t, block_s, warps, stages, maxnreg = dkv_gluon.TILES
    elem = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    rows = torch.empty(2 * block_t, 4 * dim, dtype=dtype)
    desc = TensorDescriptor(
        rows,
        list(rows.shape),
        list(rows.stride()),
        [block_t, dim],
        gl.NVMMASharedLayout.get_default_for([block_t, dim], elem),
    )
    pointers = {"POS": torch.int64, "SPAN": torch.int64, "STATS": torch.float32}
    pointers |= dict.fromkeys(("START", "RING", "TILE_LEVEL", "TILE_I0"), torch.int32)
    consts = {
        "DH": dim, "BLOCK_T": block_t, "BLOCK_S": block_s, "STAGES": stages, "FOLD": dtype != torch.float16,
        "SKIP": True, "KV_SMEM": gl.NVMMASharedLayout.get_default_for([block_s, dim], elem), "num_warps": warps,
    }  # fmt: skip
    # A constexpr left out would be typed as a pointer below and compiled as one.
    unset = [p.name for p in dkv_gluon._dkv.params if p.is_constexpr and p.name not in consts]
    assert not unset, f"constexprs of _dkv this test does not set: {unset}"
    sig = {}
    for name in dkv_gluon._dkv.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("q_desc", "do_desc"):
            sig[name] = mangle_type(desc)
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        elif name in ("T", "n_slots", "n_levels", "HEADS", "GROUP"):
            sig[name] = "i32"
        else:
            sig[name] = mangle_type(torch.empty(1, dtype=pointers.get(name, dtype)))
    return sm90.compile_sm90(dkv_gluon._dkv, sig, consts, warps, **({"maxnreg": maxnreg} if maxnreg else {}))


@needs_gluon
@pytest.mark.parametrize(("dtype", "dim"), [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 32)])
def test_the_kernel_compiles_for_sm90_with_its_products_in_flight(dtype, dim):
    compiled = _compile_for_sm90(dtype, dim)
    listing = sm90.sass(compiled)
    if listing is None:
        pytest.skip("no cuobjdump beside this Triton")
    sm90.assert_fits(compiled, f"dk/dv {dtype} Dh {dim}")
    # Three walks (masked, unmasked, masked), each waiting for the logits with dp in flight and
    # for dp with dv in flight; serialized, every wait would be `gsb0, 0x0`.
    assert listing.count("WARPGROUP.DEPBAR.LE gsb0, 0x1") >= 6


def test_the_kernel_is_not_taken_where_it_cannot_run(monkeypatch):
    q = torch.zeros(1, 128, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels.knobs, "interpret", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dkv_gluon.supports(q, 64) == (dkv_gluon.gluon is not None)
    assert not dkv_gluon.supports(q[:, :100], 64)  # T not a multiple of the token tile
    assert not dkv_gluon.supports(q.float(), 64)
    assert not dkv_gluon.supports(q, 128)
    assert not dkv_gluon.usable(q, q, 64)  # CPU tensors
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))  # no wgmma
    assert not dkv_gluon.supports(q, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernels.knobs, "memory_gluon", False)
    assert not dkv_gluon.supports(q, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("bsz", "heads", "kv_heads", "dim", "steps", "slots", "offset", "dtype"),
    [
        (8, 16, 16, 64, 4096, (240, 240, 460), 0, torch.bfloat16),  # the benchmark's shape
        (8, 16, 16, 64, 4096, (240, 240, 460), 37, torch.float16),  # bands moving inside token tiles
        (2, 8, 2, 64, 256, (6, 5, 4), 0, torch.bfloat16),  # GQA, rings smaller than a slot tile
        (3, 4, 4, 32, 640, (100, 70), 5, torch.bfloat16),
        (2, 8, 4, 64, 320, (300, 20), None, torch.float16),  # early in the stream: slots below the floor
    ],
)
def test_gluon_dkv_equals_the_triton_kernel(bsz, heads, kv_heads, dim, steps, slots, offset, dtype, monkeypatch):
    from benchmarks.ab import memory_inputs

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is Hopper's")
    torch.manual_seed(0)
    spec = kernels.MemorySpec(heads=kv_heads, dim=dim, block=64, ratio=4, slots=slots)
    q, keys, values, beta, pos, rings, spans = memory_inputs(bsz, heads, steps, spec, dtype, "cuda", offset or 0)
    if offset is None:  # 260 blocks into the stream: level 0's local slots below 300 - 260 are seen by no
        pos.fill_(64 * 260 + 5)  # token, so whatever they hold (NaN here) must reach no gradient
        keys[:, :, :40], values[:, :, :40] = float("nan"), float("nan")
    dout = torch.randn_like(q)
    out, lse = memory_kernel.attend_fwd(q, keys, values, beta, pos, rings, spans, heads)
    monkeypatch.setattr(kernels.knobs, "memory_bwd", "split")
    grads = {}
    for gluon in (False, True):
        monkeypatch.setattr(kernels.knobs, "memory_gluon", gluon)
        assert dkv_gluon.usable(q, dout, dim) == gluon
        grads[gluon] = memory_kernel.attend_bwd(q, keys, values, beta, pos, rings, spans, out, lse, dout, heads)
    for name, a, b in zip(["dq", "dkeys", "dvalues", "dbeta"], grads[False], grads[True], strict=True):
        assert torch.isfinite(b).all() == torch.isfinite(a).all(), name
        # The same products and elementwise steps in the same order: equal bits where both ran.
        assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.2e}"
