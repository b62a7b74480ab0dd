"""fuse-residual-norm: a residual add and the rmsnorm that reads it become one `add_rmsnorm`,
which returns both the sum (the residual stream goes on) and the normalised sum, so the sum
is written once and read zero extra times.

Assumes: the norm's weight is a parameter (defined everywhere), so the fused node can take the
add's place in program order, before every other use of the sum.

    before: %x = add(%a, %b)
            %u = rmsnorm(%x, @w) {eps = 1e-06}
    after:  %x, %u = add_rmsnorm(%a, %b, @w) {eps = 1e-06}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Node

from .rewrite import Context, RewritePass, Rule


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    x, weight = node.inputs
    found = ctx.producer(x)
    if found is None or not weight.startswith("@"):
        return False
    add_index, add = found
    if add.op != "add" or ctx.touched(add_index) or ctx.types[x] != ctx.types[node.outputs[0].ref]:
        return False
    fused = Node("add_rmsnorm", (*add.inputs, weight), (add.outputs[0], node.outputs[0]), node.attrs)
    ctx.replace(add_index, [fused], remove=(index,))
    return True


@dataclass(frozen=True)
class FuseResidualNorm(RewritePass):
    name = "fuse-residual-norm"
    rules = (Rule("rmsnorm", _fuse),)
