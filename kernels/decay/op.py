"""`torch.ops.mmrec.decay_mlp`: one MLP of the MDI decay, W2 gelu(W1 x + b1) + b2, as one Triton
kernel (kernel.py), and `mdi_decay_logits`, which runs its two MLPs through it.

Opt-in (MMREC_DECAY_MLP=1, `knobs.decay_mlp`): the kernel is tested under the interpreter and
compiled for sm_90 on the CPU machine, but has not run on a GPU yet. Without the knob, and on
CPU, the logits are the reference's plain ops (under torch.compile Inductor sees them). With it,
CUDA and the interpreter run the kernel; the backward is PyTorch (the first GEMM recomputed,
gelu's derivative, four GEMMs), so under torch.compile Inductor fuses its pointwise part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import KernelInputError, interpreting, launches_directly, tensor_arg
from ..config import knobs
from . import kernel, reference


def _mlp_reference(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def mlp_backward(x, w1, b1, w2, dout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2) of W2 gelu(W1 x + b1) + b2 for x [M, K]: the hidden's
    pre-activation recomputed; gelu' = Phi(p) + p phi(p) in fp32 (fp64 for fp64)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    p = F.linear(x, w1, b1).to(acc)
    cdf = 0.5 * (1.0 + torch.erf(p * 0.7071067811865476))
    h = (p * cdf).to(x.dtype)
    dh = dout @ w2
    dpre = (dh.to(acc) * (cdf + p * torch.exp(-0.5 * p * p) * 0.3989422804014327)).to(x.dtype)
    db1, db2 = dpre.to(acc).sum(0).to(b1.dtype), dout.to(acc).sum(0).to(w2.dtype)
    return dpre @ w1, dpre.t() @ x, db1, dout.t() @ h, db2


@torch.library.custom_op("mmrec::decay_mlp", mutates_args=())
def decay_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """x [M, K], w1 [R, K], b1 [R], w2 [N, R], b2 [N] -> W2 gelu(W1 x + b1) + b2 [M, N]."""
    return _mlp_reference(x, w1, b1, w2, b2)


@decay_mlp.register_kernel("cuda")
def _mlp_cuda(x, w1, b1, w2, b2):
    if not knobs.use_triton or not kernel.supported(x, w1, w2):
        return _mlp_reference(x, w1, b1, w2, b2)
    return kernel.mlp_fwd(x, w1, b1, w2, b2)


@decay_mlp.register_fake
def _mlp_fake(x, w1, b1, w2, b2):
    return x.new_empty(x.shape[0], w2.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, _ = inputs
    ctx.save_for_backward(x, w1, b1, w2)


def _backward(ctx, dout: Tensor):
    return mlp_backward(*ctx.saved_tensors, dout)


decay_mlp.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The launcher with the op's autograd, without its dispatch (`checks.launches_directly`)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, b1, w2)
        if kernel.supported(x, w1, w2):
            return kernel.mlp_fwd(x, w1, b1, w2, b2)
        return _mlp_reference(x, w1, b1, w2, b2)

    @staticmethod
    def backward(ctx, dout):
        return mlp_backward(*ctx.saved_tensors, dout.contiguous())


def mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, name: str = "decay_mlp") -> Tensor:
    """W2 gelu(W1 x + b1) + b2 for x [..., K]: the fused kernel on CUDA (and under the
    interpreter), the reference elsewhere."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise KernelInputError(f"{name}: x: expected a tensor [..., K], got {type(x).__name__}")
    width = x.shape[-1]
    if not isinstance(w1, Tensor) or w1.dim() != 2 or not isinstance(w2, Tensor) or w2.dim() != 2:
        raise KernelInputError(f"{name}: w1, w2: expected [R, {width}] and [N, R] matrices")
    hidden, out_width = w1.shape[0], w2.shape[0]
    w1 = tensor_arg(name, "w1", w1, (hidden, width), like=x)
    w2 = tensor_arg(name, "w2", w2, (out_width, hidden), like=x)
    b1 = tensor_arg(name, "b1", b1, (hidden,), like=x)
    b2 = tensor_arg(name, "b2", b2, (out_width,), like=x)
    rows = tensor_arg(name, "x", x, tuple(x.shape)).reshape(math.prod(x.shape[:-1]), width)
    if launches_directly(rows):
        out = _Direct.apply(rows, w1, b1, w2, b2)
    else:
        out = torch.ops.mmrec.decay_mlp(rows, w1, b1, w2, b2)
    return out.view(*x.shape[:-1], out_width)


def mdi_decay_logits(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2) -> tuple[Tensor, Tensor]:
    """(W2 gelu(W1 z + b1) + b2, C2 gelu(C1 k + cb1) + cb2): with `knobs.decay_mlp`, one fused
    kernel per MLP on CUDA and under the interpreter; otherwise the reference's plain ops."""
    if knobs.decay_mlp and knobs.use_triton and (z.is_cuda or interpreting(z)):
        return mlp(z, w1, b1, w2, b2, "mdi_decay_logits"), mlp(k, c1, cb1, c2, cb2, "mdi_decay_logits")
    return reference.mdi_decay_logits(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2)
