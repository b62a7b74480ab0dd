import pytest
import torch

from kernels import linear_scan
from tests.conftest import assert_close


def naive(log_a, b, h0):
    """Per-element Python loop in fp64: the oracle, autograd-differentiable."""
    bsz, steps, width = b.shape
    rows = []
    for i in range(bsz):
        h = [h0[i, c] if h0 is not None else torch.zeros((), dtype=torch.float64) for c in range(width)]
        row = []
        for t in range(steps):
            h = [
                torch.exp(torch.clamp(log_a[i, t, c].double(), -50, 0)) * h[c] + b[i, t, c].double()
                for c in range(width)
            ]
            row.append(torch.stack(h))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def inputs(bsz, steps, width, dtype=torch.float32, with_h0=True):
    log_a = (torch.rand(bsz, steps, width) * -3).to(dtype)
    b = torch.randn(bsz, steps, width).to(dtype)
    h0 = torch.randn(bsz, width).to(dtype) if with_h0 else None
    return log_a, b, h0


@pytest.mark.parametrize(("steps", "width"), [(1, 3), (37, 5), (63, 2)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_forward_and_gradients_match_the_naive_loop(steps, width, with_h0):
    log_a, b, h0 = inputs(2, steps, width, with_h0=with_h0)
    leaves = [t.requires_grad_() for t in (log_a, b, h0) if t is not None]
    h, h_last = linear_scan(log_a, b, h0)
    expected = naive(log_a, b, h0)
    assert_close(h, expected.float(), what="h")
    assert_close(h_last, expected[:, -1].float(), what="h_last")

    dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
    grads = torch.autograd.grad((h * dh).sum() + (h_last * dlast).sum(), leaves)
    ref = torch.autograd.grad((expected * dh).sum() + (expected[:, -1] * dlast).sum(), leaves)
    for name, g, r in zip(["log_a", "b", "h0"], grads, ref, strict=False):
        assert_close(g, r.float(), rtol=1e-4, atol=1e-5, what=f"d{name}")


def test_long_sequence_500():
    log_a, b, h0 = inputs(1, 500, 4)
    h, _ = linear_scan(log_a, b, h0)
    ref, out = h0.double(), []
    for t in range(500):
        ref = torch.exp(log_a[:, t].double()) * ref + b[:, t].double()
        out.append(ref)
    assert_close(h, torch.stack(out, 1).float(), what="h")


def test_bf16_inputs_accumulate_in_fp32():
    log_a, b, h0 = inputs(2, 37, 5, dtype=torch.bfloat16)
    h, h_last = linear_scan(log_a, b, h0)
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.bfloat16
    expected = naive(log_a, b, h0)
    assert_close(h, expected.float(), rtol=1e-2, atol=1e-2, what="h (bf16)")


def test_clamped_log_a_gets_zero_gradient_and_is_clamped():
    log_a = torch.tensor([[[-80.0, 0.5, -0.3]]]).requires_grad_()
    b = torch.ones(1, 1, 3)
    h0 = torch.ones(1, 3)
    h, _ = linear_scan(log_a, b, h0)
    # exp(-50) ~ 2e-22, exp(0) = 1: the clamp bounds the decay.
    assert_close(h[0, 0], torch.tensor([1.0, 2.0, 1.0 + torch.exp(torch.tensor(-0.3)).item()]), what="h")
    h.sum().backward()
    assert log_a.grad[0, 0, 0] == 0 and log_a.grad[0, 0, 1] == 0 and log_a.grad[0, 0, 2] != 0


def test_gradcheck_fp64():
    log_a = (torch.rand(2, 9, 3, dtype=torch.float64) * -2).requires_grad_()
    b = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: linear_scan(*a), (log_a, b, h0))
