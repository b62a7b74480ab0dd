"""The Triton residual-add + RMSNorm kernels vs PyTorch autograd through the reference: odd widths,
fp32/bf16, with and without the residual, NaN-poisoned outputs. Runs on CUDA, or on CPU under
TRITON_INTERPRET=1; the op registration checks (opcheck) run everywhere."""

import pytest
import torch

import kernels
from kernels.nn.reference import rmsnorm as ref_rmsnorm
from kernels.norm import kernel, reference
from tests.conftest import TRITON_DEVICE, assert_close


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)


def make(shape, dtype):
    a, b = torch.randn(*shape) * 2, torch.randn(*shape)
    w = torch.rand(shape[-1]) + 0.5
    return [t.to(TRITON_DEVICE, dtype).requires_grad_() for t in (a, b, w)]


def reference_grads(a, b, w, eps, ds, du):
    a64, b64, w64 = (t.detach().cpu().double().requires_grad_() for t in (a, b, w))
    s = a64 + b64
    u = ref_rmsnorm(s, w64, eps)
    total = (u * du.cpu().double()).sum() + (s * ds.cpu().double()).sum()
    return (s, u), torch.autograd.grad(total, (a64, b64, w64))


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 1, 100), (1, 7, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_matches_autograd_of_the_reference(shape, dtype):
    a, b, w = make(shape, dtype)
    s, u = kernels.add_rmsnorm(a, b, w, 1e-5)
    ds, du = torch.randn_like(s), torch.randn_like(u)
    grads = torch.autograd.grad((s.float() * ds.float()).sum() + (u.float() * du.float()).sum(), (a, b, w))
    (ref_s, ref_u), ref_grads = reference_grads(a, b, w, 1e-5, ds, du)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert_close(s.cpu(), ref_s.detach(), what="s", **tol)
    assert_close(u.cpu(), ref_u.detach(), what="u", **tol)
    for name, g, r in zip(["lhs", "rhs", "weight"], grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g.cpu(), r, what=f"d{name}", **tol)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_forward_rounds_like_the_reference(dtype):
    """Same rounding points as PyTorch (sum, then the normalised row, then the weight): the sum is
    bit-equal on the GPU (the interpreter's bf16 casts may differ by an ulp), the norm within the
    rms's last ulps."""
    a, b, w = (t.detach() for t in make((4, 9, 48), dtype))
    s, u = kernels.add_rmsnorm(a, b, w, 1e-6)
    ulp = torch.finfo(dtype).eps
    ref_s = a + b
    if TRITON_DEVICE == "cuda":
        assert torch.equal(s, ref_s)
    assert ((s.float() - ref_s.float()).abs() <= ulp * ref_s.float().abs()).all()
    ref = ref_rmsnorm(ref_s, w, 1e-6)
    assert ((u.float() - ref.float()).abs() <= 3 * ulp * ref.float().abs() + 1e-6).all()


@pytest.mark.triton
def test_rmsnorm_alone_and_unused_outputs():
    a, _, w = make((2, 11, 24), torch.float32)
    u = kernels.rmsnorm(a, w, 1e-6)
    (ga, gw) = torch.autograd.grad(u.sin().sum(), (a, w))
    a64, w64 = a.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    ra, rw = torch.autograd.grad(ref_rmsnorm(a64, w64, 1e-6).sin().sum(), (a64, w64))
    assert_close(ga.cpu(), ra, what="dx", rtol=1e-5, atol=1e-5)
    assert_close(gw.cpu(), rw, what="dweight", rtol=1e-5, atol=1e-5)
    # Only the sum used: the norm's gradient is absent (None), the sum's passes straight through.
    a, b, w = make((2, 11, 24), torch.float32)
    s, _ = kernels.add_rmsnorm(a, b, w)
    ga, gb = torch.autograd.grad(s.sum(), (a, b))
    assert torch.equal(ga, torch.ones_like(a)) and torch.equal(gb, torch.ones_like(b))


@pytest.mark.triton
def test_launchers_write_every_element():
    a, b, w = (t.detach() for t in make((5, 13, 40), torch.float32))
    s, u, rstd = kernel.add_rmsnorm_fwd(a, b, w, 1e-6)
    dx, dw = kernel.add_rmsnorm_bwd(s, w, rstd, torch.randn_like(s), torch.randn_like(u))
    for t in (s, u, rstd, dx, dw):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("with_b", [True, False])
def test_opcheck_add_rmsnorm(with_b):
    a, b = (torch.randn(2, 5, 12, requires_grad=True) for _ in range(2))
    w = torch.rand(12, requires_grad=True)
    args = (a, b if with_b else None, w, 1e-6)
    torch.library.opcheck(torch.ops.mmrec.add_rmsnorm_fwd.default, args)
    s, u, rstd = torch.ops.mmrec.add_rmsnorm_fwd(a.detach(), b.detach() if with_b else None, w.detach(), 1e-6)
    saved = s if with_b else a.detach()
    ds = torch.randn_like(u) if with_b else None
    torch.library.opcheck(torch.ops.mmrec.add_rmsnorm_bwd.default, (saved, w.detach(), rstd, ds, torch.randn_like(u)))


def test_reference_backward_matches_autograd():
    a, b, w = (t.detach().double().cpu() for t in make((3, 4, 10), torch.float32))
    s, u, rstd = reference.add_rmsnorm(a, b, w, 1e-6)
    ds, du = torch.randn_like(s), torch.randn_like(u)
    dx, dw = reference.add_rmsnorm_backward(s, w, rstd, ds, du)
    _, (ra, _rb, rw) = reference_grads(a, b, w, 1e-6, ds, du)
    assert_close(dx, ra, what="dx", rtol=1e-10, atol=1e-12)
    assert_close(dw, rw, what="dw", rtol=1e-10, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 7, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_b", [True, False])
def test_add_rstd_gives_the_sum_and_the_norm_statistics(shape, dtype, with_b):
    """add_rstd: add_rmsnorm's kernel without the normalised rows; the sum's gradient is the
    add's, and rstd refuses a gradient (its reader differentiates the norm itself)."""
    a, b, w = make(shape, dtype)
    s, rstd = kernels.add_rstd(a, b if with_b else None, 1e-5)
    want_s, _, want_rstd = reference.add_rmsnorm(a.detach().cpu(), b.detach().cpu() if with_b else None, w.cpu(), 1e-5)
    assert rstd.shape == shape[:-1] and rstd.dtype == torch.float32
    assert_close(
        rstd.cpu(), want_rstd.float().view(shape[:-1]), what="rstd", rtol=1e-5 if dtype == torch.float32 else 1e-2
    )
    if not with_b:
        assert s is a
        return
    assert_close(s.cpu(), want_s, what="s", rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    ds = torch.randn_like(s)
    da, db = torch.autograd.grad(s, (a, b), ds)
    assert torch.equal(da, ds) and torch.equal(db, ds)
    _, rstd = kernels.add_rstd(a, b, 1e-5)  # the direct launch's autograd.Function
    with pytest.raises(RuntimeError, match="add_rstd: rstd carries no gradient"):
        torch.autograd.grad(rstd.sum(), (a,))


def test_add_rstd_op_refuses_a_gradient_for_rstd():
    """The custom op's autograd (CPU here; torch.compile traces the same) as the direct launch's."""
    a, b = (torch.randn(3, 8, requires_grad=True) for _ in range(2))
    s, rstd = torch.ops.mmrec.add_rstd_fwd(a, b, 1e-6)
    torch.autograd.grad(s.sum(), (a, b), retain_graph=True)  # the sum's gradient is the add's
    with pytest.raises(RuntimeError, match="add_rstd: rstd carries no gradient"):
        torch.autograd.grad(rstd.sum(), (a,))
    _, rstd = kernels.add_rstd(a, b, 1e-6)  # the CPU entry point goes through the op
    with pytest.raises(RuntimeError, match="add_rstd: rstd carries no gradient"):
        torch.autograd.grad((rstd * 2).sum(), (a,))


@pytest.mark.parametrize("with_b", [True, False])
def test_opcheck_add_rstd(with_b):
    a, b = (torch.randn(2, 5, 12) for _ in range(2))
    torch.library.opcheck(torch.ops.mmrec.add_rstd_fwd.default, (a, b if with_b else None, 1e-6))
