"""The MDI decay's Triton kernels (kernel.py) as torch custom ops: `torch.ops.mmrec.decay_mlp`,
one MLP W2 gelu(W1 x + b1) + b2 (what `mdi_decay_logits` runs twice), and
`torch.ops.mmrec.mdi_decay_fused`, the whole decay gamma = clamp(sigmoid(a) sigmoid(c)) in one
kernel (the IR op `mdi_decay_fused`, which the opt-in pass fuse-decay forms).

Both are tested under the interpreter and compiled for sm_90 on the CPU machine, but have not
run on a GPU yet. So the logits' kernel is opt-in (MMREC_DECAY_KERNELS=1, `knobs.decay_kernels`;
without it, and on CPU, `mdi_decay_logits` is the reference's plain ops, which torch.compile
traces), and the whole decay's runs only where the opt-in pass put it. The backwards are
PyTorch and recompute instead of saving: the MLP's first GEMM, or both of the decay's MLPs, then
gelu's derivative (and the tail's) and the weight GEMMs, so under torch.compile Inductor fuses
their pointwise parts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import KernelInputError, interpreting, launches_directly, tensor_arg
from ..config import knobs
from ..library import call, custom_op
from . import kernel, reference


def _mlp_reference(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _hidden(x: Tensor, w1: Tensor, b1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p, cdf, h): the pre-activation x W1^T + b1 in fp32 (fp64 for fp64), Phi(p), and
    h = gelu(p) in x's dtype, as the forward kernels round it."""
    p = F.linear(x, w1, b1).to(torch.promote_types(x.dtype, torch.float32))
    cdf = 0.5 * (1.0 + torch.erf(p * 0.7071067811865476))
    return p, cdf, (p * cdf).to(x.dtype)


def _mlp_grads(x, w1, w2, p, cdf, h, dout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2) of W2 gelu(W1 x + b1) + b2 from its hidden; gelu' = Phi(p) + p phi(p)."""
    dh = dout @ w2
    dpre = (dh.to(p.dtype) * (cdf + p * torch.exp(-0.5 * p * p) * 0.3989422804014327)).to(x.dtype)
    db1, db2 = dpre.to(p.dtype).sum(0).to(w1.dtype), dout.to(p.dtype).sum(0).to(w2.dtype)
    return dpre @ w1, dpre.t() @ x, db1, dout.t() @ h, db2


def mlp_backward(x, w1, b1, w2, dout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2) of W2 gelu(W1 x + b1) + b2 for x [M, K], the hidden recomputed."""
    return _mlp_grads(x, w1, w2, *_hidden(x, w1, b1), dout)


def decay_backward(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps: float, dgamma: Tensor) -> tuple[Tensor, ...]:
    """The ten gradients of gamma = clamp(sigmoid(a) sigmoid(c), eps, 1 - eps), a and c the two
    MLPs (recomputed), in mdi_decay's operand order."""
    hid_a, hid_c = _hidden(z, w1, b1), _hidden(k, c1, cb1)
    a, c = F.linear(hid_a[2], w2, b2), F.linear(hid_c[2], c2, cb2)
    acc = hid_a[0].dtype
    da, dc = reference.decay_gate_backward(a.to(acc), c.to(acc), eps, dgamma.to(acc))
    dz, dw1, db1, dw2, db2 = _mlp_grads(z, w1, w2, *hid_a, da.to(z.dtype))
    dk, dc1, dcb1, dc2, dcb2 = _mlp_grads(k, c1, c2, *hid_c, dc.to(k.dtype))
    return dz, dk, dw1, db1, dw2, db2, dc1, dcb1, dc2, dcb2


@custom_op("decay_mlp")
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
    run = _Direct.apply if launches_directly(rows) else lambda *a: call("decay_mlp", *a)
    return run(rows, w1, b1, w2, b2).view(*x.shape[:-1], out_width)


def mdi_decay_logits(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2) -> tuple[Tensor, Tensor]:
    """(W2 gelu(W1 z + b1) + b2, C2 gelu(C1 k + cb1) + cb2): with `knobs.decay_kernels`, one fused
    kernel per MLP on CUDA and under the interpreter; otherwise the reference's plain ops."""
    if knobs.decay_kernels and knobs.use_triton and (z.is_cuda or interpreting(z)):
        return mlp(z, w1, b1, w2, b2, "mdi_decay_logits"), mlp(k, c1, cb1, c2, cb2, "mdi_decay_logits")
    return reference.mdi_decay_logits(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2)


