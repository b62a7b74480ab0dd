"""The custom ops as torch sees them: schema, fake tensors, autograd registration, torch.compile."""

import pytest
import torch

import kernels
from kernels import KernelInputError


def scan_args(requires_grad=True):
    log_a = (torch.rand(2, 13, 5) * -2).requires_grad_(requires_grad)
    b = torch.randn(2, 13, 5, requires_grad=requires_grad)
    h0 = torch.randn(2, 5, requires_grad=requires_grad)
    return log_a, b, h0


def recurrence_args(requires_grad=True):
    z, gz = torch.randn(2, 11, 6), torch.randn(2, 11, 6)
    gamma = torch.rand(2, 11, 6) * 0.9
    w_g, h0 = torch.randn(2, 3, 3) * 0.3, torch.randn(2, 6)
    return [t.requires_grad_(requires_grad) for t in (z, gz, gamma, w_g, h0)]


@pytest.mark.parametrize("with_h0", [True, False])
def test_opcheck_linear_scan(with_h0):
    log_a, b, h0 = scan_args()
    torch.library.opcheck(torch.ops.mmrec.linear_scan_fwd.default, (log_a, b, h0 if with_h0 else None))
    h, h_last = torch.ops.mmrec.linear_scan_fwd(log_a.detach(), b.detach(), h0.detach())
    torch.library.opcheck(
        torch.ops.mmrec.linear_scan_bwd.default,
        (log_a.detach(), h, h0.detach() if with_h0 else None, torch.randn_like(h), torch.randn_like(h_last)),
    )
    torch.library.opcheck(  # h_last unused: autograd passes None
        torch.ops.mmrec.linear_scan_bwd.default,
        (log_a.detach(), h, h0.detach() if with_h0 else None, torch.randn_like(h), None),
    )


@pytest.mark.parametrize("with_h0", [True, False])
def test_opcheck_gated_recurrence(with_h0):
    z, gz, gamma, w_g, h0 = recurrence_args()
    args = (z, gz, gamma, w_g, h0 if with_h0 else None)
    torch.library.opcheck(torch.ops.mmrec.gated_recurrence_fwd.default, args)
    plain = [t.detach() if t is not None else None for t in args]
    h, h_last = torch.ops.mmrec.gated_recurrence_fwd(*plain)
    torch.library.opcheck(
        torch.ops.mmrec.gated_recurrence_bwd.default, (*plain, h, torch.randn_like(h), torch.randn_like(h_last))
    )


@pytest.mark.parametrize("with_h0", [True, False])
def test_opcheck_decay_recurrence(with_h0):
    z, gz, logit, w_g, h0 = recurrence_args()
    args = (z, gz, logit, torch.randn_like(logit).requires_grad_(), w_g, h0 if with_h0 else None, 1e-3)
    torch.library.opcheck(torch.ops.mmrec.decay_recurrence_fwd.default, args)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    h, h_last = torch.ops.mmrec.decay_recurrence_fwd(*plain)
    grad_args = (*plain[:-1], h, torch.randn_like(h), torch.randn_like(h_last), plain[-1])
    torch.library.opcheck(torch.ops.mmrec.decay_recurrence_bwd.default, grad_args)


def model_step(log_a, b, h0, z, gz, gamma, w_g, h1):
    h, last = kernels.linear_scan(log_a, b, h0)
    g, glast = kernels.gated_recurrence(z, gz, torch.sigmoid(gamma), w_g, h1)
    d, dlast = kernels.decay_recurrence(z, gz, gamma, -gamma, w_g, h1)
    return (h.sum(-1) + last.sum(-1)[:, None]).sum() + (g * 2).sum() + glast.sum() + (d * g).sum() + dlast.sum()


def test_torch_compile_sees_the_ops_without_graph_breaks():
    args = (*scan_args(), *recurrence_args())
    explanation = torch._dynamo.explain(model_step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_torch_compile_fullgraph_forward_and_backward_match_eager():
    args = (*scan_args(), *recurrence_args())
    eager = torch.autograd.grad(model_step(*args), args)
    compiled_fn = torch.compile(model_step, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_fn(*args), args)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e)


def test_bad_arguments_are_one_line_errors():
    log_a, b, h0 = scan_args(requires_grad=False)
    with pytest.raises(KernelInputError, match=r"linear_scan: log_a: expected shape \[2, 13, 5\], got \[2, 13, 4\]"):
        kernels.linear_scan(log_a[..., :4], b, h0)
    with pytest.raises(KernelInputError, match=r"linear_scan: h0: expected shape \[2, 5\], got \[5\]"):
        kernels.linear_scan(log_a, b, h0[0])
    with pytest.raises(KernelInputError, match=r"linear_scan: b: expected \[B, T, C\], got \[13, 5\]"):
        kernels.linear_scan(log_a[0], b[0])
    z, gz, gamma, w_g, h0 = recurrence_args(requires_grad=False)
    with pytest.raises(KernelInputError, match=r"gated_recurrence: w_g: expected \[H, Dh, Dh\] with H\*Dh = 6"):
        kernels.gated_recurrence(z, gz, gamma, w_g[:1], h0)
    with pytest.raises(KernelInputError, match="gated_recurrence: gamma: expected a floating dtype"):
        kernels.gated_recurrence(z, gz, gamma.long(), w_g, h0)
    bad_c = r"decay_recurrence: c: expected shape \[2, 11, 6\], got \[2, 11, 5\]"
    with pytest.raises(KernelInputError, match=bad_c):
        kernels.decay_recurrence(z, gz, gamma, gamma[..., :5], w_g, h0)
    with pytest.raises(KernelInputError, match=r"decay_recurrence: eps: expected 0 < eps < 0\.5, got 0\.7"):
        kernels.decay_recurrence(z, gz, gamma, gamma, w_g, h0, eps=0.7)


