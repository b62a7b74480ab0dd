"""Op implementations the generated forward calls: `ops.<op name>(...)` -> tuple of outputs.

Every op of mmrec_ir.OPS has one here; the MM-Rec ops come from `kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from mmrec_ir import OPS


def _one(x):
    return (x,)


def _interleave_pays(x, w_gate, norm: bool = False) -> bool:
    """Whether the SwiGLU GEMM (kernels/linear) moves fewer bytes than cuBLAS's two GEMMs and the
    pointwise ops for x's rows. Per call it copies both weights into their interleaved order
    (reads and writes 2 F D), then reads x once and writes one [rows, F]; unfused reads x twice,
    the weights once, and writes and reads back the two pre-activations. So it pays from
    rows (D + 4 F) > 4 F D on, about D rows; with the norm (`norm`), whose normalised rows the
    unfused path also writes and reads back, from rows (3 D + 4 F) > 4 F D. Not in decoding,
    where a token's step would copy the weights three times over what it reads of them. (In
    training the kernel also writes g and u: break-even about twice the rows, still far below a
    training batch's.)"""
    hidden, width = w_gate.shape
    rows = x.numel() // max(width, 1)
    return rows * ((3 if norm else 1) * width + 4 * hidden) > 4 * hidden * width


def _many_rows(x) -> bool:
    """Whether x has the rows our persistent GEMM (kernels/linear/gemm.py) is for. It tiles 128
    rows a program, so a decoding step's few rows would leave all but N / 128 SMs idle where
    cuBLAS's GEMV kernels spread the weight's read over the whole GPU; and its autotuning key
    leaves out the row count, so its first call should be a large one."""
    return x.numel() // max(x.shape[-1], 1) >= 1024


def _fold_pays(x, weights) -> bool:
    """Whether rms_linear (kernels/linear/gemm.py) moves fewer bytes than the norm kernel and
    cuBLAS for x's rows. Per call it copies the weights W (concatenated, the norm's weight folded
    in: reads and writes W, twice over with several weights) and reads x once more for rstd;
    unfused writes and reads back the normalised rows. So it pays from rows D > 2 W on (several
    weights are concatenated on both paths): not in decoding."""
    return x.numel() > 2 * sum(w.numel() for w in weights)


