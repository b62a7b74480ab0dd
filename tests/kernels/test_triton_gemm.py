"""The GEMM with the residual add or the RMSNorm in its epilogue (kernels/linear/gemm.py) vs fp64:
odd sizes (rows, widths and output widths not multiples of the tile), fp32/bf16, a strided
residual (a column slice, not copied), every gradient (x's through rstd too), NaN-poisoned
outputs; the fallbacks; opcheck. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.checks import KernelInputError
from kernels.linear import gemm, reference
from kernels.nn.reference import rmsnorm as ref_rmsnorm
from tests.conftest import TRITON_DEVICE, assert_close


@pytest.fixture(autouse=True)
def _knobs(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)
    monkeypatch.setattr(kernels.knobs, "autotune", False)
    # The kernel's logic in exact fp32 on CUDA too (the op leaves exact fp32 to cuBLAS).
    monkeypatch.setattr(gemm, "tensor_cores", lambda dtype: True)


def spy(monkeypatch):
    """-> (launch grids, data pointers of the residuals the launcher saw)."""
    calls, seen = [], []
    real, launcher = gemm._gemm_tma, gemm.linear_fwd
    monkeypatch.setattr(gemm, "_gemm_tma", type("Spy", (), {"__getitem__": lambda _s, g: calls.append(g) or real[g]})())
    monkeypatch.setattr(
        gemm,
        "linear_fwd",
        lambda x, w, r=None, *a: seen.append(None if r is None else r.data_ptr()) or launcher(x, w, r, *a),
    )
    return calls, seen


def check(name, got, want, dtype):
    if dtype == torch.float32:
        assert_close(got.cpu(), want, what=name, rtol=1e-4, atol=1e-5)
    else:  # bf16 rounds the inputs and the sum: the whole tensor's relative error
        assert not torch.isnan(got).any(), f"{name}: NaN"
        err = ((got.cpu().double() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.1e}"


@pytest.mark.triton
@pytest.mark.parametrize(("lead", "width", "out_width"), [((2, 37), 24, 40), ((63,), 16, 16), ((5,), 48, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "column-slice"])
def test_linear_residual_matches_fp64(lead, width, out_width, dtype, strided, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(*lead, width).to(TRITON_DEVICE, dtype).requires_grad_()
    w = (torch.randn(out_width, width) / width**0.5).to(TRITON_DEVICE, dtype).requires_grad_()
    wide = torch.randn(*lead, out_width + (8 if strided else 0)).to(TRITON_DEVICE, dtype)
    res = wide[..., :out_width].detach().requires_grad_() if not strided else wide.requires_grad_()
    res_in = res[..., :out_width] if strided else res
    calls, seen = spy(monkeypatch)
    out = kernels.linear_residual(x, w, res_in)
    assert calls, "the Triton kernel did not run"
    assert seen == [res.data_ptr()], "the residual was copied before the kernel"
    assert out.shape == (*lead, out_width) and out.dtype == dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (x, w, res))
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, res)]
    want = leaves[2][..., :out_width] + leaves[0] @ leaves[1].T
    want_grads = torch.autograd.grad((want * dout.cpu().double()).sum(), leaves)
    for name, got, ref in zip(["out", "dx", "dw", "dres"], (out, *grads), (want.detach(), *want_grads), strict=True):
        check(name, got, ref, dtype)


@pytest.mark.triton
def test_unaligned_rows_fall_back_to_addmm():
    """Rows of 50 bf16 values (100 bytes) cannot go by TMA: cuBLAS's addmm runs instead."""
    x = torch.randn(9, 50).to(TRITON_DEVICE, torch.bfloat16)
    w = torch.randn(24, 50).to(TRITON_DEVICE, torch.bfloat16)
    res = torch.randn(9, 24).to(TRITON_DEVICE, torch.bfloat16)
    out = gemm.linear_fwd(x, w, res)
    assert_close(out.float().cpu(), (res.float() + x.float() @ w.float().T).cpu(), what="out", rtol=2e-2, atol=5e-2)


