import math

import torch

from kernels import mdi_decay
from tests.conftest import assert_close


def test_matches_a_per_token_loop_and_stays_in_the_open_interval():
    d, dk, f = 8, 4, 2
    z, k = torch.randn(2, 5, d, dtype=torch.float64), torch.randn(2, 5, dk, dtype=torch.float64)
    w = [torch.randn(*s, dtype=torch.float64) for s in [(f, d), (f,), (d, f), (d,), (f, dk), (f,), (d, f), (d,)]]
    gamma = mdi_decay(z, k, *w)

    def gelu(x):
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def mlp(x, w1, b1, w2, b2):
        hidden = [
            gelu(sum(w1[j, i].item() * x[i].item() for i in range(len(x))) + b1[j].item()) for j in range(len(b1))
        ]
        return [
            sig(sum(w2[o, j].item() * hidden[j] for j in range(len(hidden))) + b2[o].item()) for o in range(len(b2))
        ]

    for b in range(2):
        for t in range(5):
            base, ctx = mlp(z[b, t], *w[:4]), mlp(k[b, t], *w[4:])
            expect = torch.tensor([min(max(x * y, 1e-6), 1 - 1e-6) for x, y in zip(base, ctx, strict=True)])
            assert_close(gamma[b, t], expect.double(), rtol=1e-10, atol=1e-12, what=f"gamma[{b}, {t}]")


def test_clamp_bounds_and_log_is_finite():
    z = torch.full((1, 1, 4), 100.0)
    k = torch.full((1, 1, 4), 100.0)
    ones = [torch.ones(4, 4), torch.zeros(4), torch.ones(4, 4) * 10, torch.ones(4) * 50]
    gamma = mdi_decay(z, k, *ones, *ones)
    assert float(gamma.max()) <= 1 - 1e-6 + 1e-9
    assert torch.isfinite(torch.log(gamma)).all()
