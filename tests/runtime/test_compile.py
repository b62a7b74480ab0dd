"""The whole compiled model under torch.compile: one graph, no breaks, same numbers."""

import torch
import torch.nn.functional as F

from tests.runtime.helpers import tiny_model


def test_whole_model_has_no_graph_breaks_with_and_without_state():
    model = tiny_model().eval()
    tokens = torch.randint(0, model.vocab_size, (2, 40))
    explanation = torch._dynamo.explain(model)(tokens)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    _, state = model(tokens)
    explanation = torch._dynamo.explain(model)(tokens, state)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_compile_keeps_every_stage_and_the_kernel_list():
    import models
    import passes
    import runtime

    model = runtime.compile(models.build(models.load_config("tiny")), mode="infer")
    names = [p.name for p in passes.default_pipeline()]
    assert model.passes_run == names and [s.pass_name for s in model.stages] == ["input", *names]
    assert not model.training
    claims = {op: claim for _, op, claim in model.kernels}
    assert len(model.kernels) == len(model.graph.nodes)
    assert claims["decay_recurrence"].startswith("cuda: triton:mmrec::decay_recurrence_fwd/_bwd; cpu: reference")
    assert claims["hds_query"].endswith("onnx: reference: gathers of the rings, masked softmax, matmuls")
    unselected = runtime.compile(models.build(models.load_config("tiny")), passes=["infer-shapes", "cse"])
    assert unselected.kernels == [] and unselected.passes_run == ["infer-shapes", "cse"]


def test_fullgraph_training_step_matches_eager():
    model = tiny_model("moe-uboo").train()
    tokens = torch.randint(0, model.vocab_size, (2, 41))
    _, state = model(tokens[:, :8])
    state = state.detach()

    def step(inputs, targets, state):
        out = model(inputs, state)
        return F.cross_entropy(out[0].flatten(0, 1), targets.flatten()) + out.aux

    eager = step(tokens[:, :-1], tokens[:, 1:], state)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(tokens[:, :-1], tokens[:, 1:], state)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
