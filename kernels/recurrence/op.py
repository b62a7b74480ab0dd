"""`torch.ops.mmrec.gated_recurrence_fwd/_bwd` and `decay_recurrence_fwd/_bwd` (the same
kernels with SPEC §3's decay tail fused in): the registration bundles for the gated recurrence.

CUDA runs the Triton kernels; other devices and fake tensors run the reference or its shape
rule. Outside torch.compile, `gated_recurrence` calls the Triton launchers directly under an
autograd.Function (eager CUDA; CPU tensors under TRITON_INTERPRET=1): `checks.launches_directly`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import KernelInputError, launches_directly, seq_arg, tensor_arg
from ..config import knobs
from ..library import call, custom_op
from . import kernel, reference


@custom_op("gated_recurrence_fwd")
def gated_recurrence_fwd(z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    return reference.forward(z, gz, gamma, w_g, h0)


@gated_recurrence_fwd.register_kernel("cuda")
def _fwd_cuda(z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None):
    run = kernel.gated_fwd if knobs.use_triton else reference.forward
    return run(z, gz, gamma, w_g, h0)


@gated_recurrence_fwd.register_fake
def _fwd_fake(z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None):
    return torch.empty_like(z), z.new_empty(z.shape[0], z.shape[2])


def _bwd_with(run, z, gz, gamma, w_g, h0, h, dh, dh_last):
    dz, dgz, dgamma, dw, dh0 = run(z, gz, gamma, w_g, h0, h, dh.contiguous(), dh_last.contiguous())
    # dh0 is always returned (zeros without h0): op schemas keep a fixed output list.
    return dz, dgz, dgamma, dw, dh0 if dh0 is not None else torch.zeros_like(dh_last)


@custom_op("gated_recurrence_bwd")
def gated_recurrence_bwd(
    z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None, h: Tensor, dh: Tensor, dh_last: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd_with(reference.backward, z, gz, gamma, w_g, h0, h, dh, dh_last)


@gated_recurrence_bwd.register_kernel("cuda")
def _bwd_cuda(z, gz, gamma, w_g, h0, h, dh, dh_last):
    run = kernel.gated_bwd if knobs.use_triton else reference.backward
    return _bwd_with(run, z, gz, gamma, w_g, h0, h, dh, dh_last)


@gated_recurrence_bwd.register_fake
def _bwd_fake(z, gz, gamma, w_g, h0, h, dh, dh_last):
    return (
        torch.empty_like(z),
        torch.empty_like(gz),
        torch.empty_like(gamma),
        torch.empty_like(w_g),
        torch.empty_like(dh_last),
    )


def _setup_context(ctx, inputs, output) -> None:
    z, gz, gamma, w_g, h0 = inputs
    ctx.save_for_backward(z, gz, gamma, w_g, h0, output[0])
    ctx.has_h0 = h0 is not None


def _backward(ctx, dh: Tensor, dh_last: Tensor):
    dz, dgz, dgamma, dw, dh0 = torch.ops.mmrec.gated_recurrence_bwd(*ctx.saved_tensors, dh, dh_last)
    return dz, dgz, dgamma, dw, dh0 if ctx.has_h0 else None


gated_recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The Triton launchers with the same autograd as the op, without its dispatch: eager CUDA
    calls and the interpreter (`checks.launches_directly`)."""

    @staticmethod
    def forward(ctx, z, gz, gamma, w_g, h0):
        h, h_last = kernel.gated_fwd(z, gz, gamma, w_g, h0)
        ctx.save_for_backward(z, gz, gamma, w_g, h0, h)
        return h, h_last

    @staticmethod
    def backward(ctx, dh: Tensor, dh_last: Tensor):
        z, gz, gamma, w_g, h0, h = ctx.saved_tensors
        return kernel.gated_bwd(z, gz, gamma, w_g, h0, h, dh.contiguous(), dh_last.contiguous())


def _w_g_arg(op: str, w_g: Tensor, z: Tensor) -> Tensor:
    if not isinstance(w_g, Tensor) or w_g.dim() != 3 or w_g.shape[0] * w_g.shape[1] != z.shape[2]:
        got = list(w_g.shape) if isinstance(w_g, Tensor) else type(w_g).__name__
        raise KernelInputError(f"{op}: w_g: expected [H, Dh, Dh] with H*Dh = {z.shape[2]}, got {got}")
    return tensor_arg(op, "w_g", w_g, (w_g.shape[0], w_g.shape[1], w_g.shape[1]), like=z)