class ReferenceOps:
    """The plain-PyTorch op set. `training` switches MoE capacity limits on. `size_rules`: the
    GEMM ops choose their form by the row count (the rules above); without them (export) each
    takes its plain form, whatever the rows, so a trace does not depend on the batch."""

    def __init__(self, training: bool, size_rules: bool = True):
        self.training = training
        self.size_rules = size_rules

    embedding = staticmethod(lambda ids, table: _one(F.embedding(ids, table)))
    rmsnorm = staticmethod(lambda x, weight, eps: _one(kernels.rmsnorm(x, weight, eps)))
    add = staticmethod(lambda lhs, rhs: _one(lhs + rhs))
    sub = staticmethod(lambda lhs, rhs: _one(lhs - rhs))
    mul = staticmethod(lambda lhs, rhs: _one(lhs * rhs))
    sigmoid = staticmethod(lambda x: _one(torch.sigmoid(x)))
    gelu = staticmethod(lambda x: _one(F.gelu(x)))
    silu = staticmethod(lambda x: _one(F.silu(x)))
    log = staticmethod(lambda x: _one(torch.log(x)))
    exp = staticmethod(lambda x: _one(torch.exp(x)))
    neg = staticmethod(lambda x: _one(-x))
    clamp = staticmethod(lambda x, min, max: _one(torch.clamp(x, min, max)))
    scale = staticmethod(lambda x, factor: _one(x * factor))
    split = staticmethod(lambda x, sizes: tuple(torch.split(x, list(sizes), dim=-1)))
    concat = staticmethod(lambda *xs: _one(torch.cat(xs, dim=-1)))
    mdi_decay = staticmethod(lambda *args, eps: _one(kernels.mdi_decay(*args, eps=eps)))
    mdi_decay_fused = staticmethod(lambda *args, eps: _one(kernels.mdi_decay_fused(*args, eps=eps)))
    mdi_decay_logits = staticmethod(kernels.mdi_decay_logits)
    linear_scan = staticmethod(kernels.linear_scan)

    @staticmethod
    def gated_recurrence(z, gz, gamma, h0, w_g=None):
        if w_g is None:  # the gate depends on the input only: a linear scan (SPEC §2)
            return kernels.linear_scan(torch.log(gamma), z * torch.sigmoid(gz), h0)
        return kernels.gated_recurrence(z, gz, gamma, w_g, h0)

    @staticmethod
    def decay_recurrence(z, gz, a, c, h0, w_g, eps):
        return kernels.decay_recurrence(z, gz, a, c, w_g, h0, eps)

    add_rmsnorm = staticmethod(kernels.add_rmsnorm)
    add_rstd = staticmethod(kernels.add_rstd)

    memory_write = staticmethod(lambda mem, k, v: _one(kernels.memory_write(mem, k, v)))

    @staticmethod
    def hds_query(q, k, v, beta, mem, residual=None, *, heads):
        return _one(kernels.hds_query(q, k, v, beta, mem, heads, residual))

    ffn = staticmethod(lambda x, w_gate, w_up, w_down: _one(kernels.swiglu(x, w_gate, w_up, w_down)))
    lm_head = staticmethod(lambda x, table: _one(F.linear(x, table)))
    uboo_loss = staticmethod(lambda h, h0, p, q: _one(kernels.uboo_loss(h, h0, p, q)))

    def linear(self, x, *weights, splits=()):
        rows = [w.shape[0] for w in weights]
        sizes = list(splits or rows)
        # Several weights (fuse-projections): one GEMM over their concatenation, which copies
        # the weights once per call. That pays when x is large (it is read once instead of once
        # per weight), not in decoding, where x is a token or a few and each weight is read anyway.
        concat = self.size_rules and x.numel() * (len(weights) - 1) > 2 * sum(w.numel() for w in weights)
        if len(weights) == 1 or concat:
            y = F.linear(x, weights[0] if len(weights) == 1 else torch.cat(weights))
            return tuple(torch.split(y, sizes, dim=-1)) if len(sizes) > 1 else (y,)
        ys = [F.linear(x, w) for w in weights]
        return tuple(ys) if sizes == rows else tuple(torch.split(torch.cat(ys, dim=-1), sizes, dim=-1))

    pointwise = staticmethod(lambda *xs, expr: _one(kernels.pointwise(xs, expr)))

    def linear_swiglu(self, x, w_gate, w_up):
        if self.size_rules and _interleave_pays(x, w_gate):
            return _one(kernels.linear_swiglu(x, w_gate, w_up))
        return _one(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))

    def linear_residual(self, x, weight, residual):
        if self.size_rules and _many_rows(x):
            return _one(kernels.linear_residual(x, weight, residual))
        return _one(residual + F.linear(x, weight))

    rms_stats = staticmethod(lambda x, eps: _one(kernels.add_rstd(x, None, eps)[1]))

    def rms_linear(self, x, w_norm, rstd, *weights, splits=(), eps):
        rows = [w.shape[0] for w in weights]
        sizes = list(splits or rows)
        if not (self.size_rules and _fold_pays(x, weights)):  # decoding: the norm kernel and cuBLAS
            return self.linear(kernels.rmsnorm(x, w_norm, eps), *weights, splits=splits)
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        y = kernels.rms_linear(x, w_norm, w, eps, rstd)
        return tuple(torch.split(y, sizes, dim=-1)) if len(sizes) > 1 else (y,)

    def rms_linear_swiglu(self, x, w_norm, w_gate, w_up, rstd=None, *, eps):
        if self.size_rules and _interleave_pays(x, w_gate, norm=True):
            return _one(kernels.rms_linear_swiglu(x, w_norm, w_gate, w_up, eps, rstd))
        u = kernels.rmsnorm(x, w_norm, eps)  # recomputes rstd (the same eps as add_rstd's)
        return _one(F.silu(F.linear(u, w_gate)) * F.linear(u, w_up))

    def moe(self, x, router, w_gate, w_up, w_down, top_k, capacity_factor):
        return kernels.moe(x, router, w_gate, w_up, w_down, top_k, capacity_factor, self.training)


_missing = sorted(set(OPS) - {n for n in dir(ReferenceOps) if not n.startswith("_")})
assert not _missing, f"ops without a reference implementation: {_missing}"
