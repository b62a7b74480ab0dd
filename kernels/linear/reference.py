"""Plain-PyTorch reference of the GEMMs with fused epilogues (the oracle of kernel.py).

linear_swiglu(x, w_gate, w_up) = silu(x @ w_gate^T) * (x @ w_up^T): the SwiGLU FFN's up half,
as the pass fuse-epilogue forms it from a two-output linear, a silu and a product. The products
accumulate in fp32 (fp64 for fp64 inputs) and the epilogue runs on the unrounded accumulators;
g and u, the pre-activations the backward needs, are returned rounded to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def linear_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D], w_gate/w_up [F, D] -> (out, g, u), each [N, F] in x's dtype."""
    acc = _acc(x)
    g = F.linear(x.to(acc), w_gate.to(acc))
    u = F.linear(x.to(acc), w_up.to(acc))
    return (F.silu(g) * u).to(x.dtype), g.to(x.dtype), u.to(x.dtype)


def swiglu_grad(g: Tensor, u: Tensor, dout: Tensor) -> Tensor:
    """[dg, du] side by side [N, 2F] in g's dtype: dg = dout u silu'(g), du = dout silu(g), with
    silu'(g) = s (1 + g (1 - s)), s = sigmoid(g), in fp32."""
    acc = _acc(g)
    gf, uf, df = g.to(acc), u.to(acc), dout.to(acc)
    s = torch.sigmoid(gf)
    return torch.cat([df * uf * s * (1 + gf * (1 - s)), df * gf * s], dim=-1).to(g.dtype)


def linear_swiglu_backward(
    x: Tensor, w_gate: Tensor, w_up: Tensor, g: Tensor, u: Tensor, dout: Tensor, grad=swiglu_grad
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx [N, D], dw_gate, dw_up [F, D]). The two halves' gradients side by side [N, 2F]
    (`grad`: swiglu_grad, or the Triton kernel of the same in eager CUDA calls) make each
    remaining product one GEMM over both weights: dx = [dg, du] @ [w_gate; w_up],
    [dw_gate; dw_up] = [dg, du]^T @ x."""
    dgu = grad(g, u, dout)
    dx = dgu @ torch.cat([w_gate, w_up])
    dw = dgu.t() @ x
    return dx, *dw.split(w_gate.shape[0])


def rms_linear_swiglu(
    x: Tensor, rstd: Tensor, w_norm: Tensor, w_gate: Tensor, w_up: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """linear_swiglu(rmsnorm(x, w_norm), w_gate, w_up) for x [N, D] with its rows' 1/rms given
    (rstd [N], from add_rstd): the norm rounded as the model's rmsnorm rounds it
    (kernels/nn/reference.py), then the SwiGLU GEMM. -> (out, g, u)."""
    xf = x.to(_acc(x))
    return linear_swiglu((xf * rstd.to(xf.dtype)[:, None]).to(x.dtype) * w_norm, w_gate, w_up)


def rms_linear_swiglu_backward(
    x: Tensor,
    rstd: Tensor,
    w_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    g: Tensor,
    u: Tensor,
    dout: Tensor,
    grad=swiglu_grad,
    norm_grad=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dw_norm, dw_gate, dw_up): the SwiGLU GEMM's backward on the normalised input
    (recomputed), then RMSNorm's (`rmsnorm_backward`, or `norm_grad` of the same signature:
    the norm's Triton backward in eager CUDA calls)."""
    xn = (x.to(_acc(x)) * rstd.to(_acc(x))[:, None]).to(x.dtype) * w_norm
    dn, dw_gate, dw_up = linear_swiglu_backward(xn, w_gate, w_up, g, u, dout, grad)
    dx, dw_norm = (norm_grad or rmsnorm_backward)(x, w_norm, rstd, None, dn)
    return dx, dw_norm, dw_gate, dw_up


def rmsnorm_backward(x: Tensor, w_norm: Tensor, rstd: Tensor, _ds: None, dn: Tensor) -> tuple[Tensor, Tensor]:
    """RMSNorm's backward through rstd too, from dn, the gradient reaching the normalised rows:
    with xhat = x rstd (rounded as the forward rounds it) and d = dn * w_norm,
    dx = rstd (d - xhat mean(d xhat)), dw_norm = sum over rows of dn xhat. (The signature is
    kernels/norm's add_rmsnorm backward's, without a sum's own gradient.)"""
    acc = _acc(x)
    r = rstd.to(acc)[:, None]
    xh = (x.to(acc) * r).to(x.dtype).to(acc)
    d = dn.to(acc) * w_norm.to(acc)
    dx = r * (d - xh * (d * xh).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dn.to(acc) * xh).sum(0).to(w_norm.dtype)


def linear_epilogue(
    x: Tensor, w: Tensor, res: Tensor | None = None, w_norm: Tensor | None = None, rstd: Tensor | None = None
) -> Tensor:
    """[rmsnorm(x, w_norm), the rows' 1/rms given as rstd [N]] @ w^T [+ res] for x [N, D],
    w [F, D], res [N, F]: the oracle of gemm.py. The norm rounds as the model's rmsnorm does
    (kernels/nn/reference.py); with res, cuBLAS's addmm (fp32 products, one rounding of the sum)."""
    if w_norm is not None:
        xf = x.to(_acc(x))
        x = (xf * rstd.to(xf.dtype)[:, None]).to(x.dtype) * w_norm
    return F.linear(x, w) if res is None else torch.addmm(res, x, w.t())


def linear_epilogue_backward(
    x: Tensor,
    w: Tensor,
    dout: Tensor,
    w_norm: Tensor | None = None,
    rstd: Tensor | None = None,
    norm_grad=None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (dx, dw, dw_norm or None); a residual's gradient is dout itself. With the norm:
    dw = dout^T xn with xn = rmsnorm(x) recomputed, and x's gradient is RMSNorm's backward of
    dn = dout w (rmsnorm_backward, or `norm_grad`: the norm's Triton backward in eager CUDA calls)."""
    if w_norm is None:
        return dout @ w, dout.t() @ x, None
    xn = (x.to(_acc(x)) * rstd.to(_acc(x))[:, None]).to(x.dtype) * w_norm
    dx, dw_norm = (norm_grad or rmsnorm_backward)(x, w_norm, rstd, None, dout @ w)
    return dx, dout.t() @ xn, dw_norm
