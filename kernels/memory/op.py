"""`torch.ops.mmrec.hds_query` (over `hds_attend_fwd/_bwd`): the memory query's softmax over
candidate slots.

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
from ..library import REFERENCES, call, custom_op
from . import decode, kernel, reference, write
from .reference import Candidates, Memory


def _candidates(q: Tensor, keys: Tensor, values: Tensor, pos: Tensor, rings, spans) -> Candidates:
    slot, level, span, ring = reference.slot_table(pos, tuple(rings), tuple(spans), q.shape[1])
    return Candidates(keys, values, slot, level, span, ring)


def _fwd_reference(q, keys, values, beta, pos, rings, spans, heads, residual=None):
    out, lse = reference.attend_with_lse(q, _candidates(q, keys, values, pos, rings, spans), beta, pos, heads)
    return (out if residual is None else residual + out), lse


def _bwd_reference(q, keys, values, beta, pos, rings, spans, dout, heads):
    return reference.attend_backward(q, _candidates(q, keys, values, pos, rings, spans), beta, pos, heads, dout)


@custom_op("hds_attend_fwd")
def hds_attend_fwd(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    beta: Tensor,
    pos: Tensor,
    rings: list[int],
    spans: list[int],
    heads: int,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One softmax per token and query head over its visible candidate slots (levels
    concatenated, each [ring ; segment]; ring sizes and spans per level) ->
    (out [B, T, H*Dh], log-sum-exp [B, H, T] fp32); with `residual` ([B, T, H*Dh]) out is
    residual + the query's result, added in the kernel's epilogue."""
    return _fwd_reference(q, keys, values, beta, pos, rings, spans, heads, residual)


@hds_attend_fwd.register_kernel("cuda")
def _fwd_cuda(q, keys, values, beta, pos, rings, spans, heads, residual=None):
    if not knobs.use_triton:
        return _fwd_reference(q, keys, values, beta, pos, rings, spans, heads, residual)
    return kernel.attend_fwd(q, keys, values, beta, pos, rings, spans, heads, residual)


@hds_attend_fwd.register_fake
def _fwd_fake(q, keys, values, beta, pos, rings, spans, heads, residual=None):
    return torch.empty_like(q), q.new_empty(q.shape[0], heads, q.shape[1], dtype=torch.float32)


@custom_op("hds_attend_bwd")
def hds_attend_bwd(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    beta: Tensor,
    pos: Tensor,
    rings: list[int],
    spans: list[int],
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    heads: int,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dkeys, dvalues, dbeta); `residual` is the forward's (the kernel takes it off `out`)."""
    return _bwd_reference(q, keys, values, beta, pos, rings, spans, dout, heads)


@hds_attend_bwd.register_kernel("cuda")
def _bwd_cuda(q, keys, values, beta, pos, rings, spans, out, lse, dout, heads, residual=None):
    if not knobs.use_triton:
        return _bwd_reference(q, keys, values, beta, pos, rings, spans, dout, heads)
    return kernel.attend_bwd(q, keys, values, beta, pos, rings, spans, out, lse, dout, heads, residual)


@hds_attend_bwd.register_fake
def _bwd_fake(q, keys, values, beta, pos, rings, spans, out, lse, dout, heads, residual=None):
    return torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values), torch.empty_like(beta)


def _setup_context(ctx, inputs, output) -> None:
    q, keys, values, beta, pos, rings, spans, heads, residual = inputs
    ctx.save_for_backward(q, keys, values, beta, pos, *output, residual)
    ctx.rings, ctx.spans, ctx.heads = rings, spans, heads
    # lse is the softmax's by-product, saved for the backward: not differentiable, and autograd
    # need not build a zero gradient for it (nor for an unused out).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: Tensor | None, _dlse: Tensor | None):
    q, keys, values, beta, pos, out, lse, residual = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dkeys, dvalues, dbeta = torch.ops.mmrec.hds_attend_bwd(
        q, keys, values, beta, pos, ctx.rings, ctx.spans, out, lse, dout, ctx.heads, residual
    )
    return dq, dkeys, dvalues, dbeta, None, None, None, None, (dout if residual is not None else None)


hds_attend_fwd.register_autograd(_backward, setup_context=_setup_context)


# `torch.ops.mmrec.hds_query`: the memory query over its candidates as one op, the name a user
# looks for. It is CompositeImplicitAutograd: autograd, fake tensors, torch.compile and export
# see through it to hds_attend_fwd (whose log-sum-exp the backward needs and this op does not
# return). It brings no kernel or autograd of its own; an eager call pays one more dispatch (its
# Python body, a few us), a traced one nothing.
torch.library.define(
    "mmrec::hds_query",
    "(Tensor q, Tensor keys, Tensor values, Tensor beta, Tensor pos, int[] rings, int[] spans, int heads, "
    "Tensor? residual=None) -> Tensor",
)


