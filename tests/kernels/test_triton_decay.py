"""The MDI decay's Triton kernels (kernels/decay) vs fp64 autograd of the plain ops: one MLP
(GEMM, gelu, GEMM) and the whole decay (both MLPs and the tail) in one kernel. Odd sizes (rows
not a multiple of the tile, bottlenecks of one and of two parts, output columns not a multiple
of the tile), fp32/bf16, every gradient, NaN-poisoned outputs; mdi_decay_logits and mdi_decay
through them. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.decay import kernel, op
from kernels.decay import reference as decay_ref
from tests.conftest import TRITON_DEVICE, assert_close


@pytest.fixture(autouse=True)
def _knobs(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)
    monkeypatch.setattr(kernels.knobs, "decay_kernels", True)
    # The kernels' logic in exact fp32 on CUDA too (the ops leave exact fp32 to cuBLAS:
    # dot.tensor_cores); at these sizes the CUDA-core dots' spills cost nothing.
    monkeypatch.setattr(kernel, "tensor_cores", lambda dtype: True)


def make(rows, width, hidden, out_width, dtype):
    torch.manual_seed(0)
    x = torch.randn(rows, width)
    w1, w2 = torch.randn(hidden, width) / width**0.5, torch.randn(out_width, hidden) / hidden**0.5
    b1, b2 = torch.randn(hidden) * 0.1, torch.randn(out_width) * 0.1
    return [t.to(TRITON_DEVICE, dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]


def fp64_autograd(leaves, dout):
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    x, w1, b1, w2, b2 = ref
    out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return out.detach(), torch.autograd.grad((out * dout.cpu().double()).sum(), ref)


def check(name, got, want, dtype):
    if dtype == torch.float32:
        assert_close(got.cpu(), want, what=name, rtol=1e-4, atol=1e-5)
    else:  # bf16 rounds the hidden and every product sum: the whole tensor's relative error
        assert not torch.isnan(got).any(), f"{name}: NaN"
        err = ((got.cpu().double() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.1e}"


@pytest.mark.triton
@pytest.mark.parametrize(("rows", "width", "hidden", "out_width"), [(37, 32, 24, 40), (70, 16, 16, 16), (5, 48, 8, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_mlp_matches_fp64_autograd(rows, width, hidden, out_width, dtype):
    leaves = make(rows, width, hidden, out_width, dtype)
    assert kernel.supported(leaves[0].detach(), leaves[1].detach(), leaves[3].detach())
    out = op.mlp(*leaves)
    assert out.shape == (rows, out_width) and out.dtype == dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves)
    want, want_grads = fp64_autograd(leaves, dout)
    names = ["out", "dx", "dw1", "db1", "dw2", "db2"]
    for name, got, ref in zip(names, (out, *grads), (want, *want_grads), strict=True):
        assert got.dtype == dtype, name
        check(name, got, ref, dtype)


@pytest.mark.triton
def test_the_kernel_writes_every_element_and_keeps_nan():
    x, w1, b1, w2, b2 = (t.detach() for t in make(45, 32, 20, 48, torch.float32))
    x[7, 3] = float("nan")
    out = kernel.mlp_fwd(x, w1, b1, w2, b2)
    assert torch.isnan(out[7]).all() and not torch.isnan(out[:7]).any() and not torch.isnan(out[8:]).any()
    want = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    assert_close(out[8:].cpu(), want[8:].cpu(), what="out", rtol=1e-4, atol=1e-5)


@pytest.mark.triton
def test_mdi_decay_logits_runs_both_mlps_through_the_kernel(monkeypatch):
    launched = []
    real = kernel.mlp_fwd
    monkeypatch.setattr(kernel, "mlp_fwd", lambda *a: launched.append(a[0].shape) or real(*a))
    z, k = torch.randn(2, 9, 32).to(TRITON_DEVICE), torch.randn(2, 9, 16).to(TRITON_DEVICE)
    shapes = [(8, 32), (8,), (32, 8), (32,), (8, 16), (8,), (32, 8), (32,)]
    params = [torch.randn(*s).to(TRITON_DEVICE) * 0.2 for s in shapes]
    a, c = kernels.mdi_decay_logits(z, k, *params)
    assert launched == [(18, 32), (18, 16)]
    want_a, want_c = decay_ref.mdi_decay_logits(z, k, *params)
    assert_close(a.cpu(), want_a.cpu(), what="a", rtol=1e-4, atol=1e-5)
    assert_close(c.cpu(), want_c.cpu(), what="c", rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_one_line_errors():
    x, w1, b1, w2, b2 = (t.detach() for t in make(4, 16, 8, 16, torch.float32))
    with pytest.raises(kernels.KernelInputError, match=r"decay_mlp: w2: expected shape \[16, 8\], got \[16, 9\]"):
        op.mlp(x, w1, b1, torch.zeros(16, 9, device=x.device), b2)
    with pytest.raises(kernels.KernelInputError, match=r"decay_mlp: b1: expected shape \[8\], got \[7\]"):
        op.mlp(x, w1, b1[:7], w2, b2)


def test_opcheck_decay_mlp():
    x, w1, b1, w2, b2 = (t.detach().cpu().requires_grad_() for t in make(6, 16, 8, 12, torch.float32))
    torch.library.opcheck(torch.ops.mmrec.decay_mlp.default, (x, w1, b1, w2, b2))


def test_reference_backward_matches_autograd():
    x, w1, b1, w2, b2 = (t.detach().cpu().double().requires_grad_() for t in make(9, 7, 5, 6, torch.float32))
    out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), (x, w1, b1, w2, b2))
    got = op.mlp_backward(x.detach(), w1.detach(), b1.detach(), w2.detach(), dout)
    for name, a, b in zip(["x", "w1", "b1", "w2", "b2"], got, want, strict=True):
        assert_close(a, b, what=f"d{name}", rtol=1e-10, atol=1e-12)


def test_the_op_compiles_without_graph_breaks():
    """Under torch.compile the custom op is traced (its fake kernel), forward and backward."""
    torch._dynamo.reset()
    leaves = [t.detach().cpu().requires_grad_() for t in make(6, 16, 8, 12, torch.float32)]
    compiled = torch.compile(op.mlp, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    want = F.linear(F.gelu(F.linear(leaves[0], leaves[1], leaves[2])), leaves[3], leaves[4])
    want_grads = torch.autograd.grad(want.sum(), leaves)
    assert_close(out.detach(), want.detach(), what="out", rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w, what="grad", rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_shapes_the_kernel_cannot_take_run_the_plain_ops():
    """A zero-width input or bottleneck, or rows not 16-byte aligned, fall back to the plain ops."""
    for rows, width, hidden in [(4, 0, 8), (4, 16, 0), (4, 10, 8)]:
        x, w1, b1, w2, b2 = (t.detach() for t in make(rows, width, hidden, 16, torch.float32))
        assert not kernel.supported(x, w1, w2)
        got = op.mlp(x, w1, b1, w2, b2)
        assert_close(got.cpu(), F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).cpu(), what="out", rtol=1e-5, atol=1e-6)


def make_decay(rows, width, k_width, hidden, dtype, lead=()):
    torch.manual_seed(1)
    z, k = torch.randn(*lead, rows, width), torch.randn(*lead, rows, k_width)
    shapes = [(hidden, width), (hidden,), (width, hidden), (width,), (hidden, k_width), (hidden,), (width, hidden)]
    params = [torch.randn(*s) / s[-1] ** 0.5 for s in shapes] + [torch.randn(width) * 0.1]
    return [t.to(TRITON_DEVICE, dtype).requires_grad_() for t in (z, k, *params)]


def fp64_decay(leaves, dout, eps):
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    out = decay_ref.mdi_decay(*ref, eps)
    return out.detach(), torch.autograd.grad((out * dout.cpu().double()).sum(), ref)


NAMES = ["gamma", "dz", "dk", "dw1", "db1", "dw2", "db2", "dc1", "dcb1", "dc2", "dcb2"]


@pytest.mark.triton
@pytest.mark.parametrize(("rows", "width", "k_width", "hidden"), [(37, 32, 16, 24), (70, 48, 32, 16), (5, 16, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_decay_matches_fp64_autograd(rows, width, k_width, hidden, dtype, monkeypatch):
    launched = []
    real = kernel.decay_fwd
    monkeypatch.setattr(kernel, "decay_fwd", lambda *a: launched.append(a[0].shape) or real(*a))
    leaves = make_decay(rows, width, k_width, hidden, dtype, lead=(1,))
    gamma = kernels.mdi_decay_fused(*leaves, eps=1e-6)
    assert launched == [(rows, width)] and gamma.shape == (1, rows, width) and gamma.dtype == dtype
    dout = torch.randn_like(gamma)
    grads = torch.autograd.grad((gamma.float() * dout.float()).sum(), leaves)
    want, want_grads = fp64_decay(leaves, dout, 1e-6)
    for name, got, ref in zip(NAMES, (gamma, *grads), (want, *want_grads), strict=True):
        assert got.dtype == dtype, name
        check(name, got, ref, dtype)


@pytest.mark.triton
def test_whole_decay_clamps_and_keeps_nan():
    """A large eps makes the clamp bind for every element (the gradient then vanishes); NaN in z
    stays in gamma's row."""
    leaves = [t.detach() for t in make_decay(20, 16, 16, 8, torch.float32)]
    gamma = kernel.decay_fwd(*leaves, 0.4)
    assert torch.all((gamma >= 0.4) & (gamma <= 0.6))
    leaves[0][3, 2] = float("nan")
    gamma = kernel.decay_fwd(*leaves, 1e-6)
    assert torch.isnan(gamma[3]).all() and not torch.isnan(gamma[:3]).any() and not torch.isnan(gamma[4:]).any()
    want = decay_ref.mdi_decay(*leaves, 1e-6)
    assert_close(gamma[4:].cpu(), want[4:].cpu(), what="gamma", rtol=1e-5, atol=1e-6)


