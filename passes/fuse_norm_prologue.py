"""fuse-norm-prologue: an rmsnorm whose only reader is a SwiGLU GEMM moves into that GEMM, which
normalises its input as it reads it: the GEMM's K loop already reads each row whole, so it sums
the row's squares on the way and scales its accumulators by rstd, and the norm's weight is folded
into the weights' per-call copy. The normalised rows are never written or read back.

Runs after fuse-epilogue (whose `linear_swiglu` it extends) and before fuse-residual-norm, which
would otherwise take the norm together with the residual add before it: the add then stays a
plain add (three rows a token instead of add_rmsnorm's four), and the GEMM reads the sum instead
of the normalised sum. Assumes: the norm's output has no other use; its weight is a parameter.
Exact up to rounding: rmsnorm(x) W^T = rstd (x (W diag(w_norm))^T).

Opt-in: its kernel is tested under the interpreter but has not run on a GPU. By the fusion
report's count it saves one row per fused norm (the block's FFN norm: 4,096 bytes a token at
D 1024).

    before: %u = rmsnorm(%x, @w_norm) {eps = 1e-06}
            %h = linear_swiglu(%u, @w_gate, @w_up)
    after:  %h = rms_linear_swiglu(%x, @w_norm, @w_gate, @w_up) {eps = 1e-06}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Node

from .rewrite import Context, RewritePass, Rule


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    found = ctx.producer(node.inputs[0])
    if found is None or ctx.uses.get(node.inputs[0]) != 1:
        return False
    norm_index, norm = found
    if norm.op != "rmsnorm" or not norm.inputs[1].startswith("@") or ctx.touched(norm_index):
        return False
    fused = Node("rms_linear_swiglu", (norm.inputs[0], norm.inputs[1], *node.inputs[1:]), node.outputs, norm.attrs)
    ctx.replace(index, [fused], remove=(norm_index,))
    return True


@dataclass(frozen=True)
class FuseNormPrologue(RewritePass):
    name = "fuse-norm-prologue"
    rules = (Rule("linear_swiglu", _fuse),)
