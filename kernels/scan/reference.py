"""SPEC §1 linear scan, plain PyTorch: h_t = exp(clamp(log_a_t, -50, 0)) h_{t-1} + b_t.

`forward` is the sequential loop (exact to fp32 rounding by construction); `backward` is the
reverse scan g_t = dh_t + a_{t+1} g_{t+1} written out, the oracle for the Triton backward.
Both accumulate in fp32 (fp64 for fp64 inputs, so gradcheck is meaningful) and return the
input dtype. The backward reads the forward's output h, as the Triton backward does.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_A_MIN = -50.0
LOG_A_MAX = 0.0


def _acc(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def scan_loop(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t over dim 1, no autograd bookkeeping. -> [B, T, C]."""
    h = torch.empty_like(b)
    prev = h0
    for t in range(b.shape[1]):
        prev = torch.addcmul(b[:, t], a[:, t], prev)
        h[:, t] = prev
    return h


def forward(log_a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """log_a, b [B, T, C], h0 [B, C] or None -> (h [B, T, C], h_last [B, C])."""
    acc = _acc(b)
    a = log_a.to(acc).clamp(LOG_A_MIN, LOG_A_MAX).exp()
    init = torch.zeros_like(a[:, 0]) if h0 is None else h0.to(acc)
    h = scan_loop(a, b.to(acc), init)
    return h.to(b.dtype), h[:, -1].to(b.dtype, copy=True)


def backward(
    log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (dlog_a, db, dh0 or None), in the dtypes of log_a, h and h0."""
    acc = _acc(h)
    la = log_a.to(acc)
    a = la.clamp(LOG_A_MIN, LOG_A_MAX).exp()
    # g_t = dh_t + a_{t+1} g_{t+1}: a forward scan over the reversed sequence.
    a_next = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1)
    g = scan_loop(a_next.flip(1), dh.to(acc).flip(1), dh_last.to(acc)).flip(1)
    init = torch.zeros_like(a[:, 0]) if h0 is None else h0.to(acc)
    h_prev = torch.cat([init[:, None], h[:, :-1].to(acc)], dim=1)
    in_range = (la >= LOG_A_MIN) & (la <= LOG_A_MAX)
    dlog_a = torch.where(in_range, g * a * h_prev, 0.0)
    dh0 = None if h0 is None else (a[:, 0] * g[:, 0]).to(h0.dtype)
    return dlog_a.to(log_a.dtype), g.to(h.dtype), dh0


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a: Tensor, b: Tensor, h0: Tensor | None):
        h, h_last = forward(log_a, b, h0)
        ctx.save_for_backward(log_a, h, h0)
        return h, h_last

    @staticmethod
    def backward(ctx, dh: Tensor, dh_last: Tensor):
        log_a, h, h0 = ctx.saved_tensors
        return backward(log_a, h, h0, dh, dh_last)


def linear_scan(log_a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The reference with autograd: (h [B, T, C], h_last [B, C])."""
    return _LinearScan.apply(log_a, b, h0)
