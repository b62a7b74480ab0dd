"""SPEC §3 MDI decay: gamma = clamp(sigmoid(W2 gelu(W1 z)) * sigmoid(C2 gelu(C1 k)), eps, 1 - eps).

gelu is the exact (erf) form. Weights are stored [out, in] like nn.Linear. The decay splits into
its two logits (the MLPs, `mdi_decay_logits`) and a pointwise tail (`decay_gate`): the pass
fuse-decay-recurrence computes the logits here and moves the tail into the recurrence kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mdi_decay_logits(
    z: Tensor,
    k: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    c1: Tensor,
    cb1: Tensor,
    c2: Tensor,
    cb2: Tensor,
) -> tuple[Tensor, Tensor]:
    """z [B, T, D], k [B, T, Dk] -> (a, c) [B, T, D]: W2 gelu(W1 z + b1) + b2 and C2 gelu(C1 k + cb1) + cb2."""
    a = F.linear(F.gelu(F.linear(z, w1, b1)), w2, b2)
    c = F.linear(F.gelu(F.linear(k, c1, cb1)), c2, cb2)
    return a, c


def decay_gate(a: Tensor, c: Tensor, eps: float = 1e-6) -> Tensor:
    """The decay's tail: clamp(sigmoid(a) * sigmoid(c), eps, 1 - eps), in (0, 1)."""
    return torch.clamp(torch.sigmoid(a) * torch.sigmoid(c), eps, 1.0 - eps)


def decay_gate_backward(a: Tensor, c: Tensor, eps: float, dgamma: Tensor) -> tuple[Tensor, Tensor]:
    """dgamma -> (da, dc) through `decay_gate`, written out; the clamp passes the gradient where
    eps <= sigmoid(a) sigmoid(c) <= 1 - eps (bounds included, as torch.clamp does)."""
    sa, sc = torch.sigmoid(a), torch.sigmoid(c)
    p = sa * sc
    dp = torch.where((p >= eps) & (p <= 1.0 - eps), dgamma, torch.zeros_like(dgamma))
    return dp * sc * sa * (1 - sa), dp * sa * sc * (1 - sc)


def mdi_decay(
    z: Tensor,
    k: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    c1: Tensor,
    cb1: Tensor,
    c2: Tensor,
    cb2: Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """z [B, T, D], k [B, T, Dk] -> gamma [B, T, D] in (0, 1)."""
    return decay_gate(*mdi_decay_logits(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2), eps)