@pytest.mark.triton
@pytest.mark.parametrize("residual", [False, True], ids=["own-rstd", "add_rstd"])
@pytest.mark.parametrize(("lead", "width", "out_width"), [((2, 37), 24, 40), ((63,), 16, 16), ((5,), 48, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_linear_matches_fp64(lead, width, out_width, dtype, residual, monkeypatch):
    """The norm in the epilogue: rows scaled by rstd (computed by the op, or by the add_rstd
    that made x), the norm's weight folded into the weight's copy; every gradient."""
    torch.manual_seed(0)
    parts = [(torch.randn(*lead, width) * 3).to(TRITON_DEVICE, dtype).requires_grad_()]  # far from unit RMS
    w = (torch.randn(out_width, width) / width**0.5).to(TRITON_DEVICE, dtype).requires_grad_()
    w_norm = (torch.rand(width) + 0.5).to(TRITON_DEVICE, dtype).requires_grad_()
    calls, _ = spy(monkeypatch)
    if residual:
        parts.append(torch.randn_like(parts[0]).requires_grad_())
        total, rstd = kernels.add_rstd(*parts, 1e-5)
        out = kernels.rms_linear(total, w_norm, w, rstd=rstd)
    else:
        out = kernels.rms_linear(parts[0], w_norm, w, 1e-5)
    assert calls, "the Triton kernel did not run"
    assert out.shape == (*lead, out_width) and out.dtype == dtype
    dout = torch.randn_like(out)
    leaves = (*parts, w_norm, w)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves)
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    xs = sum(ref[: len(parts)])
    want = (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5) * ref[-2]) @ ref[-1].T
    want_grads = torch.autograd.grad((want * dout.cpu().double()).sum(), ref)
    names = ["out", *(f"d{n}" for n in ("a", "b")[: len(parts)]), "dw_norm", "dw"]
    for name, got, want_ in zip(names, (out, *grads), (want.detach(), *want_grads), strict=True):
        check(name, got, want_, dtype)


@pytest.mark.triton
def test_unaligned_output_rows_fall_back(monkeypatch):
    """Output rows of 5 fp32 values (20 bytes) cannot leave by TMA: the reference runs."""
    calls, _ = spy(monkeypatch)
    x, w_norm, w = torch.randn(4, 16), torch.rand(16) + 0.5, torch.randn(5, 16)
    x, w_norm, w = (t.to(TRITON_DEVICE) for t in (x, w_norm, w))
    out = kernels.rms_linear(x, w_norm, w, 1e-6)
    res = torch.randn(4, 8).to(TRITON_DEVICE)[:, :5]
    summed = kernels.linear_residual(x, w, res)
    assert not calls
    normed = ref_rmsnorm(x.cpu(), w_norm.cpu(), 1e-6)
    assert_close(out.cpu(), normed @ w.cpu().T, what="rms_linear", rtol=1e-5, atol=1e-5)
    assert_close(summed.cpu(), res.cpu() + x.cpu() @ w.cpu().T, what="linear_residual", rtol=1e-5, atol=1e-5)


def test_reference_backward_matches_autograd():
    x, w, res = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((7, 5), (3, 5), (7, 3)))
    out = reference.linear_epilogue(x, w, res)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), (x, w, res))
    dx, dw, _ = reference.linear_epilogue_backward(x.detach(), w.detach(), dout)
    for name, a, b in zip(["x", "w", "res"], (dx, dw, dout), want, strict=True):
        assert_close(a, b, what=f"d{name}", rtol=1e-12, atol=1e-12)
    w_norm = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)  # differentiable here: autograd's dx goes through it
    out = reference.linear_epilogue(x, w, None, w_norm, rstd)
    want = torch.autograd.grad((out * dout).sum(), (x, w, w_norm))
    got = reference.linear_epilogue_backward(x.detach(), w.detach(), dout, w_norm.detach(), rstd.detach())
    for name, a, b in zip(["x", "w", "w_norm"], got, want, strict=True):
        assert_close(a, b, what=f"d{name} (norm)", rtol=1e-10, atol=1e-12)


def test_opcheck_linear_residual_and_rms_linear():
    x, w, res = (torch.randn(*s, requires_grad=True) for s in ((6, 8), (10, 8), (6, 10)))
    torch.library.opcheck(torch.ops.mmrec.linear_residual_fwd.default, (x, w, res))
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1) + 1e-6)
    w_norm = (torch.rand(8) + 0.5).requires_grad_()
    torch.library.opcheck(torch.ops.mmrec.rms_linear_fwd.default, (x, rstd, w_norm, w))


def test_errors_name_the_argument():
    x, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    with pytest.raises(KernelInputError, match=r"linear_residual: res: expected shape \[2, 3, 10\], got \[2, 3, 9\]"):
        kernels.linear_residual(x, w, torch.randn(2, 3, 9))
    with pytest.raises(KernelInputError, match=r"linear_residual: w: expected shape \[10, 8\], got \[10, 7\]"):
        kernels.linear_residual(x, w[:, :7], torch.randn(2, 3, 10))
