"""RMSNorm and the residual add before it (SPEC §5), plain PyTorch, with the backward written out
as the oracle for the Triton kernels:

    s = a + b (rounded to the input dtype),  r = 1 / sqrt(mean(s^2) + eps),  u = (s r) w,
    ds_total = ds + r (w du - s r mean(s r w du)),  dw = sum over rows of du (s r).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn.reference import rmsnorm


def add_rmsnorm(a: Tensor, b: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (s = a + b, or a itself without b; u = rmsnorm(s) * weight; rstd [N] fp32, N = rows)."""
    s = a if b is None else a + b
    sf = s.to(torch.promote_types(s.dtype, torch.float32))
    rstd = torch.rsqrt(sf.pow(2).mean(-1) + eps)
    return s, rmsnorm(s, weight, eps), rstd.flatten()


def add_rmsnorm_backward(
    s: Tensor, weight: Tensor, rstd: Tensor, ds: Tensor | None, du: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (the gradient reaching s, hence a and b; dweight)."""
    acc = torch.promote_types(s.dtype, torch.float32)
    width = s.shape[-1]
    sf, duf = s.to(acc).reshape(-1, width), du.to(acc).reshape(-1, width)
    r = rstd.to(acc)[:, None]
    xhat = sf * r
    dn = duf * weight.to(acc)
    dx = r * (dn - xhat * (dn * xhat).mean(-1, keepdim=True))
    if ds is not None:
        dx = dx + ds.to(acc).reshape(-1, width)
    dw = (duf * xhat).sum(0)
    return dx.view(s.shape).to(s.dtype), dw.to(weight.dtype)


def add_rstd(a: Tensor, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """-> (s = a + b, or a itself without b; rstd [N], fp32 or wider): add_rmsnorm without the norm."""
    s = a if b is None else a + b
    sf = s.to(torch.promote_types(s.dtype, torch.float32))
    return s, torch.rsqrt(sf.pow(2).mean(-1) + eps).flatten()
