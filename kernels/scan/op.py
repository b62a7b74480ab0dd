"""`torch.ops.mmrec.linear_scan_fwd/_bwd`: one registration bundle for the linear scan.

CUDA runs the Triton kernels; every other device (and fake tensors under torch.compile) runs
the reference or its shape rule, so tracing never enters the Triton interpreter. Outside
torch.compile, `linear_scan` calls the Triton launchers directly under an autograd.Function
(eager CUDA, where the op's dispatch costs more than the kernels; CPU tensors under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import launches_directly, seq_arg, tensor_arg
from ..config import knobs
from ..library import call, custom_op
from . import kernel, reference


@custom_op("linear_scan_fwd")
def linear_scan_fwd(log_a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    return reference.forward(log_a, b, h0)


@linear_scan_fwd.register_kernel("cuda")
def _fwd_cuda(log_a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    return kernel.scan_fwd(log_a, b, h0) if knobs.use_triton else reference.forward(log_a, b, h0)


@linear_scan_fwd.register_fake
def _fwd_fake(log_a: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(b), b.new_empty(b.shape[0], b.shape[2])


def _bwd_reference(log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None):
    if dh_last is None:
        dh_last = dh.new_zeros(dh.shape[0], dh.shape[2])
    dlog_a, db, dh0 = reference.backward(log_a, h, h0, dh, dh_last)
    # dh0 is always returned (zeros without h0): op schemas keep a fixed output list.
    return dlog_a, db, dh0 if dh0 is not None else torch.zeros_like(dh_last)


@custom_op("linear_scan_bwd")
def linear_scan_bwd(
    log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """dh_last None: h_last had no gradient (autograd passes None, not a zero tensor)."""
    return _bwd_reference(log_a, h, h0, dh, dh_last)


@linear_scan_bwd.register_kernel("cuda")
def _bwd_cuda(log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None):
    if not knobs.use_triton:
        return _bwd_reference(log_a, h, h0, dh, dh_last)
    dlog_a, db, dh0 = kernel.scan_bwd(log_a, h, h0, dh.contiguous(), _contiguous(dh_last))
    return dlog_a, db, dh0 if dh0 is not None else h.new_zeros(h.shape[0], h.shape[2])


@linear_scan_bwd.register_fake
def _bwd_fake(log_a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, dh_last: Tensor | None):
    return torch.empty_like(log_a), torch.empty_like(h), h.new_empty(h.shape[0], h.shape[2])


def _contiguous(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


def _setup_context(ctx, inputs, output) -> None:
    log_a, _, h0 = inputs
    ctx.save_for_backward(log_a, output[0], h0)
    ctx.has_h0 = h0 is not None
    # An unused h_last (the usual case) reaches the backward as None, not as a zero tensor
    # built and read every step.
    ctx.set_materialize_grads(False)


def _backward(ctx, dh: Tensor | None, dh_last: Tensor | None):
    log_a, h, h0 = ctx.saved_tensors
    if dh is None:  # only h_last was used
        dh = torch.zeros_like(h)
    dlog_a, db, dh0 = torch.ops.mmrec.linear_scan_bwd(log_a, h, h0, dh, dh_last)
    return dlog_a, db, dh0 if ctx.has_h0 else None


linear_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The Triton launchers with the same autograd as the op, without its dispatch: eager CUDA
    calls and the interpreter (`checks.launches_directly`)."""

    @staticmethod
    def forward(ctx, log_a: Tensor, b: Tensor, h0: Tensor | None):
        h, h_last = kernel.scan_fwd(log_a, b, h0)
        ctx.save_for_backward(log_a, h, h0)
        ctx.set_materialize_grads(False)
        return h, h_last

    @staticmethod
    def backward(ctx, dh: Tensor | None, dh_last: Tensor | None):
        log_a, h, h0 = ctx.saved_tensors
        dh = torch.zeros_like(h) if dh is None else dh.contiguous()
        return kernel.scan_bwd(log_a, h, h0, dh, _contiguous(dh_last))


def linear_scan(log_a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SPEC §1. log_a, b [B, T, C]; h0 [B, C] or None -> (h [B, T, C], h_last [B, C])."""
    b = seq_arg("linear_scan", "b", b)
    log_a = tensor_arg("linear_scan", "log_a", log_a, tuple(b.shape), like=b)
    if h0 is not None:
        h0 = tensor_arg("linear_scan", "h0", h0, (b.shape[0], b.shape[2]), like=b)
    if launches_directly(b):
        return _Direct.apply(log_a, b, h0)
    return call("linear_scan_fwd", log_a, b, h0)