@torch.library.impl("mmrec::hds_query", "CompositeImplicitAutograd")
def _hds_query_op(q, keys, values, beta, pos, rings, spans, heads, residual=None):
    """q [B, T, H*Dh], candidate keys/values [B, K, S, Dh] (levels concatenated, each [ring ;
    segment]), beta [H, L], pos [B] -> out [B, T, H*Dh] (plus residual, if given)."""
    return torch.ops.mmrec.hds_attend_fwd(q, keys, values, beta, pos, rings, spans, heads, residual)[0]


REFERENCES["hds_query"] = lambda *args: _fwd_reference(*args)[0]


class _Interpreted(torch.autograd.Function):
    """The Triton kernels through the interpreter, with the same autograd as the op."""

    @staticmethod
    def forward(ctx, q, keys, values, beta, pos, rings, spans, heads, residual):
        out, lse = kernel.attend_fwd(q, keys, values, beta, pos, rings, spans, heads, residual)
        ctx.save_for_backward(q, keys, values, beta, pos, out, lse, residual)
        ctx.rings, ctx.spans, ctx.heads = rings, spans, heads
        return out

    @staticmethod
    def backward(ctx, dout):
        q, keys, values, beta, pos, out, lse, residual = ctx.saved_tensors
        dout = dout.contiguous()
        grads = kernel.attend_bwd(q, keys, values, beta, pos, ctx.rings, ctx.spans, out, lse, dout, ctx.heads, residual)
        return *grads, None, None, None, None, (dout if residual is not None else None)


@custom_op("block_sums")
def block_sums_op(x: Tensor, pos: Tensor, span: int) -> Tensor:
    """x [B, T, W], pos [B] -> [B, ceil(T / span) + 1, W] fp32: token sums per local slot."""
    return reference.block_sums(x, pos, span)


@block_sums_op.register_kernel("cuda")
def _block_sums_cuda(x, pos, span):
    return kernel.block_sums(x, pos, span) if knobs.use_triton else reference.block_sums(x, pos, span)


