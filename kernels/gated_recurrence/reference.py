"""SPEC §2 gated recurrence, plain PyTorch:

    h_t = z_t * sigmoid(W_g h_{t-1} + gz_t) + gamma_t * h_{t-1},   (W_g h)[i, e] = sum_d h[i, d] W_g[i, d, e]

Sequential in T, vectorised over batch and heads. The backward is written out (reverse loop,
recomputing the gate from the saved states) so it is the oracle for the Triton backward:

    dz_t = dh_t s_t,  dp_t = dh_t z_t s_t (1 - s_t) = dgz_t,  dgamma_t = dh_t h_{t-1},
    dh_{t-1} += gamma_t dh_t + W_g dp_t,  dW_g += h_{t-1}^T dp_t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1))


class _GatedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None):
        bsz, steps, width = z.shape
        heads = w_g.shape[0]
        acc = torch.promote_types(z.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        zf, gzf, gf = (_heads(t.to(acc), heads) for t in (z, gz, gamma))  # [B, T, H, Dh]
        w = w_g.to(acc)  # [H, Dh, Dh]
        if h0 is None:
            prev = torch.zeros(bsz, heads, width // heads, device=z.device, dtype=acc)
        else:
            prev = _heads(h0.to(acc), heads)
        init = prev
        h = torch.empty_like(zf)  # [B, T, H, Dh]
        for t in range(steps):
            gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", prev, w) + gzf[:, t])
            prev = zf[:, t] * gate + gf[:, t] * prev
            h[:, t] = prev
        ctx.save_for_backward(zf, gzf, gf, w, h, init)
        ctx.has_h0 = h0 is not None
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (z, gz, gamma, w_g, h0))
        return h.flatten(2).to(z.dtype), h[:, -1].flatten(1).to(z.dtype)

    @staticmethod
    def backward(ctx, dh: Tensor | None, dh_last: Tensor | None):
        zf, gzf, gf, w, h, init = ctx.saved_tensors
        heads = w.shape[0]
        dh = torch.zeros_like(h) if dh is None else _heads(dh.to(h.dtype), heads)
        carry = torch.zeros_like(init) if dh_last is None else _heads(dh_last.to(h.dtype), heads)
        dz, dgz, dgamma = torch.empty_like(zf), torch.empty_like(zf), torch.empty_like(zf)
        dw = torch.zeros_like(w)
        for t in range(zf.shape[1] - 1, -1, -1):
            prev = h[:, t - 1] if t > 0 else init
            gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", prev, w) + gzf[:, t])
            g = dh[:, t] + carry  # total gradient reaching h_t
            dz[:, t] = g * gate
            dp = g * zf[:, t] * gate * (1 - gate)
            dgz[:, t] = dp
            dgamma[:, t] = g * prev
            dw += torch.einsum("bhd,bhe->hde", prev, dp)
            carry = gf[:, t] * g + torch.einsum("hde,bhe->bhd", w, dp)
        dts = ctx.dtypes
        grads = [
            dz.flatten(2),
            dgz.flatten(2),
            dgamma.flatten(2),
            dw,
            carry.flatten(1) if ctx.has_h0 else None,
        ]
        return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, dts, strict=True))


def gated_recurrence(
    z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """z, gz, gamma: [B, T, D]; w_g: [H, Dh, Dh]; h0: [B, D] or None -> (h [B, T, D], h_last [B, D])."""
    return _GatedRecurrence.apply(z, gz, gamma, w_g, h0)
