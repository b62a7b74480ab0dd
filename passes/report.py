"""Fusion report: what a pipeline did to each block, in ops (kernel launches) and in activation
bytes that cross HBM per token.

The model of cost is the one fusion changes: every IR op is one kernel that reads each of its
activation operands once and writes each of its outputs once. Activations are the per-token
tensors (shape [B, T, ...]); weights, carried states and the memory rings are left out (they
are read once per call, not per token, and no pass here changes them). So the numbers are the
traffic between kernels, the part fusion removes; what a kernel moves internally is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmrec_ir import Graph, TensorType
from mmrec_ir.dot import layer_of


@dataclass
class BlockCost:
    ops: int = 0
    bytes_per_token: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


def _token_bytes(t) -> int:
    """Bytes per token of a [B, T, ...] tensor; 0 for anything else."""
    if not isinstance(t, TensorType) or t.rank < 2 or t.shape[:2] != ("B", "T"):
        return 0
    n = t.dtype.bytes
    for d in t.shape[2:]:
        if not isinstance(d, int):
            return 0
        n *= d
    return n


def block_costs(graph: Graph) -> dict[str, BlockCost]:
    """Per block (`layerN`, or "other" for the embedding, final norm and head)."""
    types = graph.types()
    producer_layer: dict[str, str] = {}
    costs: dict[str, BlockCost] = {}
    for node in graph.nodes:
        first = producer_layer.get(node.inputs[0], "") if node.inputs else ""
        layer = layer_of(node, first) or "other"
        for out in node.outputs:
            producer_layer[out.ref] = layer if layer != "other" else ""
        moved = sum(_token_bytes(types.get(r)) for r in node.inputs if r.startswith("%"))
        moved += sum(_token_bytes(out.type) for out in node.outputs)
        cost = costs.setdefault(layer, BlockCost())
        cost.ops += 1
        cost.bytes_per_token += moved
        cost.by_op[node.op] = cost.by_op.get(node.op, 0) + 1
    return costs


def fusion_report(before: Graph, after: Graph) -> str:
    """A table: per block, ops and activation bytes per token before and after the pipeline."""
    b, a = block_costs(before), block_costs(after)
    names = sorted(set(b) | set(a), key=lambda n: (n == "other", int(n[5:]) if n.startswith("layer") else 0, n))
    lines = [
        "// fusion report: each op is one kernel reading its per-token inputs and writing its outputs",
        "// once (weights, carried state and memory rings excluded); bytes are per token",
        f"// {'block':<8} {'ops before':>10} {'after':>6} {'bytes before':>13} {'after':>10} {'saved':>6}",
    ]

    def row(name: str, x: BlockCost, y: BlockCost) -> str:
        saved = 1 - y.bytes_per_token / x.bytes_per_token if x.bytes_per_token else 0.0
        return f"// {name:<8} {x.ops:>10} {y.ops:>6} {x.bytes_per_token:>13,} {y.bytes_per_token:>10,} {saved:>6.0%}"

    for name in names:
        lines.append(row(name, b.get(name, BlockCost()), a.get(name, BlockCost())))
    total_b = BlockCost(sum(c.ops for c in b.values()), sum(c.bytes_per_token for c in b.values()))
    total_a = BlockCost(sum(c.ops for c in a.values()), sum(c.bytes_per_token for c in a.values()))
    lines.append(row("total", total_b, total_a))
    return "\n".join(lines) + "\n"
