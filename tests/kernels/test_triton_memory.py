"""The Triton memory query (online softmax over every level's visible slots) vs the reference
and the naive loop: carried rings partly filled, rows at different positions, T not a multiple
of the block, more levels than filled slots, fp32 and bf16, every gradient, NaN-poisoned
outputs. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.memory import decode, dkv_gluon, kernel, op
from kernels.memory import reference as ref
from tests.conftest import TRITON_DEVICE, assert_close, deterministic
from tests.kernels.test_hds import HEADS, SPEC, build_history, naive_query

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)


def to_device(mem):
    return mem.map(lambda t: t.to(TRITON_DEVICE))


@pytest.mark.parametrize(
    ("chunks", "resets", "steps"), [([], {}, 37), ([13, 6], {0: [1]}, 23), ([30, 11], {1: [2]}, 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_query_matches_reference_forward_and_backward(chunks, resets, steps, dtype):
    mem, _, _ = build_history(chunks, resets, dtype=torch.float32)
    mem = to_device(mem.map(lambda t: t.to(dtype) if t.is_floating_point() else t))
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    q, k, v = (torch.randn(3, steps, d).to(TRITON_DEVICE, dtype).requires_grad_() for d in (qd, kd, kd))
    beta = torch.randn(HEADS, 3).to(TRITON_DEVICE, dtype).requires_grad_()
    out = kernels.hds_query(q, k, v, beta, mem, HEADS)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v, beta))

    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, beta)]
    mem64 = mem.map(lambda t: t.cpu().double() if t.is_floating_point() else t.cpu())
    expected = ref.hds_query(*cpu[:4], mem64, HEADS)
    expected_grads = torch.autograd.grad((expected * dout.cpu().double()).sum(), cpu)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    assert_close(out.cpu(), expected, what="m", **tol)
    for name, g, r in zip(["q", "k", "v", "beta"], grads, expected_grads, strict=True):
        assert_close(g.cpu(), r, what=f"d{name}", **tol)


@pytest.mark.parametrize("bwd", ["split", "fused"])
def test_residual_in_the_epilogue_is_added_once_and_takes_dout(bwd, monkeypatch):
    # fuse-residual-epilogue's form h + m (fp32 graphs only): the kernel adds h before its store,
    # and the backward takes h off the saved output again for delta (the split backward's dq
    # kernel, or the fused one's stats kernel); a wrong delta shows in dq, dk and dbeta (this
    # test fails with the subtraction left out).
    monkeypatch.setattr(kernels.knobs, "memory_bwd", bwd)
    dtype = torch.float32
    mem, _, _ = build_history([13, 6], {0: [1]}, dtype=torch.float32)
    mem = to_device(mem.map(lambda t: t.to(dtype) if t.is_floating_point() else t))
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    torch.manual_seed(1)
    q, k, v, h = (torch.randn(3, 23, d).to(TRITON_DEVICE, dtype).requires_grad_() for d in (qd, kd, kd, qd))
    beta = torch.randn(HEADS, 3).to(TRITON_DEVICE, dtype).requires_grad_()
    out = kernels.hds_query(q, k, v, beta, mem, HEADS, residual=h)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v, beta, h))

    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, beta, h)]
    mem64 = mem.map(lambda t: t.cpu().double() if t.is_floating_point() else t.cpu())
    expected = cpu[4] + ref.hds_query(*cpu[:4], mem64, HEADS)
    expected_grads = torch.autograd.grad((expected * dout.cpu().double()).sum(), cpu)
    assert_close(out.cpu(), expected, what="h + m", rtol=1e-4, atol=1e-5)
    for name, g, r in zip(["q", "k", "v", "beta", "h"], grads, expected_grads, strict=True):
        assert_close(g.cpu(), r, what=f"d{name}", rtol=1e-4, atol=1e-5)
    with pytest.raises(kernels.KernelInputError, match=rf"hds_query: residual: expected \[3, 23, {qd}\]"):
        kernels.hds_query(q, k, v, beta, mem, HEADS, residual=h[:, :, :7])


WIDE = kernels.MemorySpec(heads=2, dim=16, block=2, ratio=2, slots=(47, 31, 20))  # spans 2, 4, 8


@pytest.mark.parametrize(
    ("dtype", "tma", "bwd", "steps"),
    [(dt, tma, "auto", 45) for dt in (torch.float32, torch.bfloat16) for tma in (True, False)]
    + [(torch.float32, False, "split", 45), (torch.bfloat16, False, "fused", 45)]
    # T a multiple of the token tile: the dk/dv kernel's loads go unmasked (EVEN_T).
    + [(torch.float32, False, "auto", 48), (torch.float32, False, "split", 48), (torch.bfloat16, False, "fused", 48)]
    # fp16: the dk/dv kernel keeps ds unscaled (no scale folded into it, `_fold_scale`).
    + [(torch.float16, False, "fused", 48), (torch.float16, False, "split", 45)],
)
def test_wide_rings_skip_the_mask_only_where_every_token_sees_the_tile(dtype, tma, bwd, steps, monkeypatch):
    # Rings wider than the slot tiles (16 under the interpreter): a slot tile every token of the
    # token tile sees runs without the visibility mask, any other with it. Full rings of 47 and
    # 31 slots put a band edge one slot inside a tile; the rows start from empty, partly filled
    # and full rings; T (45) is not a multiple of the token tile, or is (48). Slot tiles by TMA (Dh 16 makes
    # 16-byte rows) and by pointer loads.
    # The backward: auto (here, fused for exact fp32, split for bf16) and the other one.
    monkeypatch.setattr(kernels.knobs, "memory_tma", tma)
    monkeypatch.setattr(kernels.knobs, "memory_bwd", bwd)
    torch.manual_seed(0)
    mem = kernels.Memory.empty(WIDE, 4)
    mem.keys, mem.values = [torch.randn_like(t) for t in mem.keys], [torch.randn_like(t) for t in mem.values]
    mem.sum_k, mem.sum_v = [torch.randn_like(t) for t in mem.sum_k], [torch.randn_like(t) for t in mem.sum_v]
    mem.pos = torch.tensor([0, 9, 61, 1000])
    kd, qd = WIDE.heads * WIDE.dim, HEADS * WIDE.dim
    inputs = [torch.randn(4, steps, d) for d in (qd, kd, kd)] + [torch.randn(HEADS, 3)]
    # The carried rings take gradients too: the dk/dv kernel's tiles over them are checked.
    inputs += [*mem.keys, *mem.values]
    dev = [t.to(TRITON_DEVICE, dtype).requires_grad_() for t in inputs]
    n = len(WIDE.slots)
    state = kernels.Memory(WIDE, dev[4 : 4 + n], dev[4 + n :], mem.sum_k, mem.sum_v, mem.pos)
    out = kernels.hds_query(*dev[:4], to_device(state), HEADS)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), dev)

    cpu = [t.detach().cpu().double().requires_grad_() for t in dev]
    sums = [t.double() for t in mem.sum_k], [t.double() for t in mem.sum_v]
    expected = ref.hds_query(*cpu[:4], kernels.Memory(WIDE, cpu[4 : 4 + n], cpu[4 + n :], *sums, mem.pos), HEADS)
    expected_grads = torch.autograd.grad((expected * dout.cpu().double()).sum(), cpu)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    assert_close(out.cpu(), expected, what="m", **tol)
    names = ["q", "k", "v", "beta"] + [f"{w} ring {lvl}" for w in "kv" for lvl in range(n)]
    for name, g, r in zip(names, grads, expected_grads, strict=True):
        if name == "beta" and dtype == torch.bfloat16:
            # A level's bias gradient sums ds = p (dp - delta) over every token and slot of the
            # level, terms that cancel, and delta comes from the bf16 output: elementwise it can
            # be off by several percent (6.7% here, with the probabilities rounded to bf16 for
            # the value product as on the GPU). Checked as a whole, as the GPU test checks it.
            err = ((g.cpu().double() - r).norm() / r.norm()).item()
            assert err < 4e-2, f"dbeta: relative error {err:.2e}"
            continue
        assert_close(g.cpu(), r, what=f"d{name}", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_split_backward_agree_and_deterministic_mode_repeats_bit_for_bit(dtype, monkeypatch):
    # The fused backward adds each slot tile's dq (and dbeta) in L2, by atomics or TMA
    # reductions, in whatever order the tiles come; under torch.use_deterministic_algorithms
    # auto takes the split backward, whose every gradient is the same bits from run to run
    # (its dbeta comes as per-program parts summed on the host, not by atomics). The
    # interpreter runs programs one after another, so there even atomics repeat: the bit-for-bit
    # check can fail only on a GPU.
    mem, _, _ = build_history([30, 11], {1: [2]}, dtype=torch.float32)
    mem = to_device(mem.map(lambda t: t.to(dtype) if t.is_floating_point() else t))
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    torch.manual_seed(3)
    q, k, v, dout = (torch.randn(3, 40, d).to(TRITON_DEVICE, dtype) for d in (qd, kd, kd, qd))
    beta = torch.randn(HEADS, 3).to(TRITON_DEVICE, dtype)
    cand = ref.candidates(mem, k, v)
    keys, values = cand.keys.contiguous(), cand.values.contiguous()
    levels = (list(SPEC.slots), [SPEC.span(lvl) for lvl in range(3)])
    out, lse = kernel.attend_fwd(q, keys, values, beta, mem.pos, *levels, HEADS)

    def grads():
        return kernel.attend_bwd(q, keys, values, beta, mem.pos, *levels, out, lse, dout, HEADS)

    monkeypatch.setattr(kernels.knobs, "memory_bwd", "fused-tma")
    fused = grads()
    monkeypatch.setattr(kernels.knobs, "memory_bwd", "auto")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    split, again = grads(), grads()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, a, b, c in zip(["q", "keys", "values", "beta"], fused, split, again, strict=True):
        assert_close(a.cpu(), b.cpu(), what=f"d{name}, fused vs split", **tol)
        assert torch.equal(b, c), f"d{name}: the split backward differs between two runs"


def test_backward_mode_rules(monkeypatch):
    q32, q16 = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16, dtype=torch.bfloat16)
    assert torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setattr(kernels.knobs, "memory_bwd", "auto")
    monkeypatch.setattr(kernels.knobs, "interpret", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    assert kernel._bwd_mode(q16, 64, 64) == 2  # bf16, T not a multiple of 64: fused by TMA reductions
    q16_64 = torch.zeros(1, 64, 16, dtype=torch.bfloat16)  # T 64: split, its dk/dv in Gluon (where Triton has it)
    assert kernel._bwd_mode(q16_64, 64, 64) == (0 if dkv_gluon.gluon is not None else 2)
    assert kernel._bwd_mode(q16_64, 128, 128) == 2  # Dh 128: not taken by the Gluon kernel
    monkeypatch.setattr(kernels.knobs, "memory_gluon", False)
    assert kernel._bwd_mode(q16_64, 64, 64) == 2
    monkeypatch.setattr(kernels.knobs, "memory_gluon", True)
    assert kernel._bwd_mode(q16, 48, 64) == 0  # Dh not a power of two: no TMA tile, so split
    assert kernel._bwd_mode(q32, 64, 64) == 1  # exact fp32: fused by atomics
    assert kernel._bwd_mode(q32.double(), 64, 64) == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # Ampere
    assert kernel._bwd_mode(q16, 64, 64) == 0
    assert kernel._bwd_mode(q32, 64, 64) == 1
    monkeypatch.setattr(kernels.knobs, "memory_bwd", "fused-tma")
    assert kernel._bwd_mode(q16, 64, 64) == 1  # forced: atomics where TMA reductions are missing
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernel._bwd_mode(q16, 64, 64) == 2
    assert kernel._bwd_mode(q16, 48, 64) == 1  # Dh not a power of two: no TMA tile
    monkeypatch.setattr(kernels.knobs, "memory_bwd", "fast")
    with pytest.raises(ValueError, match="MMREC_MEMORY_BWD='fast': expected auto, split, fused or fused-tma"):
        kernel._bwd_mode(q16, 64, 64)
    monkeypatch.setattr(kernels.knobs, "memory_bwd", "auto")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert kernel._bwd_mode(q32, 64, 64) == 0  # TF32: split


@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_mode_takes_the_split_backward_and_alerts_on_a_forced_fused_one(warn_only, monkeypatch):
    q32 = torch.zeros(1, 1, 16)
    monkeypatch.setattr(kernels.knobs, "interpret", True)
    with deterministic(warn_only):
        monkeypatch.setattr(kernels.knobs, "memory_bwd", "auto")
        assert kernel._bwd_mode(q32, 16, 16) == 0
        monkeypatch.setattr(kernels.knobs, "memory_bwd", "fused")
        if warn_only:
            with pytest.warns(UserWarning, match="MMREC_MEMORY_BWD=fused"):
                assert kernel._bwd_mode(q32, 16, 16) == 1
        else:
            with pytest.raises(RuntimeError, match="MMREC_MEMORY_BWD=fused"):
                kernel._bwd_mode(q32, 16, 16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on row 1's NaN
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_non_finite_slots_of_one_row_stay_in_that_row(tma, monkeypatch):
    # A slot tile loaded by TMA runs past the band into other rows' slots; those rows' NaN and
    # inf must not reach this row's output or gradients (0 * NaN in a product would).
    monkeypatch.setattr(kernels.knobs, "memory_tma", tma)
    torch.manual_seed(0)
    mem = kernels.Memory.empty(WIDE, 3)
    mem.keys, mem.values = [torch.randn_like(t) for t in mem.keys], [torch.randn_like(t) for t in mem.values]
    mem.pos = torch.tensor([1000, 1000, 1000])
    kd, qd = WIDE.heads * WIDE.dim, HEADS * WIDE.dim
    q, k, v = (torch.randn(3, 45, d, requires_grad=True) for d in (qd, kd, kd))
    beta = torch.randn(HEADS, 3)
    bad = mem.map(lambda t: t.clone())
    for lvl in range(len(WIDE.slots)):  # row 1: every ring slot NaN or inf
        bad.keys[lvl][1] = float("inf")
        bad.values[lvl][1] = float("nan")
    dev = [t.to(TRITON_DEVICE) for t in (q, k, v)]
    out = kernels.hds_query(*dev, beta.to(TRITON_DEVICE), to_device(bad), HEADS)
    grads = torch.autograd.grad(out[[0, 2]].sum(), dev)
    want = ref.hds_query(
        q.double(),
        k.double(),
        v.double(),
        beta.double(),
        mem.map(lambda t: t.double() if t.is_floating_point() else t),
        HEADS,
    )
    want_grads = torch.autograd.grad(want[[0, 2]].sum(), (q, k, v))
    assert_close(out[[0, 2]].cpu(), want[[0, 2]], rtol=1e-4, atol=1e-5, what="rows 0 and 2")
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        assert_close(g[[0, 2]].cpu(), w[[0, 2]], rtol=1e-4, atol=1e-5, what=f"d{name} of rows 0 and 2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_too_spread_for_the_fixed_shift_take_the_online_softmax(dtype):
    # The forward shifts every logit by level 0's first visible one and checks afterwards that no
    # probability left fp32's range. Row 1's query lines up with the level-2 ring's keys, 100
    # natural units (144 octaves) above anything level 0 shows: 2^(logit - shift) overflows, the
    # tile is walked again with the online softmax, and the result still matches the reference.
    # Rows 0 and 2 stay on the fixed shift.
    torch.manual_seed(0)
    mem = kernels.Memory.empty(WIDE, 3)
    mem.keys, mem.values = [torch.randn_like(t) for t in mem.keys], [torch.randn_like(t) for t in mem.values]
    mem.pos = torch.tensor([1000, 1000, 1000])
    kd, qd = WIDE.heads * WIDE.dim, HEADS * WIDE.dim
    q, k, v = (torch.randn(3, 45, d) for d in (qd, kd, kd))
    u = torch.nn.functional.normalize(torch.randn(WIDE.dim), dim=0)
    mem.keys[2][1] = 20 * u  # every level-2 slot of row 1, every memory head
    q[1] = (20 * u).repeat(HEADS)
    beta = torch.randn(HEADS, 3)
    mem = mem.map(lambda t: t.to(dtype) if t.is_floating_point() else t)
    q, k, v, beta = (t.to(dtype) for t in (q, k, v, beta))
    out = kernels.hds_query(*(t.to(TRITON_DEVICE) for t in (q, k, v, beta)), to_device(mem), HEADS).cpu()
    want = ref.hds_query(
        *(t.double() for t in (q, k, v, beta)), mem.map(lambda t: t.double() if t.is_floating_point() else t), HEADS
    )
    assert torch.isfinite(out).all()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    assert_close(out, want, what="m", **tol)


def test_tokens_whose_band_misses_the_first_slot_tile_take_the_online_softmax(monkeypatch):
    # With level-0 slots of one token, a 32-token tile's band moves past a 16-slot tile, so level
    # 0's first tile shows the late tokens nothing and gives them no shift. Their logits lie 40
    # octaves below 0: shifted by 0, their fp16 probabilities (2^-40) would round to 0 in the
    # value product while their fp32 sum stayed in range, and the output would be 0. Such rows
    # must take the online softmax. The probabilities are rounded to fp16 under the interpreter
    # too (only then upcast), so this runs the GPU's arithmetic.
    spec = kernels.MemorySpec(heads=1, dim=16, block=1, ratio=2, slots=(4, 2))
    real = kernel._tiles

    def tiles(kind, dtype, tma=False, block_d=64):
        return {**real(kind, dtype, tma, block_d), "BLOCK_T": 32, "BLOCK_S": 16}

    monkeypatch.setattr(kernel, "_tiles", tiles)
    torch.manual_seed(0)
    mem = kernels.Memory.empty(spec, 1)
    u = torch.nn.functional.normalize(torch.randn(spec.dim), dim=0)
    mem.keys = [torch.zeros_like(t) + 6 * u for t in mem.keys]
    mem.values = [torch.randn_like(t) for t in mem.values]
    mem.pos = torch.tensor([100])
    q = (-18.5 * u).repeat(1, 32, 1)  # every logit about -18.5 * 6 / sqrt(16) = -27.7 (-40 octaves)
    k = (6 * u).repeat(1, 32, 1) + 0.01 * torch.randn(1, 32, spec.dim)
    v = torch.randn(1, 32, spec.dim)
    beta = torch.zeros(1, 2)
    mem16 = mem.map(lambda t: t.half() if t.is_floating_point() else t)
    args = [t.half().to(TRITON_DEVICE) for t in (q, k, v, beta)]
    out = kernels.hds_query(*args, to_device(mem16), 1).cpu()
    want = ref.hds_query(
        *(t.half().double() for t in (q, k, v, beta)),
        mem16.map(lambda t: t.double() if t.is_floating_point() else t),
        1,
    )
    assert want[0, 20:].abs().amax() > 0.1  # the late tokens see slots, with weight
    assert_close(out, want, rtol=2e-2, atol=2e-2, what="m")


def test_triton_query_matches_the_naive_loop():
    mem, hist_k, hist_v = build_history([21], {}, dtype=torch.float32)
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    q, k, v = (torch.randn(3, 19, d) for d in (qd, kd, kd))
    beta = torch.randn(HEADS, 3)
    out = kernels.hds_query(
        q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), beta.to(TRITON_DEVICE), to_device(mem), HEADS
    ).cpu()
    for b in range(3):
        full_k, full_v = torch.cat([hist_k[b].float(), k[b]]), torch.cat([hist_v[b].float(), v[b]])
        assert_close(out[b], naive_query(q[b], full_k, full_v, beta, 21), rtol=1e-4, atol=1e-5, what=f"row {b}")


def test_rows_with_nothing_visible_are_zero_with_finite_gradients():
    mem = to_device(kernels.Memory.empty(SPEC, 2))
    q = torch.randn(2, 4, HEADS * SPEC.dim, device=TRITON_DEVICE, requires_grad=True)
    k = torch.randn(2, 4, SPEC.heads * SPEC.dim, device=TRITON_DEVICE, requires_grad=True)
    out = kernels.hds_query(q, k, k, torch.zeros(HEADS, 3, device=TRITON_DEVICE), mem, HEADS)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_launchers_write_every_element():
    mem, _, _ = build_history([9], {}, dtype=torch.float32)
    mem = to_device(mem)
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    q, k, v = (torch.randn(3, 29, d, device=TRITON_DEVICE) for d in (qd, kd, kd))
    cand = ref.candidates(mem, k, v)
    beta = torch.randn(HEADS, 3, device=TRITON_DEVICE)
    levels = (list(SPEC.slots), [SPEC.span(lvl) for lvl in range(3)])
    keys, values = cand.keys.contiguous(), cand.values.contiguous()
    out, lse = kernel.attend_fwd(q, keys, values, beta, mem.pos, *levels, HEADS)
    grads = kernel.attend_bwd(q, keys, values, beta, mem.pos, *levels, out, lse, torch.randn_like(out), HEADS)
    for t in (out, lse, *grads):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sums_kernel_matches_reference(dtype):
    # Rows at different positions (slot boundaries fall at different tokens), T not a multiple
    # of the span, widths not a multiple of the column block.
    pos = torch.tensor([0, 3, 17], device=TRITON_DEVICE)
    x = torch.randn(3, 29, 37).to(TRITON_DEVICE, dtype).requires_grad_()
    got = op.block_sums(x, pos, 4)
    want = ref.block_sums(x.detach().double(), pos, 4)
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="sums")
    grad = torch.randn_like(got)
    (dx,) = torch.autograd.grad((got * grad).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (want_dx,) = torch.autograd.grad((ref.block_sums(x64, pos, 4) * grad.double()).sum(), x64)
    assert_close(dx, want_dx, rtol=1e-2, atol=1e-2, what="dx")


@pytest.mark.parametrize(("chunks", "resets"), [([], {}), ([13, 6], {0: [1]}), ([30, 11], {1: [2]}), ([200], {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_reads_the_rings_like_the_segment_query(chunks, resets, dtype):
    # Empty, partly filled and full rings, rows at different positions; one token per row.
    mem, _, _ = build_history(chunks, resets, dtype=torch.float32)
    mem = to_device(mem.map(lambda t: t.to(dtype) if t.is_floating_point() else t))
    q = torch.randn(3, 1, HEADS * SPEC.dim).to(TRITON_DEVICE, dtype)
    k = torch.randn(3, 1, SPEC.heads * SPEC.dim).to(TRITON_DEVICE, dtype)
    beta = torch.randn(HEADS, 3).to(TRITON_DEVICE, dtype)
    mem64 = mem.map(lambda t: t.cpu().double() if t.is_floating_point() else t.cpu())
    want = ref.hds_query(q.cpu().double(), k.cpu().double(), k.cpu().double(), beta.cpu().double(), mem64, HEADS)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    spans = [SPEC.span(lvl) for lvl in range(3)]
    for splits in (1, 2, 3):  # one launch, and split + combine (a split may own no filled slot)
        got = decode.decode(q, mem.keys, mem.values, beta, mem.pos, spans, HEADS, n_splits=splits)
        assert_close(got.cpu(), want, what=f"m with {splits} splits", **tol)
    with torch.no_grad():  # the entry point takes the decode path for T = 1 without gradients
        assert_close(kernels.hds_query(q, k, k, beta, mem, HEADS).cpu(), want, what="hds_query T=1", **tol)


@pytest.mark.parametrize(("chunks", "resets"), [([], {}), ([13, 6], {0: [1]}), ([200], {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_decode_write_equals_the_functional_write(chunks, resets, dtype):
    # 37 tokens one per call, rows at different positions: slots of every level complete
    # (spans 4, 8, 16) into empty, partly filled and full rings; every tensor bit for bit (on
    # CUDA; Triton's interpreter rounds fp32 -> bf16 differently from torch, so there 1 ulp).
    mem, _, _ = build_history(chunks, resets, dtype=torch.float32)
    mem = to_device(mem)
    mem.keys, mem.values = [t.to(dtype) for t in mem.keys], [t.to(dtype) for t in mem.values]  # sums stay fp32
    want = mem.map(lambda t: t.clone())
    width = SPEC.heads * SPEC.dim
    for _ in range(37):
        k, v = (torch.randn(3, 1, width).to(TRITON_DEVICE, dtype) for _ in range(2))
        want = ref.memory_write(want, k, v)
        with torch.no_grad():
            assert kernels.memory_write_(mem, k, v) is mem
    for name, got in mem.tensors().items():
        if dtype == torch.float32 or TRITON_DEVICE == "cuda" or not got.is_floating_point():
            assert torch.equal(got, want.tensors()[name]), name
        else:
            assert_close(got, want.tensors()[name], rtol=8e-3, atol=0, what=name)
