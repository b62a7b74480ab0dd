"""SPEC §2 gated recurrence, plain PyTorch:

    h_t = z_t * sigmoid(W_g h_{t-1} + gz_t) + gamma_t * h_{t-1},   (W_g h)[i, e] = sum_d h[i, d] W_g[i, d, e]

Sequential in T, vectorised over batch and heads. `backward` is written out (a reverse loop that
recomputes the gate from the saved states), the oracle for the Triton backward:

    dz_t = g_t s_t,  dp_t = g_t z_t s_t (1 - s_t) = dgz_t,  dgamma_t = g_t h_{t-1},
    g_{t-1} = dh_{t-1} + gamma_t g_t + W_g dp_t,  dW_g += h_{t-1}^T dp_t.

Accumulation is fp32 (fp64 for fp64 inputs); results come back in the input dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..decay.reference import decay_gate, decay_gate_backward


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1))


def _initial(h0: Tensor | None, like: Tensor, heads: int) -> Tensor:
    """h0 [B, D] (or zeros) as [B, H, Dh] in the accumulation dtype of `like` [B, T, H, Dh]."""
    if h0 is None:
        return torch.zeros_like(like[:, 0])
    return _heads(h0.to(like.dtype), heads)


def forward(z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """z, gz, gamma [B, T, D]; w_g [H, Dh, Dh]; h0 [B, D] or None -> (h [B, T, D], h_last [B, D])."""
    heads = w_g.shape[0]
    acc = torch.promote_types(z.dtype, torch.float32)
    zf, gzf, gf = (_heads(t.to(acc), heads) for t in (z, gz, gamma))  # [B, T, H, Dh]
    w = w_g.to(acc)
    prev = _initial(h0, zf, heads)
    h = torch.empty_like(zf)
    for t in range(zf.shape[1]):
        gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", prev, w) + gzf[:, t])
        prev = zf[:, t] * gate + gf[:, t] * prev
        h[:, t] = prev
    return h.flatten(2).to(z.dtype), h[:, -1].flatten(1).to(z.dtype, copy=True)


def backward(
    z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None, h: Tensor, dh: Tensor, dh_last: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """-> (dz, dgz, dgamma, dw_g, dh0 or None)."""
    heads = w_g.shape[0]
    acc = torch.promote_types(z.dtype, torch.float32)
    zf, gzf, gf, hf, dhf = (_heads(t.to(acc), heads) for t in (z, gz, gamma, h, dh))
    w = w_g.to(acc)
    init = _initial(h0, zf, heads)
    carry = _heads(dh_last.to(acc), heads)
    dz, dgz, dgamma = torch.empty_like(zf), torch.empty_like(zf), torch.empty_like(zf)
    dw = torch.zeros_like(w)
    for t in range(zf.shape[1] - 1, -1, -1):
        prev = hf[:, t - 1] if t > 0 else init
        gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", prev, w) + gzf[:, t])
        g = dhf[:, t] + carry  # the whole gradient reaching h_t
        dz[:, t] = g * gate
        dp = g * zf[:, t] * gate * (1 - gate)
        dgz[:, t] = dp
        dgamma[:, t] = g * prev
        dw += torch.einsum("bhd,bhe->hde", prev, dp)
        carry = gf[:, t] * g + torch.einsum("hde,bhe->bhd", w, dp)
    dh0 = None if h0 is None else carry.flatten(1).to(h0.dtype)
    return (
        dz.flatten(2).to(z.dtype),
        dgz.flatten(2).to(gz.dtype),
        dgamma.flatten(2).to(gamma.dtype),
        dw.to(w_g.dtype),
        dh0,
    )


def _gate_of(a: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    acc = torch.promote_types(a.dtype, torch.float32)
    af, cf = a.to(acc), c.to(acc)
    return af, cf, decay_gate(af, cf, eps)


def decay_forward(
    z: Tensor, gz: Tensor, a: Tensor, c: Tensor, w_g: Tensor, h0: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """`forward` with gamma = clamp(sigmoid(a) sigmoid(c), eps, 1 - eps) (SPEC §3's tail) formed here."""
    return forward(z, gz, _gate_of(a, c, eps)[2], w_g, h0)


def decay_backward(
    z: Tensor,
    gz: Tensor,
    a: Tensor,
    c: Tensor,
    w_g: Tensor,
    h0: Tensor | None,
    h: Tensor,
    dh: Tensor,
    dh_last: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """-> (dz, dgz, da, dc, dw_g, dh0 or None)."""
    af, cf, gamma = _gate_of(a, c, eps)
    dz, dgz, dgamma, dw, dh0 = backward(z, gz, gamma, w_g, h0, h, dh, dh_last)
    da, dc = decay_gate_backward(af, cf, eps, dgamma)
    return dz, dgz, da.to(a.dtype), dc.to(c.dtype), dw, dh0


class _GatedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None):
        h, h_last = forward(z, gz, gamma, w_g, h0)
        ctx.save_for_backward(z, gz, gamma, w_g, h0, h)
        return h, h_last

    @staticmethod
    def backward(ctx, dh: Tensor, dh_last: Tensor):
        return backward(*ctx.saved_tensors, dh, dh_last)


def gated_recurrence(
    z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The reference with autograd: (h [B, T, D], h_last [B, D])."""
    return _GatedRecurrence.apply(z, gz, gamma, w_g, h0)
