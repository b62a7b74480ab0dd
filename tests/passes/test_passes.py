import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
import passes
from mmrec_ir import Builder, VerifyError, f32, parse, print_graph
from runtime.module import run_graph


def run(text: str, pipeline: str) -> str:
    return print_graph(passes.run_pipeline(parse(text), passes.lookup(pipeline)).graph)


def test_cse_golden():
    before = """graph @g(%x: f32[B, 4]) {
  %a: f32[B, 4] = sigmoid(%x)
  %b: f32[B, 4] = sigmoid(%x)
  %c: f32[B, 4] = mul(%a, %b)
  %d: f32[B, 4] = mul(%a, %b)
  return c = %c, d = %d
}
"""
    after = """graph @g(%x: f32[B, 4]) {
  %a: f32[B, 4] = sigmoid(%x)
  %c: f32[B, 4] = mul(%a, %a)
  return c = %c, d = %c
}
"""
    assert run(before, "cse") == after


def test_cse_keeps_nodes_whose_attributes_differ():
    text = """graph @g(%x: f32[B, 4]) {
  %a: f32[B, 4] = clamp(%x) {max = 1.0, min = 0.0}
  %b: f32[B, 4] = clamp(%x) {max = 2.0, min = 0.0}
  return a = %a, b = %b
}
"""
    assert run(text, "cse") == text


def test_dce_golden_drops_dead_nodes_and_their_params():
    before = """graph @g(%x: f32[B, 4]) {
  param @w: f32[4] = ones
  param @unused: f32[4] = zeros
  %a: f32[B, 4] = exp(%x)
  %n: f32[B, 4] = rmsnorm(%a, @unused) {eps = 1e-06}
  %b: f32[B, 4] = rmsnorm(%x, @w) {eps = 1e-06}
  return b = %b
}
"""
    after = """graph @g(%x: f32[B, 4]) {
  param @w: f32[4] = ones
  %b: f32[B, 4] = rmsnorm(%x, @w) {eps = 1e-06}
  return b = %b
}
"""
    assert run(before, "dce") == after


def test_infer_shapes_repairs_annotations_and_cse_then_dce_cleans_up():
    before = """graph @g(%x: f32[B, 4]) {
  %a: f32[B, 4] = neg(%x)
  %b: f32[B, 4] = neg(%x)
  %c: f32[B, 4] = add(%a, %b)
  return c = %c
}
"""
    result = passes.run_pipeline(parse(before), passes.lookup("infer-shapes,cse,dce"))
    assert result.passes_run == ["infer-shapes", "cse", "dce"]
    assert [n.op for n in result.graph.nodes] == ["neg", "add"]
    assert all(s.seconds >= 0 for s in result.stages)


def test_unknown_pass_is_a_one_line_error():
    with pytest.raises(
        passes.PassError, match="unknown pass 'fuse-everything' \\(known: cse, dce, fuse-decay, fuse-decay-recurrence"
    ):
        passes.lookup("cse,fuse-everything")


def test_verification_between_passes_catches_a_broken_pass():
    class Breaker(passes.Pass):
        name = "test-breaker"

        def apply(self, graph):
            return graph.with_nodes(graph.nodes[1:])  # drops a producer

    text = "graph @g(%x: f32[B, 4]) {\n  %a: f32[B, 4] = neg(%x)\n  %b: f32[B, 4] = exp(%a)\n  return b = %b\n}\n"
    try:
        with pytest.raises(passes.PassError, match="after pass 'test-breaker': node %b \\(exp\\)"):
            passes.run_pipeline(parse(text), [Breaker()])
    finally:
        del passes.PASSES["test-breaker"]


def test_lower_linear_recurrence_golden():
    before = """graph @g(%z: f32[B, T, 4], %gz: f32[B, T, 4], %gamma: f32[B, T, 4], %h0: f32[B, 4]) {
  param @w: f32[1, 4, 4] = zeros
  %h: f32[B, T, 4], %h_last: f32[B, 4] = gated_recurrence(%z, %gz, %gamma, %h0)
  %k: f32[B, T, 4], %k_last: f32[B, 4] = gated_recurrence(%z, %gz, %gamma, %h0, @w)
  return h = %h, h_last = %h_last, k = %k
}
"""
    after = """graph @g(%z: f32[B, T, 4], %gz: f32[B, T, 4], %gamma: f32[B, T, 4], %h0: f32[B, 4]) {
  param @w: f32[1, 4, 4] = zeros
  %h.log_gamma: f32[B, T, 4] = log(%gamma)
  %h.gate: f32[B, T, 4] = sigmoid(%gz)
  %h.drive: f32[B, T, 4] = mul(%z, %h.gate)
  %h: f32[B, T, 4], %h_last: f32[B, 4] = linear_scan(%h.log_gamma, %h.drive, %h0)
  %k: f32[B, T, 4], %k_last: f32[B, 4] = gated_recurrence(%z, %gz, %gamma, %h0, @w)
  return h = %h, h_last = %h_last, k = %k
}
"""
    assert run(before, "lower-linear-recurrence") == after


