"""Fusion report: what a pipeline did to each block, in IR ops, kernel launches and activation
bytes that cross HBM per token.

The model of cost is the one fusion changes: the kernels the CUDA op set launches for a node
outside torch.compile (runtime/opset.py), each reading its activation operands once and writing
its outputs once. Most ops are one kernel; the composite ones are counted as the kernels their
implementation runs (`node_kernels`: mdi_decay is two GEMM-gelu-GEMM chains, two sigmoids, a
product and a clamp; ffn two GEMMs, silu, product, GEMM). Activations are the per-token tensors
(shape [B, T, ...]); weights, carried states and the memory rings are left out (they are read
once per call, not per token, and no pass here changes them), and so are the per-block summaries
hds_query and memory_write build (one row per memory block, not per token). So the numbers are
the traffic between kernels, the part fusion removes; what a kernel moves on chip is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmrec_ir import Graph, Node, TensorType
from mmrec_ir.dot import layer_of


@dataclass
class BlockCost:
    ops: int = 0
    kernels: int = 0
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


def _width(t) -> int:
    return t.shape[-1] if isinstance(t, TensorType) and isinstance(t.shape[-1], int) else 0


def node_kernels(node: Node, types: dict) -> list[tuple[str, int]]:
    """The kernels the CUDA op set launches for `node` outside torch.compile, each with the
    activation bytes per token it reads and writes."""
    if node.op in ("mdi_decay", "mdi_decay_logits", "ffn"):
        e = node.outputs[0].type.dtype.bytes
        d = _width(node.outputs[0].type)
        if node.op == "ffn":
            f = types[node.inputs[1]].shape[0]
            # gate and up GEMMs, silu, the product, the down GEMM
            return [("linear", (d + f) * e), ("linear", (d + f) * e), ("silu", 2 * f * e), ("mul", 3 * f * e),
                    ("linear", (f + d) * e)]  # fmt: skip
        chains = []
        for x, w1 in ((node.inputs[0], node.inputs[2]), (node.inputs[1], node.inputs[6])):
            f = types[w1].shape[0]
            chains += [("linear", (_width(types[x]) + f) * e), ("gelu", 2 * f * e), ("linear", (f + d) * e)]
            if node.op == "mdi_decay":
                chains.append(("sigmoid", 2 * d * e))
        if node.op == "mdi_decay":
            chains += [("mul", 3 * d * e), ("clamp", 2 * d * e)]
        return chains
    if node.op == "rms_linear_swiglu" and len(node.inputs) < 5:
        # add_rstd on x first (rstd, 4 bytes a row), then the GEMM reads x and writes its outputs
        x = _token_bytes(types[node.inputs[0]])
        return [("add_rstd", x + 4), (node.op, x + sum(_token_bytes(out.type) for out in node.outputs))]
    moved = sum(_token_bytes(types.get(r)) for r in node.inputs if r.startswith("%"))
    moved += sum(_token_bytes(out.type) for out in node.outputs)
    return [(node.op, moved)]


def node_layers(graph: Graph) -> list[tuple[Node, str]]:
    """Each node with its block: `layerN`, or "other" (the embedding, final norm and head)."""
    producer_layer: dict[str, str] = {}
    placed = []
    for node in graph.nodes:
        first = producer_layer.get(node.inputs[0], "") if node.inputs else ""
        layer = layer_of(node, first) or "other"
        for out in node.outputs:
            producer_layer[out.ref] = layer if layer != "other" else ""
        placed.append((node, layer))
    return placed


def block_costs(graph: Graph) -> dict[str, BlockCost]:
    """Per block (`layerN`, or "other" for the embedding, final norm and head)."""
    types = graph.types()
    costs: dict[str, BlockCost] = {}
    for node, layer in node_layers(graph):
        launched = node_kernels(node, types)
        cost = costs.setdefault(layer, BlockCost())
        cost.ops += 1
        cost.kernels += len(launched)
        cost.bytes_per_token += sum(moved for _, moved in launched)
        cost.by_op[node.op] = cost.by_op.get(node.op, 0) + 1
    return costs


def fusion_report(before: Graph, after: Graph) -> str:
    """A table: per block, IR ops, kernel launches and activation bytes per token, before and
    after the pipeline."""
    b, a = block_costs(before), block_costs(after)
    names = sorted(set(b) | set(a), key=lambda n: (n == "other", int(n[5:]) if n.startswith("layer") else 0, n))
    lines = [
        "// fusion report: the kernels each op launches on CUDA outside torch.compile, each reading its",
        "// per-token inputs and writing its outputs once (weights, carried state and memory rings",
        "// excluded); bytes are per token",
        f"// {'block':<8} {'ops before':>10} {'after':>6} {'kernels before':>15} {'after':>6}"
        f" {'bytes before':>13} {'after':>10} {'saved':>6}",
    ]

    def row(name: str, x: BlockCost, y: BlockCost) -> str:
        saved = 1 - y.bytes_per_token / x.bytes_per_token if x.bytes_per_token else 0.0
        return (
            f"// {name:<8} {x.ops:>10} {y.ops:>6} {x.kernels:>15} {y.kernels:>6}"
            f" {x.bytes_per_token:>13,} {y.bytes_per_token:>10,} {saved:>6.0%}"
        )

    for name in names:
        lines.append(row(name, b.get(name, BlockCost()), a.get(name, BlockCost())))

    def total(costs: dict[str, BlockCost]) -> BlockCost:
        return BlockCost(*(sum(getattr(c, k) for c in costs.values()) for k in ("ops", "kernels", "bytes_per_token")))

    total_b, total_a = total(b), total(a)
    lines.append(row("total", total_b, total_a))
    blocks = [n for n in names if n.startswith("layer")]
    if blocks:
        lines += op_table(before, after, blocks[min(1, len(blocks) - 1)])
    return "\n".join(lines) + "\n"


def _op_rows(graph: Graph, layer: str) -> list[str]:
    types = graph.types()
    rows = []
    for node, where in node_layers(graph):
        if where != layer:
            continue
        launched = node_kernels(node, types)
        label = node.op if len(launched) == 1 else f"{node.op} ({len(launched)} kernels)"
        rows.append(f"{label:<30} {sum(moved for _, moved in launched):>9,}")
    return rows


def op_table(before: Graph, after: Graph, layer: str) -> list[str]:
    """One block op by op, in program order, before and after: where its bytes go."""
    left, right = _op_rows(before, layer), _op_rows(after, layer)
    width = 40
    lines = [f"// {layer} op by op (activation bytes per token):", f"//   {'before':<{width}} | after"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"//   {a:<{width}} | {b}".rstrip())
    return lines