def test_opcheck_whole_decay():
    leaves = [t.detach().cpu().requires_grad_() for t in make_decay(6, 16, 8, 4, torch.float32)]
    torch.library.opcheck(torch.ops.mmrec.mdi_decay_fused.default, (*leaves, 1e-6))


def test_whole_decay_backward_matches_autograd():
    leaves = [t.detach().cpu().double().requires_grad_() for t in make_decay(9, 8, 4, 3, torch.float32)]
    out = decay_ref.mdi_decay(*leaves, 1e-6)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), leaves)
    got = op.decay_backward(*(t.detach() for t in leaves), 1e-6, dout)
    for name, a, b in zip(NAMES[1:], got, want, strict=True):
        assert_close(a, b, what=name, rtol=1e-10, atol=1e-12)


def test_whole_decay_bad_inputs_are_one_line_errors():
    leaves = [t.detach() for t in make_decay(4, 16, 8, 4, torch.float32)]
    with pytest.raises(kernels.KernelInputError, match=r"mdi_decay: eps: expected 0 < eps < 0.5"):
        kernels.mdi_decay_fused(*leaves, eps=0.5)
    bad = list(leaves)
    bad[6] = torch.zeros(4)
    with pytest.raises(kernels.KernelInputError, match=r"mdi_decay: c1: expected a \[R, D\] matrix"):
        kernels.mdi_decay_fused(*bad, eps=1e-6)
    bad = list(leaves)
    bad[8] = torch.zeros(16, 5)
    with pytest.raises(kernels.KernelInputError, match=r"mdi_decay: c2: expected shape \[16, 4\], got \[16, 5\]"):
        kernels.mdi_decay_fused(*bad, eps=1e-6)