DECAY_PARAMS = """  param @w1: f32[2, 4] = zeros
  param @b1: f32[2] = zeros
  param @w2: f32[4, 2] = zeros
  param @b2: f32[4] = zeros
  param @w_g: f32[1, 4, 4] = zeros
"""
DECAY_ARGS = "%z, %z, @w1, @b1, @w2, @b2, @w1, @b1, @w2, @b2"


def test_fuse_decay_recurrence_golden():
    head = "graph @g(%z: f32[B, T, 4], %gz: f32[B, T, 4], %h0: f32[B, 4]) {\n" + DECAY_PARAMS
    before = (
        head
        + f"""  %gamma: f32[B, T, 4] = mdi_decay({DECAY_ARGS}) {{eps = 0.001}}
  %h: f32[B, T, 4], %h_last: f32[B, 4] = gated_recurrence(%z, %gz, %gamma, %h0, @w_g)
  %kept: f32[B, T, 4] = mdi_decay({DECAY_ARGS})
  %k: f32[B, T, 4], %k_last: f32[B, 4] = gated_recurrence(%z, %gz, %kept, %h0, @w_g)
  %s: f32[B, T, 4], %s_last: f32[B, 4] = gated_recurrence(%z, %gz, %kept, %h0)
  return h = %h, k = %k, s = %s
}}
"""
    )
    # %kept has two uses (the second recurrence has no W_g): it stays materialised.
    after = (
        head
        + f"""  %gamma.a: f32[B, T, 4], %gamma.c: f32[B, T, 4] = mdi_decay_logits({DECAY_ARGS})
  %h: f32[B, T, 4], %h_last: f32[B, 4] = decay_recurrence(%z, %gz, %gamma.a, %gamma.c, %h0, @w_g) {{eps = 0.001}}
  %kept: f32[B, T, 4] = mdi_decay({DECAY_ARGS})
  %k: f32[B, T, 4], %k_last: f32[B, 4] = gated_recurrence(%z, %gz, %kept, %h0, @w_g)
  %s: f32[B, T, 4], %s_last: f32[B, 4] = gated_recurrence(%z, %gz, %kept, %h0)
  return h = %h, k = %k, s = %s
}}
"""
    )
    assert run(before, "fuse-decay-recurrence") == after


@pytest.mark.parametrize(
    ("pipeline", "ops"),
    [
        ("fuse-decay-recurrence", ["mdi_decay_logits", "decay_recurrence"]),
        ("fuse-decay,fuse-decay-recurrence", ["mdi_decay_fused", "gated_recurrence"]),  # claimed once
    ],
)
def test_decay_fusions_keep_values_and_gradients(pipeline, ops):
    graph = parse(
        "graph @g(%z: f32[B, T, 4], %gz: f32[B, T, 4], %h0: f32[B, 4]) {\n"
        + DECAY_PARAMS
        + f"""  %gamma: f32[B, T, 4] = mdi_decay({DECAY_ARGS}) {{eps = 0.01}}
  %h: f32[B, T, 4], %h_last: f32[B, 4] = gated_recurrence(%z, %gz, %gamma, %h0, @w_g)
  return h = %h, h_last = %h_last
}}
"""
    )
    fused = passes.run_pipeline(graph, passes.lookup(pipeline)).graph
    assert [n.op for n in fused.nodes] == ops
    inputs = {n: torch.randn(2, 9, 4, dtype=torch.float64) * 3 for n in ("z", "gz")}
    inputs["h0"] = torch.randn(2, 4, dtype=torch.float64)
    shapes = {p.name: tuple(p.type.shape) for p in graph.params}
    params = {n: (torch.randn(s, dtype=torch.float64) * 2).requires_grad_() for n, s in shapes.items()}
    results = []
    for g in (graph, fused):
        outs = run_graph(g, inputs, params)
        total = (outs["h"].sin()).sum() + outs["h_last"].sum()
        results.append((outs["h"], torch.autograd.grad(total, list(params.values()))))
    torch.testing.assert_close(results[1][0], results[0][0])
    for f, p in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(f, p)


