"""The GEMM with the residual add in its epilogue (kernels/linear/residual.py) vs fp64: odd sizes
(rows, widths and output widths not multiples of the tile), fp32/bf16, a strided residual (a
column slice), every gradient, NaN-poisoned outputs; the fallbacks; opcheck. Runs on CUDA, or
on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.checks import KernelInputError
from kernels.linear import reference, residual
from tests.conftest import TRITON_DEVICE, assert_close


@pytest.fixture(autouse=True)
def _knobs(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)
    monkeypatch.setattr(kernels.knobs, "autotune", False)
    # The kernel's logic in exact fp32 on CUDA too (the op leaves exact fp32 to cuBLAS).
    monkeypatch.setattr(residual, "tensor_cores", lambda dtype: True)


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
def test_linear_residual_matches_fp64(lead, width, out_width, dtype, strided):
    torch.manual_seed(0)
    x = torch.randn(*lead, width).to(TRITON_DEVICE, dtype).requires_grad_()
    w = (torch.randn(out_width, width) / width**0.5).to(TRITON_DEVICE, dtype).requires_grad_()
    wide = torch.randn(*lead, out_width + (8 if strided else 0)).to(TRITON_DEVICE, dtype)
    res = wide[..., :out_width].detach().requires_grad_() if not strided else wide.requires_grad_()
    res_in = res[..., :out_width] if strided else res
    calls, seen = [], []
    real, launcher = residual._residual_tma, residual.linear_residual_fwd
    residual._residual_tma = type("Spy", (), {"__getitem__": lambda _s, g: calls.append(g) or real[g]})()
    residual.linear_residual_fwd = lambda x, w, r: seen.append(r.data_ptr()) or launcher(x, w, r)
    try:
        out = kernels.linear_residual(x, w, res_in)
    finally:
        residual._residual_tma, residual.linear_residual_fwd = real, launcher
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
    out = residual.linear_residual_fwd(x, w, res)
    assert_close(out.float().cpu(), (res.float() + x.float() @ w.float().T).cpu(), what="out", rtol=2e-2, atol=5e-2)


def test_reference_backward_matches_autograd():
    x, w, res = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((7, 5), (3, 5), (7, 3)))
    out = reference.linear_residual(x, w, res)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), (x, w, res))
    got = (*reference.linear_residual_backward(x.detach(), w.detach(), dout), dout)
    for name, a, b in zip(["x", "w", "res"], got, want, strict=True):
        assert_close(a, b, what=f"d{name}", rtol=1e-12, atol=1e-12)


def test_opcheck_linear_residual():
    x, w, res = (torch.randn(*s, requires_grad=True) for s in ((6, 8), (10, 8), (6, 10)))
    torch.library.opcheck(torch.ops.mmrec.linear_residual_fwd.default, (x, w, res))


def test_errors_name_the_argument():
    x, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    with pytest.raises(KernelInputError, match=r"linear_residual: res: expected shape \[2, 3, 10\], got \[2, 3, 9\]"):
        kernels.linear_residual(x, w, torch.randn(2, 3, 9))
    with pytest.raises(KernelInputError, match=r"linear_residual: w: expected shape \[10, 8\], got \[10, 7\]"):
        kernels.linear_residual(x, w[:, :7], torch.randn(2, 3, 10))
