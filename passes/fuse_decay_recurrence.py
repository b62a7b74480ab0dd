"""fuse-decay-recurrence: the pointwise tail of the MDI decay (two sigmoids, their product, the
clamp) moves into the gated recurrence's kernel, which reads the decay's two logits and forms
gamma in registers; gamma [B, T, D] is never written, read or differentiated through in HBM.

Assumes: gamma feeds this recurrence only (one use, not a graph output), so nothing else needs
it materialised; the recurrence has a W_g (one without runs as a linear scan: the pass
lower-linear-recurrence turns it into one before this pass runs). The rewrite is exact: the
fused kernel computes the same clamp(sigmoid(a) * sigmoid(c), eps, 1 - eps) and its gradient.

    before: %gamma = mdi_decay(%z, %k, @w1, @b1, @w2, @b2, @c1, @cb1, @c2, @cb2) {eps = 1e-06}
            %h, %h_last = gated_recurrence(%z, %gz, %gamma, %h0, @w_g)
    after:  %gamma.a, %gamma.c = mdi_decay_logits(%z, %k, @w1, @b1, @w2, @b2, @c1, @cb1, @c2, @cb2)
            %h, %h_last = decay_recurrence(%z, %gz, %gamma.a, %gamma.c, %h0, @w_g) {eps = 1e-06}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import OPS, Node

from .rewrite import Context, RewritePass, Rule


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    if len(node.inputs) != 5:  # no W_g: not this kernel's to fuse into
        return False
    z, gz, gamma, h0, w_g = node.inputs
    found = ctx.producer(gamma)
    if found is None or ctx.uses.get(gamma) != 1:
        return False
    decay_index, decay = found
    if decay.op != "mdi_decay" or ctx.touched(decay_index):
        return False
    eps = decay.attr.get("eps", OPS["mdi_decay"].attrs["eps"])
    base = decay.outputs[0].name
    a, c = ctx.value(f"{base}.a", gamma), ctx.value(f"{base}.c", gamma)
    ctx.replace(decay_index, [Node("mdi_decay_logits", decay.inputs, (a, c))])
    fused = Node("decay_recurrence", (z, gz, a.ref, c.ref, h0, w_g), node.outputs, (("eps", eps),))
    ctx.replace(index, [fused])
    return True


@dataclass(frozen=True)
class FuseDecayRecurrence(RewritePass):
    name = "fuse-decay-recurrence"
    rules = (Rule("gated_recurrence", _fuse),)