def test_opcheck_hds_attend():
    from kernels.memory.reference import candidates
    from tests.kernels.test_hds import HEADS, SPEC, build_history

    mem, _, _ = build_history([13, 6], {0: [1]}, dtype=torch.float32)
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    q = torch.randn(3, 21, qd, requires_grad=True)
    k, v = torch.randn(3, 21, kd), torch.randn(3, 21, kd)
    cand = candidates(mem, k, v)
    keys, values = cand.keys.detach().requires_grad_(), cand.values.detach().requires_grad_()
    beta = torch.randn(HEADS, 3, requires_grad=True)
    levels = (list(SPEC.slots), [SPEC.span(lvl) for lvl in range(3)])
    args = (q, keys, values, beta, mem.pos, *levels, HEADS)
    torch.library.opcheck(torch.ops.mmrec.hds_attend_fwd.default, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, lse = torch.ops.mmrec.hds_attend_fwd(*plain)
    torch.library.opcheck(torch.ops.mmrec.hds_attend_bwd.default, (*plain[:7], out, lse, torch.randn_like(out), HEADS))
    residual = torch.randn_like(q, requires_grad=True)  # fuse-residual-epilogue's form
    torch.library.opcheck(torch.ops.mmrec.hds_attend_fwd.default, (*args, residual))
    out, lse = torch.ops.mmrec.hds_attend_fwd(*plain, residual.detach())
    args = (*plain[:7], out, lse, torch.randn_like(out), HEADS, residual.detach())
    torch.library.opcheck(torch.ops.mmrec.hds_attend_bwd.default, args)


def test_hds_query_op_is_the_attend_pair_with_its_gradients():
    """torch.ops.mmrec.hds_query (the issue's name for the memory query) equals hds_attend_fwd's
    output, passes opcheck, takes gradients to q, the candidates and beta through the pair's
    autograd, and compiles with fullgraph=True."""
    from kernels.memory.reference import candidates
    from tests.kernels.test_hds import HEADS, SPEC, build_history

    mem, _, _ = build_history([13, 6], {0: [1]}, dtype=torch.float32)
    kd, qd = SPEC.heads * SPEC.dim, HEADS * SPEC.dim
    q = torch.randn(3, 17, qd, requires_grad=True)
    cand = candidates(mem, torch.randn(3, 17, kd), torch.randn(3, 17, kd))
    keys, values = cand.keys.detach().requires_grad_(), cand.values.detach().requires_grad_()
    beta = torch.randn(HEADS, 3, requires_grad=True)
    levels = (list(SPEC.slots), [SPEC.span(lvl) for lvl in range(3)])
    args = (q, keys, values, beta, mem.pos, *levels, HEADS)
    torch.library.opcheck(torch.ops.mmrec.hds_query.default, args)
    out = torch.ops.mmrec.hds_query(*args)
    want = torch.ops.mmrec.hds_attend_fwd(*args)[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, keys, values, beta), dout)
    for g, w in zip(got, torch.autograd.grad(want, (q, keys, values, beta), dout), strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    compiled = torch.compile(lambda *a: torch.ops.mmrec.hds_query(*a), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), out)


def test_opcheck_block_sums():
    x = torch.randn(3, 29, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.mmrec.block_sums.default, (x, torch.tensor([0, 3, 17]), 4))


def test_opcheck_hds_decode():
    from tests.kernels.test_hds import HEADS, SPEC, build_history

    mem, _, _ = build_history([13, 6], {0: [1]}, dtype=torch.float32)
    spans = [SPEC.span(lvl) for lvl in range(3)]
    args = (torch.randn(3, 1, HEADS * SPEC.dim), mem.keys, mem.values, torch.randn(HEADS, 3), mem.pos, spans, HEADS)
    torch.library.opcheck(torch.ops.mmrec.hds_decode.default, args)


def test_opcheck_memory_write_step():
    from tests.kernels.test_hds import SPEC, build_history

    mem, _, _ = build_history([13, 6], {0: [1]}, dtype=torch.float32)
    spans = [SPEC.span(lvl) for lvl in range(3)]
    k, v = torch.randn(3, 1, SPEC.heads * SPEC.dim), torch.randn(3, 1, SPEC.heads * SPEC.dim)
    args = (k, v, mem.pos, mem.keys, mem.values, mem.sum_k, mem.sum_v, spans)
    torch.library.opcheck(torch.ops.mmrec.memory_write_step.default, args)


def test_fp32_dots_follow_torchs_matmul_precision():
    from kernels.config import fp32_dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fp32_dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert fp32_dot_precision(torch.float32) == "tf32"
        assert fp32_dot_precision(torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
