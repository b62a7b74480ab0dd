import math

import pytest
import torch

from kernels import KernelInputError, Memory, MemorySpec, hds_query, memory_write, memory_write_, reset_rows
from tests.conftest import assert_close

SPEC = MemorySpec(heads=2, dim=3, block=4, ratio=2, slots=(3, 2, 2))  # spans 4, 8, 16 tokens
HEADS = 4  # two query heads per memory head


def naive_slots(k_hist, level, spec):
    """Completed slots of one level for one row, by SPEC's literal definition: level 0 is the
    mean of c tokens, level l the mean of R level-(l-1) slots."""
    if level == 0:
        n = k_hist.shape[0] // spec.block
        return [k_hist[s * spec.block : (s + 1) * spec.block].mean(0) for s in range(n)]
    lower = naive_slots(k_hist, level - 1, spec)
    return [torch.stack(lower[s * spec.ratio : (s + 1) * spec.ratio]).mean(0) for s in range(len(lower) // spec.ratio)]


def naive_query(q_seg, k_hist, v_hist, beta, start, spec=SPEC, heads=HEADS):
    """One row: tokens start..start+T-1 query the memory built from k_hist/v_hist [N, K*Dh]
    (every token since reset). Per token, per head, an explicit softmax over visible slots."""
    group = heads // spec.heads
    out = []
    for t in range(q_seg.shape[0]):
        a = start + t
        visible = []
        for level, ring in enumerate(spec.slots):
            keys = naive_slots(k_hist[:a], level, spec)
            values = naive_slots(v_hist[:a], level, spec)
            n = a // spec.span(level)
            visible += [(level, keys[s], values[s]) for s in range(max(0, n - ring), n)]
        row = []
        for h in range(heads):
            qh = q_seg[t, h * spec.dim : (h + 1) * spec.dim]
            mh = h // group
            if not visible:
                row.append(torch.zeros(spec.dim, dtype=q_seg.dtype))
                continue
            logits = torch.stack(
                [
                    qh @ key.view(spec.heads, spec.dim)[mh] / math.sqrt(spec.dim) + beta[h, lvl]
                    for lvl, key, _ in visible
                ]
            )
            weights = torch.softmax(logits, 0)
            row.append(
                sum(w * val.view(spec.heads, spec.dim)[mh] for w, (_, _, val) in zip(weights, visible, strict=True))
            )
        out.append(torch.cat(row))
    return torch.stack(out)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def build_history(chunks, reset_after, bsz=3, dtype=torch.float64):
    """Write chunks of tokens into a fresh memory; reset the rows listed after chunk i.
    Returns the memory and, per row, the keys/values it has seen since its last reset."""
    kd = SPEC.heads * SPEC.dim
    mem = Memory.empty(SPEC, bsz, dtype=dtype)
    hist_k = [torch.zeros(0, kd, dtype=dtype) for _ in range(bsz)]
    hist_v = [torch.zeros(0, kd, dtype=dtype) for _ in range(bsz)]
    for i, steps in enumerate(chunks):
        k, v = rand(bsz, steps, kd, dtype=dtype), rand(bsz, steps, kd, dtype=dtype)
        mem = memory_write(mem, k, v)
        for b in range(bsz):
            hist_k[b], hist_v[b] = torch.cat([hist_k[b], k[b]]), torch.cat([hist_v[b], v[b]])
        for b in reset_after.get(i, []):
            mask = torch.zeros(bsz, dtype=torch.bool)
            mask[b] = True
            mem = reset_rows(mem, mask)
            hist_k[b], hist_v[b] = hist_k[b][:0], hist_v[b][:0]
    return mem, hist_k, hist_v


@pytest.mark.parametrize(
    ("chunks", "resets", "steps"),
    [
        ([], {}, 37),  # empty memory, T not a multiple of the block
        ([13], {}, 23),  # partial block carried in
        ([13, 6], {0: [1]}, 23),  # rows at different positions after a reset
        ([30, 11], {1: [2]}, 1),  # single-token decode, rings full on some levels
        ([5], {}, 70),  # the segment fills every level itself
    ],
)
def test_query_matches_the_naive_loop_forward_and_backward(chunks, resets, steps):
    mem, hist_k, hist_v = build_history(chunks, resets)
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    q = rand(3, steps, qd).requires_grad_()
    k = rand(3, steps, kd).requires_grad_()
    v = rand(3, steps, kd).requires_grad_()
    beta = rand(HEADS, len(SPEC.slots)).requires_grad_()
    out = hds_query(q, k, v, beta, mem, HEADS)
    grad_out = rand(*out.shape)
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v, beta))

    expected = []
    for b in range(3):
        start = hist_k[b].shape[0]
        assert int(mem.pos[b]) == start
        full_k, full_v = torch.cat([hist_k[b], k[b]]), torch.cat([hist_v[b], v[b]])
        expected.append(naive_query(q[b], full_k, full_v, beta, start))
    expected = torch.stack(expected)
    assert_close(out, expected, rtol=1e-10, atol=1e-12, what="m")
    ref = torch.autograd.grad((expected * grad_out).sum(), (q, k, v, beta))
    for name, g, r in zip(["q", "k", "v", "beta"], grads, ref, strict=True):
        assert_close(g, r, rtol=1e-9, atol=1e-11, what=f"d{name}")