def test_fuse_decay_golden():
    head = (
        "graph @g(%z: f32[B, T, 4], %gz: f32[B, T, 4], %h0: f32[B, 4]) {\n"
        + DECAY_PARAMS
        + "  param @c1: f32[3, 4] = zeros\n  param @cb1: f32[3] = zeros\n  param @c2: f32[4, 3] = zeros\n"
    )
    body = """  %gamma: f32[B, T, 4] = mdi_decay({args}) {{eps = 0.001}}
  %other: f32[B, T, 4] = mdi_decay(%z, %z, @w1, @b1, @w2, @b2, @c1, @cb1, @c2, @b2)
  %h: f32[B, T, 4], %h_last: f32[B, 4] = gated_recurrence(%z, %gz, %gamma, %h0, @w_g)
  return h = %h, other = %other
}}
"""
    before = head + body.format(args=DECAY_ARGS)
    # the second decay's MLPs have bottlenecks 2 and 3: not the kernel's to take
    after = before.replace(f"mdi_decay({DECAY_ARGS})", f"mdi_decay_fused({DECAY_ARGS})")
    assert after != before and run(before, "fuse-decay") == after


def test_fuse_residual_norm_golden():
    before = """graph @g(%a: f32[B, 4], %b: f32[B, 4], %c: f32[B, 4]) {
  param @w: f32[4] = ones
  %x: f32[B, 4] = add(%a, %b)
  %y: f32[B, 4] = mul(%x, %c)
  %u: f32[B, 4] = rmsnorm(%x, @w) {eps = 1e-05}
  %v: f32[B, 4] = rmsnorm(%c, @w) {eps = 1e-05}
  return u = %u, y = %y, v = %v
}
"""
    after = """graph @g(%a: f32[B, 4], %b: f32[B, 4], %c: f32[B, 4]) {
  param @w: f32[4] = ones
  %x: f32[B, 4], %u: f32[B, 4] = add_rmsnorm(%a, %b, @w) {eps = 1e-05}
  %y: f32[B, 4] = mul(%x, %c)
  %v: f32[B, 4] = rmsnorm(%c, @w) {eps = 1e-05}
  return u = %u, y = %y, v = %v
}
"""
    assert run(before, "fuse-residual-norm") == after


def test_fuse_residual_epilogue_golden():
    # The query's result %m feeds the add only: the fused query takes the add's place, after
    # %h2, which is defined after the query. %y (a linear) keeps its add: addmm would copy the
    # residual first. %m2 is also an output, so its add stays.
    before = """graph @g(%h: f32[B, T, 4], %q: f32[B, T, 4], %kv: f32[B, T, 2], %mem: memory{heads=1, dim=2, block=2, ratio=2, slots=[2, 2]}) {
  param @w_o: f32[4, 4] = normal(0.02)
  param @beta: f32[2, 2] = zeros
  %m: f32[B, T, 4] = hds_query(%q, %kv, %kv, @beta, %mem) {heads = 2}
  %h2: f32[B, T, 4] = sigmoid(%h)
  %s: f32[B, T, 4] = add(%m, %h2)
  %y: f32[B, T, 4] = linear(%s, @w_o)
  %x1: f32[B, T, 4] = add(%h, %y)
  %m2: f32[B, T, 4] = hds_query(%x1, %kv, %kv, @beta, %mem) {heads = 2}
  %x2: f32[B, T, 4] = add(%x1, %m2)
  return x = %x2, m2 = %m2
}
"""  # noqa: E501
    after = """graph @g(%h: f32[B, T, 4], %q: f32[B, T, 4], %kv: f32[B, T, 2], %mem: memory{heads=1, dim=2, block=2, ratio=2, slots=[2, 2]}) {
  param @w_o: f32[4, 4] = normal(0.02)
  param @beta: f32[2, 2] = zeros
  %h2: f32[B, T, 4] = sigmoid(%h)
  %s: f32[B, T, 4] = hds_query(%q, %kv, %kv, @beta, %mem, %h2) {heads = 2}
  %y: f32[B, T, 4] = linear(%s, @w_o)
  %x1: f32[B, T, 4] = add(%h, %y)
  %m2: f32[B, T, 4] = hds_query(%x1, %kv, %kv, @beta, %mem) {heads = 2}
  %x2: f32[B, T, 4] = add(%x1, %m2)
  return x = %x2, m2 = %m2
}
"""  # noqa: E501
    assert run(before, "fuse-residual-epilogue") == after
    assert print_graph(parse(after)) == after


def test_fuse_residual_epilogue_leaves_a_bf16_memory_query_alone():
    # Its backward would take the residual off a bf16 sum to form delta (kernels/memory).
    graph = """graph @g(%h: bf16[B, T, 4], %q: bf16[B, T, 4], %kv: bf16[B, T, 2], %mem: memory{heads=1, dim=2, block=2, ratio=2, slots=[2, 2]}) {
  param @beta: bf16[2, 2] = zeros
  %m: bf16[B, T, 4] = hds_query(%q, %kv, %kv, @beta, %mem) {heads = 2}
  %hm: bf16[B, T, 4] = add(%h, %m)
  return hm = %hm
}
"""  # noqa: E501
    assert run(graph, "fuse-residual-epilogue") == graph


