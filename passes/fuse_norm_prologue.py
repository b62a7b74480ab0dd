"""fuse-norm-prologue: an rmsnorm whose only reader is a GEMM moves into that GEMM, which applies
it in its epilogue: rmsnorm(x) W^T = rstd (x (W diag(w_norm))^T), so the GEMM reads x itself,
the norm's weight is folded into the weights' per-call copy, and each row's sums are scaled by
its 1/rms (rstd). The normalised rows are never written or read back. Two rows: the SwiGLU GEMM
(`linear_swiglu` -> `rms_linear_swiglu`, kernels/linear/kernel.py) and a plain projection of
parameter weights (`linear` -> `rms_linear`, kernels/linear/gemm.py; the block's input
projection).

The statistics come from the kernel that makes x: a residual add before the norm becomes
`add_rstd`, which writes the sum and 4 bytes of rstd a row (three rows a token, against the four
of add_rmsnorm, which also writes the normalised sum); with no add there, an `rms_stats` takes the
norm's place (one read of x, 4 bytes a row written). (Summing the squares in the GEMM's own K
loop read nothing extra, but Triton 3.6 got it wrong on sm_90: docs/kernels.md.)

Runs after fuse-epilogue (whose `linear_swiglu` it extends) and before fuse-residual-norm, which
would otherwise take the norm together with the add. Assumes: the norm's output has no other use;
its weight is a parameter; the add's operands have the sum's type. The rms_linear row takes fp32
graphs only: in bf16 the plain GEMM with the norm ran 0.28x-0.91x the forward speed of rmsnorm +
cuBLAS on the H200. (The SwiGLU row finds linear_swiglu only where fuse-epilogue formed it, in
fp32 graphs, or in hand-written IR.) Exact up to rounding.

    before: %x = add(%a, %b)
            %u = rmsnorm(%x, @w_norm) {eps = 1e-06}
            %h = linear_swiglu(%u, @w_gate, @w_up)
    after:  %x, %u.rstd = add_rstd(%a, %b) {eps = 1e-06}
            %h = rms_linear_swiglu(%x, @w_norm, @w_gate, @w_up, %u.rstd) {eps = 1e-06}

    before: %u = rmsnorm(%x, @w_norm) {eps = 1e-06}
            %q, %k = linear(%u, @w_q, @w_k)
    after:  %u.rstd = rms_stats(%x) {eps = 1e-06}
            %q, %k = rms_linear(%x, @w_norm, %u.rstd, @w_q, @w_k) {eps = 1e-06}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import DType, Node, TensorType, Value
from mmrec_ir.graph import make_attrs

from .rewrite import Context, RewritePass, Rule


def _norm(node: Node, ctx: Context) -> tuple[int, Node] | None:
    """The rmsnorm (parameter weight, not yet rewritten) whose only reader is `node`."""
    found = ctx.producer(node.inputs[0])
    if found is None or ctx.uses.get(node.inputs[0]) != 1:
        return None
    norm_index, norm = found
    if norm.op != "rmsnorm" or not norm.inputs[1].startswith("@") or ctx.touched(norm_index):
        return None
    return found


def _statistics(norm_index: int, norm: Node, ctx: Context) -> tuple[str, tuple[int, ...]]:
    """The rows' 1/rms of the norm's input, from the kernel that makes it: an add before the norm
    becomes add_rstd; else the norm's place takes an rms_stats. -> (rstd's ref, what to remove).
    rstd is named after the norm's output, so it stays in the norm's block (fusion report)."""
    x = norm.inputs[0]
    x_type = ctx.types[x]
    rstd = Value(ctx.fresh(norm.outputs[0].name + ".rstd"), TensorType(DType.f32, x_type.shape[:-1]))
    added = ctx.producer(x)
    if added is not None and added[1].op == "add" and not ctx.touched(added[0]):
        add_index, add = added
        if all(ctx.types.get(r) == x_type for r in add.inputs):
            ctx.replace(add_index, [Node("add_rstd", add.inputs, (add.outputs[0], rstd), norm.attrs)])
            return rstd.ref, (norm_index,)
    ctx.replace(norm_index, [Node("rms_stats", (x,), (rstd,), norm.attrs)])
    return rstd.ref, ()


def _fuse_linear(index: int, node: Node, ctx: Context) -> bool:
    found = _norm(node, ctx)
    if found is None or not all(w.startswith("@") for w in node.inputs[1:]):
        return False
    if ctx.types[node.inputs[0]].dtype is not DType.f32:  # bf16: 0.28x-0.91x cuBLAS (BENCHMARKS.md)
        return False
    norm_index, norm = found
    rstd, remove = _statistics(norm_index, norm, ctx)
    attrs = make_attrs({**norm.attr, **node.attr})
    fused = Node("rms_linear", (norm.inputs[0], norm.inputs[1], rstd, *node.inputs[1:]), node.outputs, attrs)
    ctx.replace(index, [fused], remove=remove)
    return True


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    found = _norm(node, ctx)
    if found is None:
        return False
    norm_index, norm = found
    rstd, remove = _statistics(norm_index, norm, ctx)
    fused = Node(
        "rms_linear_swiglu", (norm.inputs[0], norm.inputs[1], *node.inputs[1:], rstd), node.outputs, norm.attrs
    )
    ctx.replace(index, [fused], remove=remove)
    return True


@dataclass(frozen=True)
class FuseNormPrologue(RewritePass):
    name = "fuse-norm-prologue"
    rules = (Rule("linear_swiglu", _fuse), Rule("linear", _fuse_linear))
