"""The Triton GEMM with the SwiGLU epilogue vs PyTorch autograd of silu(x Wg^T) * (x Wu^T) in fp64:
odd sizes (no side a multiple of the tile), fp32/bf16, every gradient, NaN-poisoned outputs, both
kernels (the persistent TMA one and the pointer one for GPUs without TMA or unaligned rows). Runs
on CUDA, or on CPU under TRITON_INTERPRET=1; the reference and the op registration run everywhere."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import KernelInputError
from kernels.linear import kernel, reference
from tests.conftest import TRITON_DEVICE, assert_close


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)
    monkeypatch.setattr(kernels.knobs, "autotune", False)
    # The kernels' logic in exact fp32 on CUDA too (the op itself leaves exact fp32 to cuBLAS:
    # dot.tensor_cores); at these sizes the CUDA-core dots' spills cost nothing.
    monkeypatch.setattr(kernel, "tensor_cores", lambda dtype: True)


def make(lead, width, hidden, dtype, device=TRITON_DEVICE):
    x = torch.randn(*lead, width)
    w_gate, w_up = torch.randn(hidden, width) / width**0.5, torch.randn(hidden, width) / width**0.5
    return [t.to(device, dtype).requires_grad_() for t in (x, w_gate, w_up)]


def fp64_autograd(x, w_gate, w_up, dout):
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w_gate, w_up)]
    out = F.silu(F.linear(leaves[0], leaves[1])) * F.linear(leaves[0], leaves[2])
    return out.detach(), torch.autograd.grad((out * dout.cpu().double()).sum(), leaves)


@pytest.fixture(params=["tma", "pointers"])
def path(request, monkeypatch):
    """Which kernel runs: `tma` checks that the TMA one did (the shapes below keep rows aligned)."""
    taken = []
    real = kernel._tma_ok
    tma = request.param == "tma"
    monkeypatch.setattr(kernel, "_tma_ok", lambda *t: taken.append(real(*t) and tma) or taken[-1])
    yield request.param
    assert taken and all(taken) == tma, f"expected the {request.param} kernel, _tma_ok gave {taken}"


@pytest.mark.triton
@pytest.mark.parametrize(("lead", "width", "hidden"), [((2, 37), 24, 40), ((1, 5), 48, 24), ((63,), 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_swiglu_matches_fp64_autograd(lead, width, hidden, dtype, path):
    x, w_gate, w_up = make(lead, width, hidden, dtype)
    out = kernels.linear_swiglu(x, w_gate, w_up)
    assert out.shape == (*lead, hidden) and out.dtype == dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (x, w_gate, w_up))
    ref, ref_grads = fp64_autograd(x, w_gate, w_up, dout)
    for name, got, want in zip(["out", "dx", "dw_gate", "dw_up"], (out, *grads), (ref, *ref_grads), strict=True):
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert_close(got.cpu(), want, what=name, rtol=1e-4, atol=1e-5)
        else:  # bf16 GEMMs round every product sum: compare the whole tensor's relative error
            assert not torch.isnan(got).any(), f"{name}: NaN"
            err = ((got.cpu().double() - want).norm() / want.norm()).item()
            assert err < 1e-2, f"{name}: relative error {err:.1e}"


@pytest.mark.triton
@pytest.mark.parametrize("save", [True, False])
def test_the_launcher_writes_every_element(save, path):
    x, w_gate, w_up = (t.detach() for t in make((45,), 40, 56, torch.float32))
    out, g, u = kernel.linear_swiglu_fwd(x, w_gate, w_up, save)
    assert not torch.isnan(out).any()
    if save:
        _, want_g, want_u = reference.linear_swiglu(x, w_gate, w_up)
        assert_close(g.cpu(), want_g.cpu(), what="g", rtol=1e-4, atol=1e-5)
        assert_close(u.cpu(), want_u.cpu(), what="u", rtol=1e-4, atol=1e-5)
    else:
        assert g.numel() == 0 and u.numel() == 0


@pytest.mark.triton
def test_unaligned_rows_take_the_pointer_kernel():
    """Rows of 50 bf16 values (100 bytes) cannot be TMA-copied: the pointer kernel runs them."""
    x, w_gate, w_up = (t.detach() for t in make((9,), 50, 24, torch.bfloat16))
    assert not kernel._tma_ok(x, w_gate)
    out = kernel.linear_swiglu_fwd(x, w_gate, w_up, False)[0]
    want = reference.linear_swiglu(x.float(), w_gate.float(), w_up.float())[0]
    assert_close(out.float().cpu(), want.cpu(), what="out", rtol=2e-2, atol=2e-2)


def test_reference_backward_matches_autograd():
    x, w_gate, w_up = make((9,), 7, 5, torch.float64, device="cpu")
    out, g, u = reference.linear_swiglu(x, w_gate, w_up)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), (x, w_gate, w_up))
    got = reference.linear_swiglu_backward(x.detach(), w_gate.detach(), w_up.detach(), g.detach(), u.detach(), dout)
    for name, a, b in zip(["x", "w_gate", "w_up"], got, want, strict=True):
        assert_close(a, b, what=f"d{name}", rtol=1e-12, atol=1e-12)


def test_opcheck_linear_swiglu():
    x, w_gate, w_up = make((6,), 8, 10, torch.float32, device="cpu")
    torch.library.opcheck(torch.ops.mmrec.linear_swiglu_fwd.default, (x, w_gate, w_up, True))
    plain = (x.detach(), w_gate.detach(), w_up.detach())
    torch.library.opcheck(torch.ops.mmrec.linear_swiglu_fwd.default, (*plain, False))


def test_errors_name_the_argument():
    x, w_gate, w_up = make((2, 3), 8, 10, torch.float32, device="cpu")
    with pytest.raises(KernelInputError, match=r"linear_swiglu: w_up: expected shape \[10, 8\], got \[10, 7\]"):
        kernels.linear_swiglu(x, w_gate, w_up[:, :7])
    with pytest.raises(KernelInputError, match=r"linear_swiglu: w_gate: expected shape \[10, 8\], got \[10, 9\]"):
        kernels.linear_swiglu(x, torch.randn(10, 9), w_up)


@pytest.mark.triton
def test_zero_width_rows_give_zeros():
    x, w_gate, w_up = (t.detach() for t in make((5,), 0, 16, torch.float32))
    assert not kernel._tma_ok(x, w_gate)
    out = kernel.linear_swiglu_fwd(x, w_gate, w_up, False)[0]
    assert out.shape == (5, 16) and torch.equal(out.cpu(), torch.zeros(5, 16))


def fp64_rms_autograd(parts, w_norm, w_gate, w_up, dout, eps):
    """fp64 autograd of linear_swiglu(rmsnorm(sum(parts))) -> (out, grads of parts, w_norm, w_gate, w_up)."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (*parts, w_norm, w_gate, w_up)]
    xs, (wn, wg, wu) = sum(leaves[: len(parts)]), leaves[len(parts) :]
    u = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps) * wn
    out = F.silu(F.linear(u, wg)) * F.linear(u, wu)
    return out.detach(), torch.autograd.grad((out * dout.cpu().double()).sum(), leaves)