@custom_op("mdi_decay_fused")
def _decay_op(
    z: Tensor, k: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    c1: Tensor, cb1: Tensor, c2: Tensor, cb2: Tensor, eps: float,
) -> Tensor:  # fmt: skip
    """z [M, D], k [M, Dk] and the decay's weights -> gamma [M, D] (SPEC §3)."""
    return reference.mdi_decay(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps)


@_decay_op.register_kernel("cuda")
def _decay_cuda(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps):
    if not knobs.use_triton or not _decay_supported(z, k, w1, w2, c1, c2):
        return reference.mdi_decay(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps)
    return kernel.decay_fwd(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps)


@_decay_op.register_fake
def _decay_fake(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps):
    return z.new_empty(z.shape[0], w2.shape[0])


def _decay_setup(ctx, inputs, output) -> None:
    *tensors, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(*tensors)


def _decay_grads(ctx, dgamma: Tensor):
    return (*decay_backward(*ctx.saved_tensors, ctx.eps, dgamma), None)


_decay_op.register_autograd(_decay_grads, setup_context=_decay_setup)


def _decay_supported(z, k, w1, w2, c1, c2) -> bool:
    return w1.shape[0] == c1.shape[0] and kernel.supported(z, w1, w2, k, c1, c2)


class _DirectDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps):
        ctx.eps = eps
        ctx.save_for_backward(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2)
        if _decay_supported(z, k, w1, w2, c1, c2):
            return kernel.decay_fwd(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps)
        return reference.mdi_decay(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps)

    @staticmethod
    def backward(ctx, dgamma):
        return (*decay_backward(*ctx.saved_tensors, ctx.eps, dgamma.contiguous()), None)


def mdi_decay_fused(z, k, w1, b1, w2, b2, c1, cb1, c2, cb2, eps: float = 1e-6) -> Tensor:
    """gamma [B, T, D] = clamp(sigmoid(W2 gelu(W1 z + b1) + b2) sigmoid(C2 gelu(C1 k + cb1) + cb2),
    eps, 1 - eps) in one kernel on CUDA (Hopper, aligned rows, a bottleneck up to 256 shared by
    both MLPs) and under the interpreter; otherwise the reference. What the pass fuse-decay
    selects, so no knob: the pass is opt-in."""
    name = "mdi_decay"
    if not isinstance(z, Tensor) or not isinstance(k, Tensor) or z.shape[:-1] != k.shape[:-1]:
        got = [getattr(t, "shape", type(t).__name__) for t in (z, k)]
        raise KernelInputError(f"{name}: z, k: expected [..., D] and [..., Dk] over the same rows, got {got}")
    for what, w in (("w1", w1), ("c1", c1)):
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise KernelInputError(
                f"{name}: {what}: expected a [R, D] matrix, got {getattr(w, 'shape', type(w).__name__)}"
            )
    if not 0.0 < eps < 0.5:
        raise KernelInputError(f"{name}: eps: expected 0 < eps < 0.5 (gamma is clamped to [eps, 1 - eps]), got {eps}")
    width, k_width, hidden = z.shape[-1], k.shape[-1], w1.shape[0]
    w1 = tensor_arg(name, "w1", w1, (hidden, width), like=z)
    b1 = tensor_arg(name, "b1", b1, (hidden,), like=z)
    w2 = tensor_arg(name, "w2", w2, (width, hidden), like=z)
    b2 = tensor_arg(name, "b2", b2, (width,), like=z)
    c1 = tensor_arg(name, "c1", c1, (c1.shape[0], k_width), like=z)
    cb1 = tensor_arg(name, "cb1", cb1, (c1.shape[0],), like=z)
    c2 = tensor_arg(name, "c2", c2, (width, c1.shape[0]), like=z)
    cb2 = tensor_arg(name, "cb2", cb2, (width,), like=z)
    lead = math.prod(z.shape[:-1])
    rows_z = tensor_arg(name, "z", z, tuple(z.shape)).reshape(lead, width)
    rows_k = tensor_arg(name, "k", k, tuple(k.shape)).reshape(lead, k_width)
    args = (rows_z, rows_k, w1, b1, w2, b2, c1, cb1, c2, cb2)
    fused = _DirectDecay.apply if launches_directly(rows_z) else lambda *a: call("mdi_decay_fused", *a)
    return fused(*args, eps).view(*z.shape[:-1], width)
