"""select-kernels: record on every node which implementation claims it, per device.

Assumes: the runtime's op set (runtime/opset.py) dispatches as the table below says; the test
tests/passes/test_passes.py checks that every op has an entry and that every custom op named
here is registered. The pass changes no numerics: it only sets the `kernel` annotation, which
`mmrec inspect` prints and the generated forward ignores.

On CUDA an op is claimed by one of our Triton kernels (`triton:mmrec::<op>`), by a cuBLAS GEMM
(`cublas`), or by PyTorch's own kernels (`torch`; under torch.compile, Inductor fuses these).
On CPU everything is the plain-PyTorch reference. For ONNX (runtime/export.py: `mmrec export`)
every op is its reference traced by torch.export and lowered by torch.onnx to standard ONNX
operators, no custom operator; ONNX_LOWERINGS says what that becomes for each op.

    before: %h, %h_last = linear_scan(%log_a, %b, %h0)
    after:  %h, %h_last = linear_scan(%log_a, %b, %h0)
                {kernel = "cuda: triton:mmrec::linear_scan_fwd/_bwd; cpu: reference; onnx: reference, unrolled over T"}
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrec_ir import Graph, Node
from mmrec_ir.graph import make_attrs

from .base import Pass

_TORCH = "torch"
_NORM_BWD = "triton:mmrec::add_rmsnorm_bwd"
# op -> what claims it on CUDA. Ops absent here run PyTorch kernels.
CUDA_KERNELS: dict[str, str] = {
    "linear_scan": "triton:mmrec::linear_scan_fwd/_bwd",
    "gated_recurrence": "triton:mmrec::gated_recurrence_fwd/_bwd",
    "decay_recurrence": "triton:mmrec::decay_recurrence_fwd/_bwd",
    "hds_query": "triton:mmrec::hds_query = hds_attend_fwd/_bwd (T > 1), triton:mmrec::hds_decode (T = 1, inference)",
    "memory_write": "triton:mmrec::block_sums + torch (segments), triton:mmrec::memory_write_step (decode session)",
    "rmsnorm": "triton:mmrec::add_rmsnorm_fwd/_bwd",
    "add_rmsnorm": "triton:mmrec::add_rmsnorm_fwd/_bwd",
    "add_rstd": "triton:mmrec::add_rstd_fwd",
    "linear": "cublas",
    "pointwise": "triton (generated from expr; under torch.compile: Inductor)",
    "linear_swiglu": "triton:mmrec::linear_swiglu_fwd (backward: cublas + torch)",
    "linear_residual": "triton:mmrec::linear_residual_fwd (backward: cublas)",
    "rms_linear": "triton:mmrec::rms_linear_fwd (backward: cublas + torch; eager: + " + _NORM_BWD + ")",
    "rms_stats": "triton:mmrec::add_rstd_fwd",
    "rms_linear_swiglu": "triton:mmrec::rms_linear_swiglu_fwd (backward: cublas + torch; eager: + " + _NORM_BWD + ")",
    "lm_head": "cublas",
    "ffn": "cublas + torch",
    "moe": "cublas + torch",
    "mdi_decay": "cublas + torch",
    "mdi_decay_logits": "cublas + torch (MMREC_DECAY_KERNELS=1: triton:mmrec::decay_mlp)",
    "mdi_decay_fused": "triton:mmrec::mdi_decay_fused (backward: cublas + torch)",
    "uboo_loss": "cublas + torch",
}


_UNROLLED = "reference, unrolled over T"
# op -> what its ONNX lowering is made of (the exported step has a fixed T). Ops absent here
# become the one or few ONNX operators of their PyTorch expression.
ONNX_LOWERINGS: dict[str, str] = {
    "linear_scan": _UNROLLED,
    "gated_recurrence": _UNROLLED,
    "decay_recurrence": _UNROLLED,
    "hds_query": "reference: gathers of the rings, masked softmax, matmuls",
    "memory_write": "reference: block sums by index_add, rings rebuilt by gathers",
    "moe": "reference: router top-k, every expert dense, weighted sum",
}


def claim(node: Node) -> str:
    cuda = CUDA_KERNELS.get(node.op, _TORCH)
    if node.op == "gated_recurrence" and len(node.inputs) < 5:  # no W_g: runs as a linear scan
        cuda = CUDA_KERNELS["linear_scan"]
    if node.op == "rms_linear_swiglu" and len(node.inputs) < 5:  # computes its rstd first
        cuda = "triton:mmrec::add_rstd_fwd + " + cuda
    return f"cuda: {cuda}; cpu: reference; onnx: {ONNX_LOWERINGS.get(node.op, 'reference')}"


@dataclass(frozen=True)
class SelectKernels(Pass):
    name = "select-kernels"

    def apply(self, graph: Graph) -> Graph:
        nodes = [Node(n.op, n.inputs, n.outputs, make_attrs({**n.attr, "kernel": claim(n)})) for n in graph.nodes]
        return graph.with_nodes(nodes)
