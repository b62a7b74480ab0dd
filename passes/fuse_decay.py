"""fuse-decay: the whole MDI decay (both MLPs, the sigmoids, the product, the clamp) becomes one
kernel, `mdi_decay_fused`: per token it reads z and k and writes gamma; the logits a and c and
the two [*, R] hiddens never reach HBM. An alternative to fuse-decay-recurrence, which writes a
and c and fuses only the tail into the recurrence; whichever runs first claims the decay.

Assumes: the two MLPs share the bottleneck width R (the kernel holds both hiddens as one shape)
and R <= 256 (kernels/decay: the hidden's two parts are TMA boxes of at most 256 and 128); a
decay that differs stays as it is. Exact: the kernel computes SPEC §3 as written, rounding the
hiddens to the activation dtype as the plain ops do.

Opt-in: the kernel fits sm_90 only with unpipelined loops, and on the H200 it ran 0.33x-0.81x
torch.compile's decay forward; the block slowed from 5.92 to 6.73 ms forward with it (session 14,
BENCHMARKS.md). By the fusion report's count the default pipeline with this pass in place of
fuse-decay-recurrence moves 2.33x fewer activation bytes per token than unfused in the benchmark
block, against the default's 2.04x.

    before: %gamma = mdi_decay(%z, %k, @w1, @b1, @w2, @b2, @c1, @cb1, @c2, @cb2) {eps = 1e-06}
    after:  %gamma = mdi_decay_fused(%z, %k, @w1, @b1, @w2, @b2, @c1, @cb1, @c2, @cb2) {eps = 1e-06}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Node

from .rewrite import Context, RewritePass, Rule

MAX_HIDDEN = 256


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    w1, c1 = node.inputs[2], node.inputs[6]
    hidden = ctx.types[w1].shape[0]
    if hidden != ctx.types[c1].shape[0] or not isinstance(hidden, int) or hidden > MAX_HIDDEN:
        return False
    ctx.replace(index, [Node("mdi_decay_fused", node.inputs, node.outputs, node.attrs)])
    return True


@dataclass(frozen=True)
class FuseDecay(RewritePass):
    name = "fuse-decay"
    rules = (Rule("mdi_decay", _fuse),)
