"""fuse-residual-epilogue: a residual add moves into the epilogue of the kernel that computes one
of its terms, which then writes the sum instead of its own result. Per token that saves the
term's write, the add's two reads and its write, less the residual's read in the epilogue, and
one kernel. One table row per kernel with such an epilogue; today the memory query: `hds_query`
takes the residual as its optional last operand and the Triton kernel adds it to m before its
one store (the block's h + m, SPEC §5).

Not a row here: a linear. PyTorch's addmm with a 2-D input (x + h @ W^T) copies x into its
result with a separate kernel before the GEMM reads it back as C (only a 1-D bias takes
cuBLASLt's epilogue), so it moves what a linear and an add move; our own GEMM with the residual
in its epilogue (kernels/linear/gemm.py) is the pass fuse-linear-residual, with this pass's rule,
which runs before this one in the default pipeline.

fp32 graphs only. The backward forms FlashAttention's delta = rowsum(dout * m) from the saved
sum less the residual; in bf16/fp16 that m carries the rounding of the sum, 2^-9 |h + m| instead
of 2^-9 |m|. Measured under the interpreter (bf16, |h| ~ 1): dq and dbeta took 2.4x-3.7x the
relative error of the add left apart, so bf16 graphs keep the add.

Assumes: the term has this add as its only use (nothing else needs it in HBM) and the other
operand has its exact type (no broadcasting). The fused node takes the add's place in program
order, where both operands exist; the query's own operands all precede it. Runs before
fuse-residual-norm, which then fuses only the adds no kernel took.

    before: %m = hds_query(%q, %k, %v, @beta, %mem) {heads = 16}
            %s = add(%h, %m)
    after:  %s = hds_query(%q, %k, %v, @beta, %mem, %h) {heads = 16}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import DType, Node

from .rewrite import Context, RewritePass, Rule


def _epilogue(term: Node, residual: str, dtype: DType, outputs) -> Node | None:
    """`term` with `residual` added in its epilogue, defining `outputs`, or None where its kernel
    has no such epilogue."""
    if term.op == "hds_query" and len(term.inputs) == 5 and dtype is DType.f32:
        return Node("hds_query", (*term.inputs, residual), outputs, term.attrs)
    return None


def fuse_residual(epilogue):
    """The rule for `add`: the first term whose producer `epilogue` can take the other term into
    (epilogue(producer, residual, dtype, outputs) -> the fused node, or None)."""

    def fuse(index: int, node: Node, ctx: Context) -> bool:
        for term, residual in (node.inputs, node.inputs[::-1]):  # add commutes
            found = ctx.producer(term)
            if found is None or term == residual or ctx.uses.get(term) != 1 or ctx.types[residual] != ctx.types[term]:
                continue
            term_index, producer = found
            dtype = ctx.types[term].dtype
            fused = None if ctx.touched(term_index) else epilogue(producer, residual, dtype, node.outputs)
            if fused is None:
                continue
            ctx.replace(index, [fused], remove=(term_index,))
            return True
        return False

    return fuse


@dataclass(frozen=True)
class FuseResidualEpilogue(RewritePass):
    name = "fuse-residual-epilogue"
    rules = (Rule("add", fuse_residual(_epilogue)),)