def test_fuse_elementwise_golden():
    # silu * up: one kernel. %s has two uses, so it stays and the chain after it reads it; %c
    # (clamp, with its attributes) folds into the add; a lone op stays as it is.
    before = """graph @g(%gate: f32[B, T, 8], %up: f32[B, T, 8], %x: f32[B, T, 8]) {
  %act: f32[B, T, 8] = silu(%gate)
  %hidden: f32[B, T, 8] = mul(%act, %up)
  %s: f32[B, T, 8] = sigmoid(%x)
  %t: f32[B, T, 8] = mul(%s, %x)
  %c: f32[B, T, 8] = clamp(%t) {max = 1.0, min = 0.0}
  %u: f32[B, T, 8] = add(%c, %s)
  %n: f32[B, T, 8] = neg(%u)
  %e: f32[B, T, 8] = exp(%x)
  return hidden = %hidden, n = %n, e = %e
}
"""
    after = """graph @g(%gate: f32[B, T, 8], %up: f32[B, T, 8], %x: f32[B, T, 8]) {
  %hidden: f32[B, T, 8] = pointwise(%gate, %up) {expr = "mul(silu(%0), %1)"}
  %s: f32[B, T, 8] = sigmoid(%x)
  %n: f32[B, T, 8] = pointwise(%s, %x) {expr = "neg(add(clamp(mul(%0, %1), min=0.0, max=1.0), %0))"}
  %e: f32[B, T, 8] = exp(%x)
  return hidden = %hidden, n = %n, e = %e
}
"""
    assert run(before, "fuse-elementwise") == after
    assert print_graph(parse(after)) == after


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ('"add(%0, %1)"', r"expr: expected to use inputs %0..%0 each, uses \[0, 1\]"),
        ('"tanh(%0)"', "expr: 'tanh' is not an elementwise op"),
        ('"clamp(%0, min=1.0)"', r"expr: clamp takes attributes \(min, max\), got \(min\)"),
    ],
)
def test_a_bad_pointwise_expression_is_a_one_line_error(expr, error):
    text = f"graph @g(%x: f32[B, 4]) {{\n  %y: f32[B, 4] = pointwise(%x) {{expr = {expr}}}\n  return y = %y\n}}\n"
    with pytest.raises(VerifyError, match=r"node %y \(pointwise\): " + error):
        passes.run_pipeline(parse(text), [])


def test_fuse_projections_golden():
    # %q/%k (one weight, split) and %g read %x: one GEMM; %o reads %y and stays.
    before = """graph @g(%x: f32[B, T, 4], %y: f32[B, T, 4]) {
  param @w_qk: f32[6, 4] = normal(0.02)
  param @w_g: f32[3, 4] = normal(0.02)
  param @w_o: f32[4, 4] = normal(0.02)
  %q: f32[B, T, 2], %k: f32[B, T, 4] = linear(%x, @w_qk) {splits = [2, 4]}
  %o: f32[B, T, 4] = linear(%y, @w_o)
  %g: f32[B, T, 3] = linear(%x, @w_g)
  return q = %q, k = %k, o = %o, g = %g
}
"""
    after = """graph @g(%x: f32[B, T, 4], %y: f32[B, T, 4]) {
  param @w_qk: f32[6, 4] = normal(0.02)
  param @w_g: f32[3, 4] = normal(0.02)
  param @w_o: f32[4, 4] = normal(0.02)
  %q: f32[B, T, 2], %k: f32[B, T, 4], %g: f32[B, T, 3] = linear(%x, @w_qk, @w_g) {splits = [2, 4, 3]}
  %o: f32[B, T, 4] = linear(%y, @w_o)
  return q = %q, k = %k, o = %o, g = %g
}
"""
    assert run(before, "fuse-projections") == after


SWIGLU = """graph @g(%u: f32[B, T, 4]) {{
  param @w_gate: f32[8, 4] = normal(0.02)
  param @w_up: f32[8, 4] = normal(0.02)
  %gate: f32[B, T, 8] = linear(%u, @w_gate)
  %up: f32[B, T, 8] = linear(%u, @w_up)
  %act: f32[B, T, 8] = silu(%gate)
  %hidden: f32[B, T, 8] = mul({lhs}, {rhs})
  return hidden = %hidden{extra}
}}
"""


