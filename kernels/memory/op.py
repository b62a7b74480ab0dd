"""`torch.ops.mmrec.hds_attend_fwd/_bwd`: the memory query's softmax over candidate slots.

`hds_query` builds the candidates (the carried rings plus the slots completed inside the
segment, all levels) in PyTorch, differentiably back to the segment's k and v, then calls the
op: Triton on CUDA, the reference elsewhere, the Triton interpreter for CPU tensors under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import KernelInputError, interpreting
from ..config import knobs
from . import kernel, reference
from .reference import Candidates, Memory


def _reference_bwd(q, keys, values, slot, level, span, ring, beta, pos, dout, heads):
    cand = Candidates(keys, values, slot, level, span, ring)
    return reference.attend_backward(q, cand, beta, pos, heads, dout)


def hds_attend_fwd_reference(q, keys, values, slot, level, span, ring, beta, pos, heads):
    return reference.attend_with_lse(q, Candidates(keys, values, slot, level, span, ring), beta, pos, heads)


@torch.library.custom_op("mmrec::hds_attend_fwd", mutates_args=())
def hds_attend_fwd(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    slot: Tensor,
    level: Tensor,
    span: Tensor,
    ring: Tensor,
    beta: Tensor,
    pos: Tensor,
    heads: int,
) -> tuple[Tensor, Tensor]:
    return hds_attend_fwd_reference(q, keys, values, slot, level, span, ring, beta, pos, heads)


@hds_attend_fwd.register_kernel("cuda")
def _fwd_cuda(q, keys, values, slot, level, span, ring, beta, pos, heads):
    if not knobs.use_triton:
        return hds_attend_fwd_reference(q, keys, values, slot, level, span, ring, beta, pos, heads)
    return kernel.attend_fwd(q, keys, values, slot, level, span, ring, beta, pos, heads)


@hds_attend_fwd.register_fake
def _fwd_fake(q, keys, values, slot, level, span, ring, beta, pos, heads):
    return torch.empty_like(q), q.new_empty(q.shape[0], heads, q.shape[1], dtype=torch.float32)


@torch.library.custom_op("mmrec::hds_attend_bwd", mutates_args=())
def hds_attend_bwd(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    slot: Tensor,
    level: Tensor,
    span: Tensor,
    ring: Tensor,
    beta: Tensor,
    pos: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    heads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _reference_bwd(q, keys, values, slot, level, span, ring, beta, pos, dout, heads)


@hds_attend_bwd.register_kernel("cuda")
def _bwd_cuda(q, keys, values, slot, level, span, ring, beta, pos, out, lse, dout, heads):
    if not knobs.use_triton:
        return _reference_bwd(q, keys, values, slot, level, span, ring, beta, pos, dout, heads)
    return kernel.attend_bwd(q, keys, values, slot, level, span, ring, beta, pos, out, lse, dout, heads)


@hds_attend_bwd.register_fake
def _bwd_fake(q, keys, values, slot, level, span, ring, beta, pos, out, lse, dout, heads):
    return torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values), torch.empty_like(beta)


def _setup_context(ctx, inputs, output) -> None:
    q, keys, values, slot, level, span, ring, beta, pos, heads = inputs
    ctx.save_for_backward(q, keys, values, slot, level, span, ring, beta, pos, *output)
    ctx.heads = heads


def _backward(ctx, dout: Tensor, _dlse: Tensor):
    q, keys, values, slot, level, span, ring, beta, pos, out, lse = ctx.saved_tensors
    dq, dkeys, dvalues, dbeta = torch.ops.mmrec.hds_attend_bwd(
        q, keys, values, slot, level, span, ring, beta, pos, out, lse, dout.contiguous(), ctx.heads
    )
    return dq, dkeys, dvalues, None, None, None, None, dbeta, None, None


hds_attend_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Interpreted(torch.autograd.Function):
    """The Triton kernels through the interpreter, with the same autograd as the op."""

    @staticmethod
    def forward(ctx, q, keys, values, slot, level, span, ring, beta, pos, heads):
        out, lse = kernel.attend_fwd(q, keys, values, slot, level, span, ring, beta, pos, heads)
        ctx.save_for_backward(q, keys, values, slot, level, span, ring, beta, pos, out, lse)
        ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx, dout):
        q, keys, values, slot, level, span, ring, beta, pos, out, lse = ctx.saved_tensors
        dq, dkeys, dvalues, dbeta = kernel.attend_bwd(
            q, keys, values, slot, level, span, ring, beta, pos, out, lse, dout.contiguous(), ctx.heads
        )
        return dq, dkeys, dvalues, None, None, None, None, dbeta, None, None


def hds_query(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, mem: Memory, heads: int) -> Tensor:
    """SPEC §4 query. q [B, T, H*Dh], k/v [B, T, K*Dh], beta [H, L] -> m [B, T, H*Dh]."""
    spec = mem.spec
    if heads % spec.heads or q.shape[-1] != heads * spec.dim or tuple(beta.shape) != (heads, len(spec.slots)):
        raise KernelInputError(
            f"hds_query: expected q [B, T, {heads * spec.dim}] and beta [{heads}, {len(spec.slots)}] for "
            f"{heads} heads over {spec.heads} memory heads, got q {list(q.shape)} and beta {list(beta.shape)}"
        )
    cand = reference.candidates(mem, k, v)
    args = (
        q.contiguous(),
        cand.keys.contiguous(),
        cand.values.contiguous(),
        cand.slot.contiguous(),
        cand.level,
        cand.span,
        cand.ring,
        beta.contiguous(),
        mem.pos.contiguous(),
        heads,
    )
    if interpreting(q):
        return _Interpreted.apply(*args)
    return torch.ops.mmrec.hds_attend_fwd(*args)[0]