@pytest.mark.triton
@pytest.mark.parametrize("residual", [False, True], ids=["own-rstd", "add_rstd"])
@pytest.mark.parametrize(("lead", "width", "hidden"), [((2, 37), 24, 40), ((63,), 16, 16), ((5,), 48, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_linear_swiglu_matches_fp64_autograd(lead, width, hidden, dtype, residual, path):
    """The norm in the GEMM's epilogue (rows scaled by rstd, the norm's weight folded into the
    weights' copy), both kernels, every gradient (x's through rstd too): with rstd computed by
    the op itself, and as fuse-norm-prologue builds it, from the add_rstd that made x."""
    x, w_gate, w_up = make(lead, width, hidden, dtype)
    w_norm = (torch.rand(width) + 0.5).to(TRITON_DEVICE, dtype).requires_grad_()
    parts = [(x.detach() * 3).requires_grad_()]  # rows far from unit RMS
    if residual:
        parts.append(torch.randn_like(parts[0]).requires_grad_())
        s, rstd = kernels.add_rstd(*parts, 1e-5)
        assert rstd.shape == lead and rstd.dtype == torch.float32
        out = kernels.rms_linear_swiglu(s, w_norm, w_gate, w_up, rstd=rstd)
    else:
        out = kernels.rms_linear_swiglu(parts[0], w_norm, w_gate, w_up, 1e-5)
    assert out.shape == (*lead, hidden)
    dout = torch.randn_like(out)
    leaves = (*parts, w_norm, w_gate, w_up)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves)
    ref, ref_grads = fp64_rms_autograd(parts, w_norm, w_gate, w_up, dout, 1e-5)
    names = ["out", *(f"d{n}" for n in ("a", "b")[: len(parts)]), "dw_norm", "dw_gate", "dw_up"]
    for name, got, want in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
        assert got.dtype == dtype, name
        if dtype == torch.float32:
            assert_close(got.cpu(), want, what=name, rtol=1e-4, atol=1e-5)
        else:
            assert not torch.isnan(got).any(), f"{name}: NaN"
            err = ((got.cpu().double() - want).norm() / want.norm()).item()
            assert err < 2e-2, f"{name}: relative error {err:.1e}"


def test_rms_linear_swiglu_checks_rstd():
    x, w_gate, w_up = make((2, 3), 8, 10, torch.float32, device="cpu")
    with pytest.raises(KernelInputError, match=r"rms_linear_swiglu: rstd: expected shape \[2, 3\] on cpu, got \[6\]"):
        kernels.rms_linear_swiglu(x, torch.ones(8), w_gate, w_up, rstd=torch.ones(6))


def test_rms_reference_backward_matches_autograd():
    x, w_gate, w_up = make((9,), 7, 5, torch.float64, device="cpu")
    w_norm = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)  # differentiable here: autograd's dx goes through it
    out, g, u = reference.rms_linear_swiglu(x, rstd, w_norm, w_gate, w_up)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), (x, w_norm, w_gate, w_up))
    leaves = (x.detach(), rstd.detach(), w_norm.detach(), w_gate.detach(), w_up.detach())
    got = reference.rms_linear_swiglu_backward(*leaves, g.detach(), u.detach(), dout)
    for name, a, b in zip(["x", "w_norm", "w_gate", "w_up"], got, want, strict=True):
        assert_close(a, b, what=f"d{name}", rtol=1e-10, atol=1e-12)


def test_opcheck_rms_linear_swiglu():
    x, w_gate, w_up = make((6,), 8, 10, torch.float32, device="cpu")
    w_norm = (torch.rand(8) + 0.5).requires_grad_()
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1) + 1e-6)
    torch.library.opcheck(torch.ops.mmrec.rms_linear_swiglu_fwd.default, (x, rstd, w_norm, w_gate, w_up, True))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_grad_kernel_matches_the_reference(dtype):
    """The eager backward's pointwise part in one kernel: [dg, du] side by side, odd widths."""
    g, u, dout = (torch.randn(7, 37).to(TRITON_DEVICE, dtype) * 3 for _ in range(3))
    got = kernel.swiglu_grad(g, u, dout.t().contiguous().t())  # a strided dout is made contiguous
    want = reference.swiglu_grad(g.cpu(), u.cpu(), dout.cpu())
    assert got.shape == (7, 74) and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(got.float().cpu(), want.float(), what="dgu", rtol=tol, atol=tol)