@pytest.mark.parametrize(("lhs", "rhs"), [("%act", "%up"), ("%up", "%act")])
def test_fuse_epilogue_golden(lhs, rhs):
    after = """graph @g(%u: f32[B, T, 4]) {
  param @w_gate: f32[8, 4] = normal(0.02)
  param @w_up: f32[8, 4] = normal(0.02)
  %hidden: f32[B, T, 8] = linear_swiglu(%u, @w_gate, @w_up)
  return hidden = %hidden
}
"""
    assert run(SWIGLU.format(lhs=lhs, rhs=rhs, extra=""), "fuse-projections,fuse-epilogue") == after


def test_fuse_norm_prologue_golden():
    before = """graph @g(%a: f32[B, T, 4], %b: f32[B, T, 4]) {
  param @w_norm: f32[4] = ones
  param @w_gate: f32[8, 4] = normal(0.02)
  param @w_up: f32[8, 4] = normal(0.02)
  %x: f32[B, T, 4] = add(%a, %b)
  %u: f32[B, T, 4] = rmsnorm(%x, @w_norm) {eps = 1e-05}
  %v: f32[B, T, 4] = rmsnorm(%b, @w_norm)
  %hidden: f32[B, T, 8] = linear_swiglu(%u, @w_gate, @w_up)
  %other: f32[B, T, 8] = linear_swiglu(%v, @w_gate, @w_up)
  return hidden = %hidden, x = %x, other = %other, v = %v
}
"""
    # %v has a second use (an output): it stays. The add before %u gives the norm's statistics
    # (add_rstd), so fuse-residual-norm finds no norm after it any more.
    after = """graph @g(%a: f32[B, T, 4], %b: f32[B, T, 4]) {
  param @w_norm: f32[4] = ones
  param @w_gate: f32[8, 4] = normal(0.02)
  param @w_up: f32[8, 4] = normal(0.02)
  %x: f32[B, T, 4], %u.rstd: f32[B, T] = add_rstd(%a, %b) {eps = 1e-05}
  %v: f32[B, T, 4] = rmsnorm(%b, @w_norm)
  %hidden: f32[B, T, 8] = rms_linear_swiglu(%x, @w_norm, @w_gate, @w_up, %u.rstd) {eps = 1e-05}
  %other: f32[B, T, 8] = linear_swiglu(%v, @w_gate, @w_up)
  return hidden = %hidden, x = %x, other = %other, v = %v
}
"""
    assert run(before, "fuse-norm-prologue,fuse-residual-norm") == after


def _logits_and_grads(graph, pipelines):
    """For each pipeline (None: the default), the tiny model's logits on fixed tokens and the
    gradients of its loss (cross-entropy, plus the auxiliary loss where there is one)."""
    import torch.nn.functional as F

    import runtime

    tokens = torch.randint(0, 2048, (2, 37))
    outputs = []
    for pipeline in pipelines:
        model = runtime.compile(graph, passes=pipeline, seed=3)
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out[0].flatten(0, 1), tokens[:, 1:].flatten())
        if out.aux is not None:
            loss = loss + out.aux
        outputs.append((out[0], torch.autograd.grad(loss, list(model.parameters()))))
    return outputs


def _opt_in(decay: bool, extra: list[str]) -> list[str]:
    """The default pipeline with fuse-decay for fuse-decay-recurrence (`decay`) and the passes
    `extra` added after fuse-epilogue, in that order."""
    names = [p.name for p in passes.default_pipeline()]
    if decay:
        names = ["fuse-decay" if n == "fuse-decay-recurrence" else n for n in names]
    at = names.index("fuse-epilogue") + 1
    return names[:at] + extra + names[at:]


def test_fuse_norm_prologue_takes_a_projection():
    # The norm feeding the two-weight projection goes into it (rms_linear), its statistics from
    # an rms_stats where no add makes x; a norm whose output is also returned stays.
    graph = """graph @g(%x: f32[B, T, 4]) {
  param @w_norm: f32[4] = ones
  param @w_q: f32[6, 4] = normal(0.02)
  param @w_k: f32[2, 4] = normal(0.02)
  %u: f32[B, T, 4] = rmsnorm(%x, @w_norm)
  %q: f32[B, T, 6], %k: f32[B, T, 2] = linear(%u, @w_q, @w_k)
  return q = %q, k = %k
}
"""
    after = """graph @g(%x: f32[B, T, 4]) {
  param @w_norm: f32[4] = ones
  param @w_q: f32[6, 4] = normal(0.02)
  param @w_k: f32[2, 4] = normal(0.02)
  %u.rstd: f32[B, T] = rms_stats(%x)
  %q: f32[B, T, 6], %k: f32[B, T, 2] = rms_linear(%x, @w_norm, %u.rstd, @w_q, @w_k)
  return q = %q, k = %k
}
"""
    assert run(graph, "fuse-norm-prologue") == after
    assert print_graph(parse(after)) == after
    kept = """graph @g(%x: f32[B, T, 4]) {
  param @w_norm: f32[4] = ones
  param @w_q: f32[6, 4] = normal(0.02)
  %u: f32[B, T, 4] = rmsnorm(%x, @w_norm)
  %q: f32[B, T, 6] = linear(%u, @w_q)
  return q = %q, u = %u
}
"""
    assert run(kept, "fuse-norm-prologue") == kept


