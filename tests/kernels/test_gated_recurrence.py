import pytest
import torch

from kernels import gated_recurrence
from tests.conftest import assert_close


def naive(z, gz, gamma, w_g, h0):
    """Per-row, per-head, per-element loop in fp64 (autograd-differentiable)."""
    bsz, steps, width = z.shape
    heads, dh, _ = w_g.shape
    out = []
    for i in range(bsz):
        h = [h0[i, j].double() if h0 is not None else torch.zeros((), dtype=torch.float64) for j in range(width)]
        row = []
        for t in range(steps):
            new = []
            for hd in range(heads):
                for e in range(dh):
                    j = hd * dh + e
                    pre = sum(h[hd * dh + d] * w_g[hd, d, e].double() for d in range(dh)) + gz[i, t, j].double()
                    new.append(z[i, t, j].double() * torch.sigmoid(pre) + gamma[i, t, j].double() * h[j])
            h = new
            row.append(torch.stack(h))
        out.append(torch.stack(row))
    return torch.stack(out)


def inputs(bsz, steps, heads, dh, dtype=torch.float32, with_h0=True):
    width = heads * dh
    z = torch.randn(bsz, steps, width).to(dtype)
    gz = torch.randn(bsz, steps, width).to(dtype)
    gamma = torch.rand(bsz, steps, width).clamp(0.05, 0.95).to(dtype)
    w_g = (torch.randn(heads, dh, dh) / dh**0.5).to(dtype)
    h0 = torch.randn(bsz, width).to(dtype) if with_h0 else None
    return z, gz, gamma, w_g, h0


@pytest.mark.parametrize(("steps", "heads", "dh"), [(1, 2, 3), (37, 2, 3), (20, 1, 5)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_forward_and_all_gradients_match_the_naive_loop(steps, heads, dh, with_h0):
    args = inputs(2, steps, heads, dh, with_h0=with_h0)
    leaves = [t.requires_grad_() for t in args if t is not None]
    h, h_last = gated_recurrence(*args)
    expected = naive(*args)
    assert_close(h, expected.float(), what="h")
    assert_close(h_last, expected[:, -1].float(), what="h_last")
    dh_, dlast = torch.randn_like(h), torch.randn_like(h_last)
    grads = torch.autograd.grad((h * dh_).sum() + (h_last * dlast).sum(), leaves)
    ref = torch.autograd.grad((expected * dh_).sum() + (expected[:, -1] * dlast).sum(), leaves)
    for name, g, r in zip(["z", "gz", "gamma", "w_g", "h0"], grads, ref, strict=False):
        assert_close(g, r.float(), rtol=1e-4, atol=1e-5, what=f"d{name}")


def test_bf16_runs_in_fp32_and_returns_bf16():
    args = inputs(2, 37, 2, 3, dtype=torch.bfloat16)
    h, _ = gated_recurrence(*args)
    assert h.dtype == torch.bfloat16
    assert_close(h, naive(*args).float(), rtol=2e-2, atol=2e-2, what="h (bf16)")


def test_long_sequence_matches_vectorised_autograd_loop():
    z, gz, gamma, w_g, h0 = inputs(3, 500, 4, 8)
    h, _ = gated_recurrence(z, gz, gamma, w_g, h0)
    prev = h0.view(3, 4, 8)
    for t in range(500):
        gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", prev, w_g) + gz[:, t].view(3, 4, 8))
        prev = z[:, t].view(3, 4, 8) * gate + gamma[:, t].view(3, 4, 8) * prev
    assert_close(h[:, -1], prev.flatten(1), rtol=1e-4, atol=1e-5, what="h[T-1]")


def test_gradcheck_fp64():
    args = [t.double().requires_grad_() for t in inputs(2, 6, 2, 3)]
    assert torch.autograd.gradcheck(lambda *a: gated_recurrence(*a), tuple(args))
