"""SPEC §3 MDI decay: gamma = clamp(sigmoid(W2 gelu(W1 z)) * sigmoid(C2 gelu(C1 k)), eps, 1 - eps).

gelu is the exact (erf) form. Weights are stored [out, in] like nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    base = torch.sigmoid(F.linear(F.gelu(F.linear(z, w1, b1)), w2, b2))
    context = torch.sigmoid(F.linear(F.gelu(F.linear(k, c1, cb1)), c2, cb2))
    return torch.clamp(base * context, eps, 1.0 - eps)