@pytest.mark.parametrize(
    ("names", "counts"),
    [
        (
            _opt_in(True, ["fuse-norm-prologue"]),
            {"rms_linear_swiglu": 2, "mdi_decay_fused": 2, "add_rstd": 3, "rms_stats": 1, "rms_linear": 2},
        ),
        (
            _opt_in(False, ["fuse-linear-residual", "fuse-norm-prologue"]),
            {"linear_residual": 4, "rms_linear_swiglu": 2, "rms_linear": 2, "rms_stats": 4, "rmsnorm": 1},
        ),
    ],
    ids=["decay+norm", "linear-residual+norm"],
)
def test_opt_in_fusions_keep_the_model_numerics(names, counts, monkeypatch):
    """The opt-in pipelines that reach 2x fewer counted bytes: logits and every gradient equal
    the unfused model's (CPU: the references). The runtime's size rules would send the tiny
    model's few rows to the unfused ops (runtime/opset.py); forced here onto the fused ones, so
    that their wiring (add_rstd's rstd, the concatenated and split projections) runs."""
    from runtime import opset

    monkeypatch.setattr(opset, "_interleave_pays", lambda *a, **k: True)
    monkeypatch.setattr(opset, "_fold_pays", lambda *a: True)
    monkeypatch.setattr(opset, "_many_rows", lambda *a: True)

    graph = models.build(models.load_config("tiny"))
    fused = passes.run_pipeline(graph, passes.lookup(names)).graph
    ops = [n.op for n in fused.nodes]
    assert {op: ops.count(op) for op in counts} == counts
    (plain, plain_grads), (ours, our_grads) = _logits_and_grads(graph, (["infer-shapes"], names))
    torch.testing.assert_close(ours, plain)
    for f, p in zip(our_grads, plain_grads, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6)


def test_fuse_linear_residual_golden():
    # %y feeds the add only: the GEMM takes the residual. %z is also an output, so its add
    # stays; the bf16 projection stays with cuBLAS.
    before = """graph @g(%h: f32[B, T, 4], %x: f32[B, T, 4], %hb: bf16[B, T, 4], %xb: bf16[B, T, 4]) {
  param @w: f32[4, 4] = normal(0.02)
  param @wb: bf16[4, 4] = normal(0.02)
  %y: f32[B, T, 4] = linear(%h, @w)
  %s: f32[B, T, 4] = add(%x, %y)
  %z: f32[B, T, 4] = linear(%s, @w)
  %s2: f32[B, T, 4] = add(%z, %s)
  %yb: bf16[B, T, 4] = linear(%hb, @wb)
  %sb: bf16[B, T, 4] = add(%xb, %yb)
  return s = %s2, z = %z, sb = %sb
}
"""
    after = """graph @g(%h: f32[B, T, 4], %x: f32[B, T, 4], %hb: bf16[B, T, 4], %xb: bf16[B, T, 4]) {
  param @w: f32[4, 4] = normal(0.02)
  param @wb: bf16[4, 4] = normal(0.02)
  %s: f32[B, T, 4] = linear_residual(%h, @w, %x)
  %z: f32[B, T, 4] = linear(%s, @w)
  %s2: f32[B, T, 4] = add(%z, %s)
  %yb: bf16[B, T, 4] = linear(%hb, @wb)
  %sb: bf16[B, T, 4] = add(%xb, %yb)
  return s = %s2, z = %z, sb = %sb
}
"""
    assert run(before, "fuse-linear-residual") == after
    assert print_graph(parse(after)) == after


@pytest.mark.parametrize("extra", [", gate = %gate", ", act = %act", ", up = %up"])
def test_fuse_epilogue_leaves_a_chain_whose_parts_are_used_elsewhere(extra):
    graph = SWIGLU.format(lhs="%act", rhs="%up", extra=extra)
    out = run(graph, "fuse-projections,fuse-epilogue")
    assert "linear_swiglu" not in out and "silu(%gate)" in out


def test_fuse_epilogue_leaves_bf16_to_cublas():
    graph = SWIGLU.format(lhs="%act", rhs="%up", extra="").replace("f32", "bf16")
    out = run(graph, "fuse-projections,fuse-epilogue")
    assert "linear_swiglu" not in out and "silu(%gate)" in out


