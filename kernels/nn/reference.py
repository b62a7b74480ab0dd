"""Plain-PyTorch implementations of the non-recurrent ops: norms, projections, FFN, MoE, losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rmsnorm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def moe(
    x: Tensor,
    router: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    top_k: int,
    capacity_factor: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """Top-k routing over E SwiGLU experts -> (y [B, T, D], Switch load-balance loss []).

    Gate weights are the router softmax renormalised over the chosen k. In training each expert
    takes at most ceil(capacity_factor * N * k / E) tokens (earliest first); the rest of its
    tokens skip it. Capacity is not applied in eval, so decoding one token at a time gives
    the same result as a forward over the whole sequence (SPEC §6). Every expert runs densely
    on every token here (the reference favours clarity and static shapes over FLOPs).
    """
    tokens = x.flatten(0, 1)  # [N, D]
    n, experts = tokens.shape[0], router.shape[0]
    probs = torch.softmax(F.linear(tokens, router).float(), dim=-1)  # [N, E]
    top_p, top_i = probs.topk(top_k, dim=-1)  # [N, k]
    chosen = F.one_hot(top_i, experts).sum(1)  # [N, E] 0/1
    if training:
        capacity = math.ceil(capacity_factor * n * top_k / experts)
        rank = torch.cumsum(chosen, dim=0) - 1
        chosen = chosen * (rank < capacity)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
    weights = (weights * chosen).to(x.dtype)  # [N, E]
    hidden = F.silu(torch.einsum("nd,efd->nef", tokens, w_gate)) * torch.einsum("nd,efd->nef", tokens, w_up)
    out = torch.einsum("nef,edf,ne->nd", hidden, w_down, weights)
    frac = F.one_hot(top_i, experts).sum((0, 1)).float() / (n * top_k)
    balance = experts * (frac * probs.mean(0)).sum()
    return out.view_as(x), balance.to(x.dtype)


def uboo_loss(h: Tensor, h0: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """SPEC §5 planning error mean((P stopgrad(h_t) - Q h_{t-1})^2), h_{-1} = h0."""
    prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
    return (F.linear(h.detach(), p) - F.linear(prev, q)).float().pow(2).mean().to(h.dtype)