@block_sums_op.register_fake
def _block_sums_fake(x, pos, span):
    return x.new_empty(x.shape[0], -(-x.shape[1] // span) + 1, x.shape[2], dtype=torch.float32)


def _block_sums_setup(ctx, inputs, output) -> None:
    x, pos, span = inputs
    ctx.save_for_backward(pos)
    ctx.span, ctx.steps, ctx.dtype = span, x.shape[1], x.dtype


def _block_sums_backward(ctx, grad: Tensor):
    (pos,) = ctx.saved_tensors
    index = reference.token_slot(pos, ctx.steps, ctx.span)[:, :, None].expand(-1, -1, grad.shape[2])
    return grad.gather(1, index).to(ctx.dtype), None, None


block_sums_op.register_autograd(_block_sums_backward, setup_context=_block_sums_setup)


class _InterpretedSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, span):
        _block_sums_setup(ctx, (x, pos, span), None)
        return kernel.block_sums(x, pos, span)

    @staticmethod
    def backward(ctx, grad):
        return _block_sums_backward(ctx, grad)


def block_sums(x: Tensor, pos: Tensor, span: int) -> Tensor:
    """Level-0 token sums of a segment: the op (Triton on CUDA), or the kernel under the interpreter."""
    x = x.contiguous()
    if interpreting(x):
        return _InterpretedSums.apply(x, pos, span)
    return call("block_sums", x, pos, span)


@custom_op("hds_decode")
def hds_decode_op(
    q: Tensor, keys: list[Tensor], values: list[Tensor], beta: Tensor, pos: Tensor, spans: list[int], heads: int
) -> Tensor:
    """One token per row: q [B, 1, H*Dh] over the filled part of each level's ring
    keys/values[l] [B, K, M_l, Dh], read in place -> [B, 1, H*Dh]. Inference only (no autograd)."""
    return reference.decode_query(q, keys, values, beta, pos, spans, heads)


@hds_decode_op.register_kernel("cuda")
def _decode_cuda(q, keys, values, beta, pos, spans, heads):
    if not knobs.use_triton or len(keys) > decode.MAX_LEVELS:
        return reference.decode_query(q, keys, values, beta, pos, spans, heads)
    return decode.decode(q, keys, values, beta, pos, spans, heads)


@hds_decode_op.register_fake
def _decode_fake(q, keys, values, beta, pos, spans, heads):
    return torch.empty_like(q)


def _wants_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def hds_decode(q: Tensor, beta: Tensor, mem: Memory, heads: int) -> Tensor:
    """The memory read of one token per row (q [B, 1, H*Dh]) from the rings, no copies."""
    spec = mem.spec
    spans = [spec.span(level) for level in range(len(spec.slots))]
    keys = [t.contiguous() for t in mem.keys]
    values = [t.contiguous() for t in mem.values]
    args = (q.contiguous(), keys, values, beta.contiguous(), mem.pos.contiguous(), spans, heads)
    if interpreting(q) and len(keys) <= decode.MAX_LEVELS:
        return decode.decode(*args)
    return call("hds_decode", *args)


def memory_write(mem: Memory, k: Tensor, v: Tensor) -> Memory:
    """SPEC §4 write (see reference.memory_write), with the level-0 sums on the GPU kernel."""
    return reference.memory_write(mem, k, v, sums0=block_sums)


@custom_op("memory_write_step", mutates_args=("pos", "keys", "values", "sum_k", "sum_v"))
def memory_write_step_op(
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    sum_k: list[Tensor],
    sum_v: list[Tensor],
    spans: list[int],
) -> None:
    """One token per row (k, v [B, 1, K*Dh]) into the rings and sums, in place; pos += 1."""
    reference.write_step_(k, v, pos, keys, values, sum_k, sum_v, spans)


@memory_write_step_op.register_kernel("cuda")
def _write_step_cuda(k, v, pos, keys, values, sum_k, sum_v, spans):
    if not knobs.use_triton or len(keys) > decode.MAX_LEVELS:
        return reference.write_step_(k, v, pos, keys, values, sum_k, sum_v, spans)
    write.write_step(k, v, pos, keys, values, sum_k, sum_v, spans)
    pos.add_(1)


@memory_write_step_op.register_fake
def _write_step_fake(k, v, pos, keys, values, sum_k, sum_v, spans):
    return None


def memory_write_(mem: Memory, k: Tensor, v: Tensor) -> Memory:
    """The decode write: one token per row (k, v [B, 1, K*Dh]) into `mem` in place (rings,
    sums, pos; no allocation, a fixed number of launches, so it can live in a CUDA graph).
    Returns `mem`. The state's tensors must be contiguous; nothing here may need gradients."""
    spec = mem.spec
    width = spec.heads * spec.dim
    if k.dim() != 3 or k.shape[1] != 1 or k.shape[2] != width or tuple(v.shape) != tuple(k.shape):
        raise KernelInputError(
            f"memory_write_: expected k and v [B, 1, {width}] (one token per row), "
            f"got k {list(k.shape)} and v {list(v.shape)}"
        )
    tensors = [mem.pos, *mem.keys, *mem.values, *mem.sum_k, *mem.sum_v]
    if not all(t.is_contiguous() for t in tensors):
        raise KernelInputError("memory_write_: the memory's tensors must be contiguous to be written in place")
    if _wants_grad(k, v, *tensors):
        raise KernelInputError("memory_write_: in-place decode write under autograd; use memory_write")
    spans = [spec.span(level) for level in range(len(spec.slots))]
    args = (k.contiguous(), v.contiguous(), mem.pos, mem.keys, mem.values, mem.sum_k, mem.sum_v, spans)
    if interpreting(k) and len(spans) <= decode.MAX_LEVELS:
        write.write_step(*args)
        mem.pos.add_(1)
    else:
        call("memory_write_step", *args)
    return mem


def hds_query(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, mem: Memory, heads: int, residual: Tensor | None = None
) -> Tensor:
    """SPEC §4 query. q [B, T, H*Dh], k/v [B, T, K*Dh], beta [H, L] -> m [B, T, H*Dh]; with
    `residual` (like q) -> residual + m, the add done in the kernel's epilogue on CUDA."""
    spec = mem.spec
    if not spec.slots:  # the kernels read level 0's tables unconditionally (its first tile sets the shift)
        raise KernelInputError("hds_query: the memory has no levels (MemorySpec.slots is empty)")
    if heads % spec.heads or q.shape[-1] != heads * spec.dim or tuple(beta.shape) != (heads, len(spec.slots)):
        raise KernelInputError(
            f"hds_query: expected q [B, T, {heads * spec.dim}] and beta [{heads}, {len(spec.slots)}] for "
            f"{heads} heads over {spec.heads} memory heads, got q {list(q.shape)} and beta {list(beta.shape)}"
        )
    if residual is not None and (residual.shape != q.shape or residual.dtype != q.dtype or residual.device != q.device):
        raise KernelInputError(
            f"hds_query: residual: expected {list(q.shape)} {q.dtype} on {q.device}, "
            f"got {list(residual.shape)} {residual.dtype} on {residual.device}"
        )
    if q.shape[1] == 1 and not _wants_grad(q, k, v, beta, *mem.keys, *mem.values):
        m = hds_decode(q, beta, mem, heads)  # decoding: the rings alone, read in place
        return m if residual is None else residual + m
    keys, values = reference.candidate_kv(mem, k, v, sums0=block_sums)
    rings = list(spec.slots)
    spans = [spec.span(level) for level in range(len(rings))]
    args = (q.contiguous(), keys.contiguous(), values.contiguous(), beta.contiguous(), mem.pos.contiguous())
    residual = residual.contiguous() if residual is not None else None
    if interpreting(q):
        return _Interpreted.apply(*args, rings, spans, heads, residual)
    return call("hds_query", *args, rings, spans, heads, residual)