@pytest.mark.parametrize("variant", [{}, {"recurrence": "linear"}, {"moe": {"experts": 2, "top_k": 1}, "uboo": True}])
def test_default_pipeline_keeps_the_model_numerics(variant):
    """Fused and lowered model == the model as written: logits and every gradient."""

    graph = models.build(models.load_config("tiny", variant))
    result = passes.run_pipeline(graph, passes.default_pipeline())
    ops = [n.op for n in result.graph.nodes]
    # h + m goes into the memory query's epilogue; each residual add into the GEMM epilogue of the
    # projection before it, each norm into the GEMM after it (statistics: rms_stats); the final
    # norm before the head stays. With MoE the FFN is no GEMM: its norm and add stay together.
    if "moe" not in variant:
        assert [ops.count(op) for op in ("linear_residual", "rms_stats", "rms_linear", "rms_linear_swiglu")] == [
            4,
            4,
            2,
            2,
        ]
        assert "add_rmsnorm" not in ops and ops.count("rmsnorm") == 1
    assert all(len(n.inputs) == 6 for n in result.graph.nodes if n.op == "hds_query")
    assert "add" not in ops or variant.get("uboo")  # the auxiliary loss has adds of its own
    assert ("linear_scan" in ops) == (variant.get("recurrence") == "linear")
    assert "gated_recurrence" not in ops  # lowered to a scan, or fused with its decay
    assert ("decay_recurrence" in ops) == (variant.get("recurrence") != "linear")

    (plain, plain_grads), (fused, fused_grads) = _logits_and_grads(graph, (["infer-shapes"], None))
    torch.testing.assert_close(fused, plain)
    for f, p in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6)


def test_fuse_elementwise_on_the_model_keeps_its_numerics():
    """With fuse-elementwise in place of fuse-epilogue, the SwiGLU's silu * up becomes one
    pointwise node per block; on CPU it runs the plain ops, so logits and gradients equal those of
    the same pipeline without it exactly."""

    graph = models.build(models.load_config("tiny"))
    plain = [p.name for p in passes.default_pipeline() if p.name != "fuse-epilogue"]
    pipeline = [*plain]
    pipeline.insert(pipeline.index("dce"), "fuse-elementwise")
    fused = passes.run_pipeline(graph, passes.lookup(pipeline)).graph
    assert [n.attr["expr"] for n in fused.nodes if n.op == "pointwise"] == ["mul(silu(%0), %1)"] * 2
    outputs = _logits_and_grads(graph, (plain, pipeline))
    assert torch.equal(outputs[0][0], outputs[1][0])
    for a, b in zip(outputs[0][1], outputs[1][1], strict=True):
        assert torch.equal(a, b)


UNARY = ["sigmoid", "neg", "silu", "gelu", "exp"]
BINARY = ["add", "mul", "sub"]


@st.composite
def random_graphs(draw):
    """Small random DAGs of elementwise ops, norms and linears, with deliberate duplicates, dead
    branches, projections of one input and SwiGLU chains (whose parts other ops may also use)."""
    b = Builder("g")
    pool = [b.input("x", f32("B", 6)), b.input("y", f32("B", 6))]
    norm = b.param("norm", (6,), "ones")
    weights = [b.param(f"w{i}", (6, 6)) for i in range(3)]
    for _ in range(draw(st.integers(2, 12))):
        kind = draw(st.integers(0, 6))
        if kind == 5:  # a SwiGLU chain: fusable once its two projections are one linear
            x = draw(st.sampled_from(pool))
            gate, up = (b.linear(x, draw(st.sampled_from(weights))) for _ in range(2))
            act = b.silu(gate)
            pool += [gate, up, act, b.mul(act, up) if draw(st.booleans()) else b.mul(up, act)]
            continue
        if kind == 0:  # a norm, fusable when its input comes from an add
            op, args = "rmsnorm", [draw(st.sampled_from(pool)), norm]
        elif kind == 4:  # a projection: several of one input are fuse-projections' to merge
            op, args = "linear", [draw(st.sampled_from(pool)), draw(st.sampled_from(weights))]
        elif kind in (1, 2):
            op = draw(st.sampled_from(UNARY))
            args = [draw(st.sampled_from(pool))]
        else:
            op = draw(st.sampled_from(BINARY))
            args = [draw(st.sampled_from(pool)), draw(st.sampled_from(pool))]
        for _ in range(draw(st.integers(1, 2))):  # a second copy is a CSE candidate
            pool.append(b.op(op, *args))
    for i, ref in enumerate(draw(st.lists(st.sampled_from(pool[2:]), min_size=1, max_size=3, unique=True))):
        b.output(f"out{i}", ref)
    return b.build()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_fusions_cse_and_dce_preserve_values_and_gradients(graph):
    def evaluate(g):
        x = torch.linspace(-1, 1, 12, dtype=torch.float64).view(2, 6).requires_grad_()
        y = torch.linspace(0.5, -0.7, 12, dtype=torch.float64).view(2, 6).requires_grad_()
        params = {"norm": torch.linspace(0.5, 1.5, 6, dtype=torch.float64)}
        params.update({f"w{i}": torch.linspace(-1, 1, 36, dtype=torch.float64).view(6, 6).roll(i, 0) for i in range(3)})
        outs = run_graph(g, {"x": x, "y": y}, params)
        total = sum((o.tanh() * (i + 1)).sum() for i, o in enumerate(outs.values()))
        gx, gy = torch.autograd.grad(total, (x, y), allow_unused=True)
        return outs, gx, gy

    pipeline = (
        "cse,fuse-projections,fuse-epilogue,fuse-linear-residual,fuse-norm-prologue,fuse-residual-epilogue,"
        "fuse-residual-norm,"
        "fuse-elementwise,dce"
    )
    optimized = passes.run_pipeline(graph, passes.lookup(pipeline)).graph
    assert len(optimized.nodes) <= len(graph.nodes)
    before, after = evaluate(graph), evaluate(optimized)
    for name in before[0]:
        torch.testing.assert_close(after[0][name], before[0][name])
    for g_before, g_after in zip(before[1:], after[1:], strict=True):
        if g_before is None:
            assert g_after is None
        else:
            torch.testing.assert_close(g_after, g_before)


