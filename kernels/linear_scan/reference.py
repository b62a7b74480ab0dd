"""SPEC §1 linear scan, plain PyTorch: h_t = exp(clamp(log_a_t, -50, 0)) h_{t-1} + b_t.

The forward is the sequential loop (exact to fp32 rounding by construction); the backward is the
reverse scan g_t = dh_t + a_{t+1} g_{t+1}, written out so that it is the oracle for the Triton
backward. Everything accumulates in fp32 and returns in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_A_MIN = -50.0
LOG_A_MAX = 0.0


def scan_loop(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t over dim 1, all fp32, no autograd bookkeeping. -> [B, T, C]."""
    h = torch.empty_like(b)
    prev = h0
    for t in range(b.shape[1]):
        prev = torch.addcmul(b[:, t], a[:, t], prev)
        h[:, t] = prev
    return h


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a: Tensor, b: Tensor, h0: Tensor | None):
        dtype = b.dtype
        acc = torch.promote_types(b.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        la = log_a.to(acc)
        a = la.clamp(LOG_A_MIN, LOG_A_MAX).exp()  # [B, T, C]
        init = torch.zeros_like(a[:, 0]) if h0 is None else h0.to(acc)
        h = scan_loop(a, b.to(acc), init)  # [B, T, C]
        ctx.save_for_backward(la, a, h, init)
        ctx.has_h0 = h0 is not None
        ctx.dtypes = (log_a.dtype, b.dtype, None if h0 is None else h0.dtype)
        return h.to(dtype), h[:, -1].to(dtype)

    @staticmethod
    def backward(ctx, dh: Tensor | None, dh_last: Tensor | None):
        la, a, h, init = ctx.saved_tensors
        dh = torch.zeros_like(h) if dh is None else dh.to(h.dtype)
        carry = torch.zeros_like(init) if dh_last is None else dh_last.to(h.dtype)
        # g_t = dh_t + a_{t+1} g_{t+1}: a forward scan over the reversed sequence.
        a_next = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1)
        g = scan_loop(a_next.flip(1), dh.flip(1), carry).flip(1)  # [B, T, C]
        h_prev = torch.cat([init[:, None], h[:, :-1]], dim=1)
        in_range = (la >= LOG_A_MIN) & (la <= LOG_A_MAX)
        dlog_a = torch.where(in_range, g * a * h_prev, 0.0)
        dh0 = a[:, 0] * g[:, 0] if ctx.has_h0 else None
        la_dtype, b_dtype, h0_dtype = ctx.dtypes
        return dlog_a.to(la_dtype), g.to(b_dtype), None if dh0 is None else dh0.to(h0_dtype)


def linear_scan(log_a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log_a, b: [B, T, C]; h0: [B, C] or None -> (h [B, T, C], h_last [B, C])."""
    return _LinearScan.apply(log_a, b, h0)
