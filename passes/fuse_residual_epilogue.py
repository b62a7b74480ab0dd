"""fuse-residual-epilogue: a residual add moves into the epilogue of the kernel that computes one
of its terms, which then writes the sum instead of its own result. Per token that saves the
term's write, the add's two reads and its write (less the residual's read in the epilogue), and
one kernel. One table row per kernel with such an epilogue:

- a linear (one weight, one output) becomes `linear_add`: cuBLAS's addmm with beta = 1 reads
  the residual in the GEMM's epilogue (the block's x + W_o(...) and x + W_down(...));
- the memory query `hds_query` takes the residual as its optional last operand: the Triton
  kernel adds it to m before its one store (the block's h + m, SPEC §5). fp32 graphs only:
  the backward forms FlashAttention's delta = rowsum(dout * m) from the saved sum less the
  residual, and in bf16/fp16 that m carries the rounding of the sum, 2^-9 |h + m| instead of
  2^-9 |m|. Measured under the interpreter (bf16, |h| ~ 1): dq 1.5e-2 and dbeta 2.4e-2 relative
  error against 6.3e-3 and 9.4e-3 with the add left apart, so bf16 graphs keep the add.

Assumes: the term has this add as its only use (nothing else needs it in HBM) and the other
operand has its exact type (no broadcasting). The fused node takes the add's place in program
order, where both operands exist. Runs before fuse-residual-norm, which then fuses only the adds
no kernel took: where a norm follows, it reads the one sum the GEMM wrote instead of an
`add_rmsnorm` reading both terms and writing the sum again.

Numerics: the epilogue adds to the fp32 accumulator before the one rounding to the output dtype,
so in bf16 the sum is rounded once instead of twice (equal in fp32 up to summation order).

    before: %y = linear(%h, @w_o)                 %m = hds_query(%q, %k, %v, @beta, %mem)
            %x1 = add(%x, %y)                     %s = add(%h, %m)
    after:  %x1 = linear_add(%h, %x, @w_o)        %s = hds_query(%q, %k, %v, @beta, %mem, %h)
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import DType, Node

from .rewrite import Context, RewritePass, Rule


def _epilogue(term: Node, residual: str, dtype: DType) -> Node | None:
    """`term` with `residual` added in its epilogue, or None where its kernel has no such epilogue."""
    if term.op == "linear" and len(term.inputs) == 2 and len(term.outputs) == 1:
        x, weight = term.inputs
        return Node("linear_add", (x, residual, weight), term.outputs, term.attrs)
    if term.op == "hds_query" and len(term.inputs) == 5 and dtype is DType.f32:
        return Node("hds_query", (*term.inputs, residual), term.outputs, term.attrs)
    return None


def _fuse(index: int, node: Node, ctx: Context) -> bool:
    for term, residual in (node.inputs, node.inputs[::-1]):  # add commutes
        found = ctx.producer(term)
        if found is None or term == residual or ctx.uses.get(term) != 1 or ctx.types[residual] != ctx.types[term]:
            continue
        term_index, producer = found
        fused = None if ctx.touched(term_index) else _epilogue(producer, residual, ctx.types[term].dtype)
        if fused is None:
            continue
        ctx.replace(index, [Node(fused.op, fused.inputs, node.outputs, fused.attrs)], remove=(term_index,))
        return True
    return False


@dataclass(frozen=True)
class FuseResidualEpilogue(RewritePass):
    name = "fuse-residual-epilogue"
    rules = (Rule("add", _fuse),)