def gated_recurrence(
    z: Tensor, gz: Tensor, gamma: Tensor, w_g: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """SPEC §2. z, gz, gamma [B, T, D]; w_g [H, Dh, Dh]; h0 [B, D] or None -> (h, h_last)."""
    op = "gated_recurrence"
    z = seq_arg(op, "z", z)
    gz = tensor_arg(op, "gz", gz, tuple(z.shape), like=z)
    gamma = tensor_arg(op, "gamma", gamma, tuple(z.shape), like=z)
    w_g = _w_g_arg(op, w_g, z)
    if h0 is not None:
        h0 = tensor_arg(op, "h0", h0, (z.shape[0], z.shape[2]), like=z)
    if launches_directly(z):
        return _Direct.apply(z, gz, gamma, w_g, h0)
    return call("gated_recurrence_fwd", z, gz, gamma, w_g, h0)


# The fused decay variant (fuse-decay-recurrence): the kernels read the decay's two logits a, c
# and form gamma = clamp(sigmoid(a) sigmoid(c), eps, 1 - eps) on chip.


@custom_op("decay_recurrence_fwd")
def decay_recurrence_fwd(
    z: Tensor, gz: Tensor, a: Tensor, c: Tensor, w_g: Tensor, h0: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return reference.decay_forward(z, gz, a, c, w_g, h0, eps)


@decay_recurrence_fwd.register_kernel("cuda")
def _decay_fwd_cuda(z, gz, a, c, w_g, h0, eps):
    if knobs.use_triton:
        return kernel.gated_fwd(z, gz, a, w_g, h0, decay_c=c, eps=eps)
    return reference.decay_forward(z, gz, a, c, w_g, h0, eps)


@decay_recurrence_fwd.register_fake
def _decay_fwd_fake(z, gz, a, c, w_g, h0, eps):
    return torch.empty_like(z), z.new_empty(z.shape[0], z.shape[2])


def _decay_bwd_with(triton: bool, z, gz, a, c, w_g, h0, h, dh, dh_last, eps):
    dh, dh_last = dh.contiguous(), dh_last.contiguous()
    if triton:
        dz, dgz, da, dw, dh0, dc = kernel.gated_bwd(z, gz, a, w_g, h0, h, dh, dh_last, decay_c=c, eps=eps)
    else:
        dz, dgz, da, dc, dw, dh0 = reference.decay_backward(z, gz, a, c, w_g, h0, h, dh, dh_last, eps)
    return dz, dgz, da, dc, dw, dh0 if dh0 is not None else torch.zeros_like(dh_last)


@custom_op("decay_recurrence_bwd")
def decay_recurrence_bwd(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _decay_bwd_with(False, z, gz, a, c, w_g, h0, h, dh, dh_last, eps)


@decay_recurrence_bwd.register_kernel("cuda")
def _decay_bwd_cuda(z, gz, a, c, w_g, h0, h, dh, dh_last, eps):
    return _decay_bwd_with(knobs.use_triton, z, gz, a, c, w_g, h0, h, dh, dh_last, eps)


@decay_recurrence_bwd.register_fake
def _decay_bwd_fake(z, gz, a, c, w_g, h0, h, dh, dh_last, eps):
    return tuple(torch.empty_like(t) for t in (z, gz, a, c, w_g, dh_last))


def _decay_setup_context(ctx, inputs, output) -> None:
    z, gz, a, c, w_g, h0, eps = inputs
    ctx.save_for_backward(z, gz, a, c, w_g, h0, output[0])
    ctx.has_h0, ctx.eps = h0 is not None, eps


def _decay_backward(ctx, dh: Tensor, dh_last: Tensor):
    dz, dgz, da, dc, dw, dh0 = torch.ops.mmrec.decay_recurrence_bwd(*ctx.saved_tensors, dh, dh_last, ctx.eps)
    return dz, dgz, da, dc, dw, dh0 if ctx.has_h0 else None, None


decay_recurrence_fwd.register_autograd(_decay_backward, setup_context=_decay_setup_context)


class _DirectDecay(torch.autograd.Function):
    """`_Direct` for the fused decay variant."""

    @staticmethod
    def forward(ctx, z, gz, a, c, w_g, h0, eps):
        h, h_last = kernel.gated_fwd(z, gz, a, w_g, h0, decay_c=c, eps=eps)
        ctx.save_for_backward(z, gz, a, c, w_g, h0, h)
        ctx.eps = eps
        return h, h_last

    @staticmethod
    def backward(ctx, dh: Tensor, dh_last: Tensor):
        z, gz, a, c, w_g, h0, h = ctx.saved_tensors
        grads = kernel.gated_bwd(z, gz, a, w_g, h0, h, dh.contiguous(), dh_last.contiguous(), decay_c=c, eps=ctx.eps)
        dz, dgz, da, dw, dh0, dc = grads
        return dz, dgz, da, dc, dw, dh0, None


def decay_recurrence(
    z: Tensor, gz: Tensor, a: Tensor, c: Tensor, w_g: Tensor, h0: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """SPEC §2 with SPEC §3's decay tail fused in: gamma = clamp(sigmoid(a) sigmoid(c), eps, 1 - eps).
    z, gz, a, c [B, T, D]; w_g [H, Dh, Dh]; h0 [B, D] or None -> (h, h_last)."""
    op = "decay_recurrence"
    z = seq_arg(op, "z", z)
    gz, a, c = (tensor_arg(op, name, t, tuple(z.shape), like=z) for name, t in (("gz", gz), ("a", a), ("c", c)))
    w_g = _w_g_arg(op, w_g, z)
    if h0 is not None:
        h0 = tensor_arg(op, "h0", h0, (z.shape[0], z.shape[2]), like=z)
    if not 0.0 < eps < 0.5:
        raise KernelInputError(f"{op}: eps: expected 0 < eps < 0.5, got {eps}")
    if launches_directly(z):
        return _DirectDecay.apply(z, gz, a, c, w_g, h0, float(eps))
    return call("decay_recurrence_fwd", z, gz, a, c, w_g, h0, float(eps))
