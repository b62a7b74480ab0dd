"""lower-linear-recurrence: a gated recurrence without W_g becomes a linear scan (SPEC §2).

Assumes: without W_g the gate sigma(gz_t) depends on the input only, so
h_t = gamma_t h_{t-1} + z_t sigma(gz_t) = linear_scan(log gamma, z * sigmoid(gz), h0), which
runs as a parallel scan instead of a sequential loop. gamma lies in (0, 1) (mdi_decay clamps it),
so log gamma is finite.

    before: %h, %h_last = gated_recurrence(%z, %gz, %gamma, %h0)
    after:  %h.log_gamma = log(%gamma)
            %h.gate = sigmoid(%gz)
            %h.drive = mul(%z, %h.gate)
            %h, %h_last = linear_scan(%h.log_gamma, %h.drive, %h0)
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Node

from .rewrite import Context, RewritePass, Rule


def _lower(index: int, node: Node, ctx: Context) -> bool:
    if len(node.inputs) != 4:  # has a W_g: stays a gated recurrence
        return False
    z, gz, gamma, h0 = node.inputs
    base = node.outputs[0].name
    log_gamma, gate, drive = (ctx.value(f"{base}.{n}", z) for n in ("log_gamma", "gate", "drive"))
    ctx.replace(
        index,
        [
            Node("log", (gamma,), (log_gamma,)),
            Node("sigmoid", (gz,), (gate,)),
            Node("mul", (z, gate.ref), (drive,)),
            Node("linear_scan", (log_gamma.ref, drive.ref, h0), node.outputs),
        ],
    )
    return True


@dataclass(frozen=True)
class LowerLinearRecurrence(RewritePass):
    name = "lower-linear-recurrence"
    rules = (Rule("gated_recurrence", _lower),)