def test_rows_without_visible_slots_give_zero_and_finite_gradients():
    mem = Memory.empty(SPEC, 2, dtype=torch.float64)
    q = rand(2, 4, HEADS * SPEC.dim).requires_grad_()
    k = rand(2, 4, SPEC.heads * SPEC.dim).requires_grad_()
    out = hds_query(q, k, k, torch.zeros(HEADS, 3, dtype=torch.float64), mem, HEADS)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_at_once_equals_token_by_token(dtype):
    """Parallel form == the decode path (query then write, one token per call), state carried."""
    mem0, _, _ = build_history([9, 5], {0: [0]}, dtype=torch.float32)
    kd, qd, steps = SPEC.heads * SPEC.dim, HEADS * SPEC.dim, 45
    q, k, v = (rand(3, steps, d, dtype=torch.float32).to(dtype) for d in (qd, kd, kd))
    beta = rand(HEADS, 3, dtype=torch.float32).to(dtype)
    parallel = hds_query(q, k, v, beta, mem0, HEADS)
    mem_parallel = memory_write(mem0, k, v)

    mem, outs = mem0, []
    for t in range(steps):
        outs.append(hds_query(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], beta, mem, HEADS))
        mem = memory_write(mem, k[:, t : t + 1], v[:, t : t + 1])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert_close(torch.cat(outs, 1), parallel, what="m", **tol)
    assert torch.equal(mem.pos, mem_parallel.pos)
    for level in range(3):
        assert_close(mem.keys[level], mem_parallel.keys[level], what=f"ring keys level {level}", **tol)
        assert_close(mem.sum_v[level], mem_parallel.sum_v[level], what=f"running sum level {level}", **tol)


def test_one_hot_slot_sums_equal_index_add():
    """The export-only lowering of the memory write's slot sums (`one_hot_sums`, for TensorRT)
    writes the same memory as index_add, over a segment that completes blocks of every level."""
    from kernels.config import knobs
    from kernels.memory import reference

    mem0, _, _ = build_history([9, 5], {0: [0]}, dtype=torch.float32)
    k, v = (rand(3, 150, SPEC.heads * SPEC.dim, dtype=torch.float32) for _ in range(2))
    plain = memory_write(mem0, k, v)
    with reference.one_hot_sums():
        hot = memory_write(mem0, k, v)
    assert not knobs.one_hot_sums
    for level in range(3):
        for name in ("keys", "values", "sum_k", "sum_v"):
            a, b = getattr(plain, name)[level], getattr(hot, name)[level]
            assert_close(b, a, what=f"{name} level {level}", rtol=1e-6, atol=1e-6)


def test_reset_rows_clears_only_those_rows():
    mem, _, _ = build_history([21], {})
    cleared = reset_rows(mem, torch.tensor([False, True, False]))
    assert cleared.pos.tolist() == [21, 0, 21]
    assert torch.equal(cleared.keys[0][1], torch.zeros_like(cleared.keys[0][1]))
    assert torch.equal(cleared.keys[0][0], mem.keys[0][0])


def test_in_place_write_rejects_a_segment_and_autograd():
    mem = Memory.empty(SPEC, 2)
    width = SPEC.heads * SPEC.dim
    with pytest.raises(ValueError, match=r"memory_write_: expected k and v \[B, 1, 6\]"):
        memory_write_(mem, torch.zeros(2, 3, width), torch.zeros(2, 3, width))
    k = torch.zeros(2, 1, width, requires_grad=True)
    with pytest.raises(ValueError, match="under autograd"):
        memory_write_(mem, k, k)


def test_a_memory_without_levels_is_refused():
    spec = MemorySpec(heads=2, dim=3, block=4, ratio=2, slots=())
    q, k, v = torch.randn(1, 5, HEADS * 3), torch.randn(1, 5, 6), torch.randn(1, 5, 6)
    with pytest.raises(KernelInputError, match=r"hds_query: the memory has no levels"):
        hds_query(q, k, v, torch.zeros(HEADS, 0), Memory.empty(spec, 1), HEADS)


def test_the_attention_backward_builds_no_zero_gradient_for_the_lse():
    """lse, hds_attend_fwd's second output, is not differentiable: autograd must hand the backward
    None for it, not a zero tensor it fills first (a memset of B*H*T floats per call on the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels.memory import reference

    spec = MemorySpec(heads=2, dim=16, block=4, ratio=2, slots=(3, 2))
    mem = Memory.empty(spec, 2)
    q = torch.randn(2, 8, 4 * 16, requires_grad=True)
    cand = reference.candidates(mem, torch.randn(2, 8, 32), torch.randn(2, 8, 32))
    keys, values = (t.detach().contiguous().requires_grad_() for t in (cand.keys, cand.values))
    beta = torch.zeros(4, 2, requires_grad=True)
    levels = (list(spec.slots), [spec.span(lvl) for lvl in range(2)])
    out, lse = torch.ops.mmrec.hds_attend_fwd(q, keys, values, beta, mem.pos, *levels, 4)
    assert out.requires_grad and not lse.requires_grad  # lse is the softmax's by-product

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.zeros_like, torch.ops.aten.zeros, torch.ops.aten.fill_):
                self.shapes.append(tuple(result.shape))
            return result

    with Fills() as fills:
        out.backward(torch.ones_like(out))
    assert tuple(lse.shape) not in fills.shapes, f"zero tensors built in the backward: {fills.shapes}"
    assert q.grad is not None and beta.grad is not None
