"""The Triton gated recurrence vs its reference and a naive loop: odd shapes, fp32/bf16, all
gradients, NaN-poisoned outputs, both the CUDA-core and the tensor-core (dot) paths.
Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.recurrence import kernel, reference
from tests.conftest import TRITON_DEVICE, assert_close
from tests.kernels.test_gated_recurrence import naive

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)
    monkeypatch.setattr(kernels.knobs, "autotune", False)  # tuning every odd shape costs minutes


def make(bsz, steps, heads, dh, dtype, with_h0=True):
    width = heads * dh
    z, gz = torch.randn(bsz, steps, width), torch.randn(bsz, steps, width)
    gamma = torch.rand(bsz, steps, width).clamp(0.05, 0.95)
    w_g = torch.randn(heads, dh, dh) / dh**0.5
    h0 = torch.randn(bsz, width) if with_h0 else None
    return [t.to(TRITON_DEVICE, dtype) if t is not None else None for t in (z, gz, gamma, w_g, h0)]


def check(args, dtype, tol):
    leaves = [t.requires_grad_() for t in args if t is not None]
    h, h_last = kernels.gated_recurrence(*args)
    dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
    grads = torch.autograd.grad((h.float() * dh.float()).sum() + (h_last.float() * dlast.float()).sum(), leaves)
    cpu = [t.detach().cpu().double() if t is not None else None for t in args]
    ref_h, ref_last = reference.forward(*cpu)
    ref_grads = reference.backward(*cpu, ref_h, dh.cpu().double(), dlast.cpu().double())
    assert_close(h.cpu(), ref_h, what="h", **tol)
    assert_close(h_last.cpu(), ref_last, what="h_last", **tol)
    for name, g, r in zip(["z", "gz", "gamma", "w_g", "h0"], grads, ref_grads, strict=False):
        assert g.dtype == dtype
        assert_close(g.cpu(), r, what=f"d{name}", **tol)


@pytest.mark.parametrize(("bsz", "steps", "heads", "dh"), [(3, 1, 2, 3), (3, 37, 2, 5), (2, 500, 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_h0", [True, False])
def test_triton_recurrence_matches_reference(bsz, steps, heads, dh, dtype, with_h0):
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    check(make(bsz, steps, heads, dh, dtype, with_h0), dtype, tol)


def test_tensor_core_path(monkeypatch):
    """BLOCK_B >= 16 makes the W_g products tl.dot; 17 rows leave a partial batch tile."""
    if TRITON_DEVICE == "cpu":
        monkeypatch.setattr(kernel, "_INTERPRET_BLOCK_B", 16)
    check(make(17, 23, 2, 16, torch.float32), torch.float32, {"rtol": 1e-4, "atol": 1e-4})


def test_triton_recurrence_matches_the_naive_loop():
    args = make(2, 7, 2, 3, torch.float32)
    h, _ = kernels.gated_recurrence(*args)
    assert_close(h.cpu(), naive(*[t.cpu() for t in args]).float(), what="h")


def test_launchers_write_every_element():
    z, gz, gamma, w_g, h0 = make(5, 29, 3, 6, torch.float32)
    h, h_last = kernel.gated_fwd(z, gz, gamma, w_g, h0)
    grads = kernel.gated_bwd(z, gz, gamma, w_g, h0, h, torch.randn_like(h), torch.randn_like(h_last))
    for t in (h, h_last, *grads):
        assert not torch.isnan(t).any()


def check_decay(args, dtype, tol, eps=1e-6):
    """decay_recurrence (gamma formed on chip from two logits) vs the reference with autograd:
    the reference recurrence on clamp(sigmoid(a) sigmoid(c)), in fp64."""
    leaves = [t.requires_grad_() for t in args if t is not None]
    h, h_last = kernels.decay_recurrence(*args, eps=eps)
    dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
    grads = torch.autograd.grad((h.float() * dh.float()).sum() + (h_last.float() * dlast.float()).sum(), leaves)
    cpu = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in args]
    z, gz, a, c, w_g, h0 = cpu
    ref_h, ref_last = reference.gated_recurrence(z, gz, kernels.decay_gate(a, c, eps), w_g, h0)
    ref_leaves = [t for t in cpu if t is not None]
    total = (ref_h * dh.cpu().double()).sum() + (ref_last * dlast.cpu().double()).sum()
    ref_grads = torch.autograd.grad(total, ref_leaves)
    assert_close(h.cpu(), ref_h.detach(), what="h", **tol)
    assert_close(h_last.cpu(), ref_last.detach(), what="h_last", **tol)
    names = ["z", "gz", "a", "c", "w_g", "h0"]
    for name, g, r in zip(names, grads, ref_grads, strict=False):
        assert g.dtype == dtype
        assert_close(g.cpu(), r, what=f"d{name}", **tol)


def make_decay(bsz, steps, heads, dh, dtype, with_h0=True, saturate=False):
    z, gz, _, w_g, h0 = make(bsz, steps, heads, dh, torch.float32, with_h0)
    a, c = torch.randn_like(z) * 2, torch.randn_like(z) * 2
    if saturate:  # some products below eps and some above 1 - eps: the clamp's zero gradient shows
        a[..., 0], c[..., 0] = -12.0, -12.0
        a[..., 1], c[..., 1] = 30.0, 30.0
    return [t.to(dtype) if t is not None else None for t in (z, gz, a, c, w_g, h0)]


@pytest.mark.parametrize(("bsz", "steps", "heads", "dh"), [(3, 1, 2, 3), (3, 37, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_recurrence_matches_reference(bsz, steps, heads, dh, dtype):
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    check_decay(make_decay(bsz, steps, heads, dh, dtype, with_h0=steps > 1), dtype, tol)


def test_decay_recurrence_clamps_like_the_reference():
    check_decay(
        make_decay(2, 19, 2, 4, torch.float32, saturate=True), torch.float32, {"rtol": 1e-4, "atol": 1e-4}, 1e-3
    )


def test_decay_launchers_write_every_element():
    z, gz, a, c, w_g, h0 = make_decay(5, 29, 3, 6, torch.float32)
    h, h_last = kernel.gated_fwd(z, gz, a, w_g, h0, decay_c=c, eps=1e-6)
    grads = kernel.gated_bwd(z, gz, a, w_g, h0, h, torch.randn_like(h), torch.randn_like(h_last), decay_c=c, eps=1e-6)
    assert len(grads) == 6
    for t in (h, h_last, *grads):
        assert not torch.isnan(t).any()


def test_decay_recurrence_keeps_a_nan_logit_nan():
    # torch.clamp (the reference) propagates NaN; the kernel's clamp must too, so a NaN reaches
    # h (where training's NaN guard sees it) instead of becoming a gamma of eps.
    z, gz, a, c, w_g, h0 = make_decay(2, 9, 2, 3, torch.float32)
    a[1, 4, 2] = float("nan")
    with torch.no_grad():
        h, _ = kernels.decay_recurrence(z, gz, a, c, w_g, h0, eps=1e-6)
        ref_h, _ = reference.gated_recurrence(
            z.cpu(), gz.cpu(), kernels.decay_gate(a.cpu(), c.cpu(), 1e-6), w_g.cpu(), h0.cpu()
        )
    assert torch.isnan(ref_h).any()
    assert torch.equal(torch.isnan(h.cpu()), torch.isnan(ref_h))