def test_verify_error_is_raised_for_bad_input_graph():
    with pytest.raises(VerifyError):
        passes.run_pipeline(parse("graph @g(%x: f32[B]) {\n  return y = %q\n}\n"), [])


def test_select_kernels_golden():
    before = """graph @g(%la: f32[B, T, 8], %x: f32[B, T, 8], %h0: f32[B, 8]) {
  param @w: f32[8, 8] = normal(0.02)
  %b: f32[B, T, 8] = linear(%x, @w)
  %h: f32[B, T, 8], %last: f32[B, 8] = linear_scan(%la, %b, %h0)
  %y: f32[B, T, 8] = sigmoid(%h)
  return y = %y, last = %last
}
"""
    after = """graph @g(%la: f32[B, T, 8], %x: f32[B, T, 8], %h0: f32[B, 8]) {
  param @w: f32[8, 8] = normal(0.02)
  %b: f32[B, T, 8] = linear(%x, @w) {kernel = "cuda: cublas; cpu: reference; onnx: reference"}
  %h: f32[B, T, 8], %last: f32[B, 8] = linear_scan(%la, %b, %h0) {kernel = "cuda: triton:mmrec::linear_scan_fwd/_bwd; cpu: reference; onnx: reference, unrolled over T"}
  %y: f32[B, T, 8] = sigmoid(%h) {kernel = "cuda: torch; cpu: reference; onnx: reference"}
  return y = %y, last = %last
}
"""  # noqa: E501
    assert run(before, "select-kernels") == after
    assert print_graph(parse(after)) == after  # the annotated IR parses back and verifies


def test_select_kernels_names_registered_ops_for_every_op():
    import kernels  # noqa: F401 (registers torch.ops.mmrec.*)
    from mmrec_ir import OPS
    from passes.select_kernels import CUDA_KERNELS, ONNX_LOWERINGS

    assert set(CUDA_KERNELS) <= set(OPS) and set(ONNX_LOWERINGS) <= set(OPS)
    for op, claim in CUDA_KERNELS.items():
        for name, pair in re.findall(r"triton:mmrec::(\w+?)(_fwd/_bwd)?\b", claim):
            for target in (name + "_fwd", name + "_bwd") if pair else (name,):
                assert hasattr(torch.ops.mmrec, target), f"{op}: torch.ops.mmrec.{target} is not registered"


def test_annotations_do_not_reach_the_ops():
    # The generated forward must not pass `kernel` to an op implementation.
    graph = passes.run_pipeline(models.build(models.load_config("tiny")), passes.default_pipeline()).graph
    from mmrec_ir import print_python

    assert "kernel=" not in print_python(graph)


@pytest.mark.parametrize("tokens", [1, 500])  # decoding runs one GEMM per weight, segments one GEMM
def test_a_fused_linear_computes_the_separate_products(tokens):
    from runtime.opset import ReferenceOps

    x, w_qk, w_g = torch.randn(tokens, 4, dtype=torch.float64), torch.randn(6, 4).double(), torch.randn(3, 4).double()
    q, k, g = ReferenceOps(training=False).linear(x, w_qk, w_g, splits=(2, 4, 3))
    qk = x @ w_qk.T
    for got, want in ((q, qk[:, :2]), (k, qk[:, 2:]), (g, x @ w_g.T)):
        torch.testing.assert_close(got, want)
