"""ONNX export of the inference step (runtime/export.py), run back with onnxruntime on CPU."""

import numpy as np
import pytest
import torch

import models
import runtime
from runtime.export import ExportError, export_aoti, export_onnx, export_tensorrt

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def tiny(variant=None):
    torch.manual_seed(0)
    return runtime.compile(models.build(models.load_config("tiny", variant or {})), mode="infer")


def test_decoding_through_the_onnx_step_equals_the_model_over_the_text(tmp_path):
    """One token a call, the state fed back from the file's outputs, past a memory block's end:
    every step's logits equal the PyTorch model's over the whole text (SPEC §6). The file takes
    any batch (traced with 2 rows, run with 3)."""
    model = tiny()
    result = export_onnx(model, tmp_path / "step.onnx", steps=1)
    assert result.batch is None and result.max_abs_error is not None and result.max_abs_error < 1e-4
    import onnx

    first = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param and first[1].dim_value == 1  # [batch, 1]
    tokens = torch.randint(0, model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)[0]
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    flat = model.initial_state(3).state_dict()
    state = {name: flat[name].numpy() for name in result.inputs[1:]}
    for t in range(tokens.shape[1]):
        logits, *nxt = session.run(None, {"tokens": tokens[:, t : t + 1].numpy(), **state})
        np.testing.assert_allclose(logits[:, 0], expected[:, t].numpy(), rtol=1e-4, atol=1e-4, err_msg=f"token {t}")
        state = dict(zip(result.inputs[1:], nxt, strict=True))
    assert state["mem.0.pos"].tolist() == [20, 20, 20]


@pytest.mark.parametrize("variant", [{"recurrence": "linear"}, {"moe": {"experts": 2, "top_k": 1}, "uboo": True}])
def test_a_prompt_chunk_exports_for_each_model_variant(tmp_path, variant):
    """Five tokens a call (the recurrences unrolled) for a fixed batch of one, from a state with
    history, checked by export_onnx itself against the PyTorch model; no custom operator in the
    file. (MoE and UBOO: their auxiliary loss, a training output, is left out.)"""
    import onnx

    result = export_onnx(tiny(variant), tmp_path / "chunk.onnx", batch=1, steps=5)
    assert result.batch == 1 and result.max_abs_error is not None and result.max_abs_error < 1e-4
    graph = onnx.load(str(result.path)).graph
    assert {op.domain for op in graph.node} <= {"", "ai.onnx"}
    assert [i.name for i in graph.input] == result.inputs and graph.output[1].name == result.inputs[1] + ".next"


def test_the_tensorrt_bound_onnx_file_has_no_scatter_add(tmp_path):
    """What export_tensorrt hands TensorRT's parser: the memory write's slot sums as one-hot
    MatMuls, not ScatterND with reduction="add" (which that parser rejects), and still the
    model's numbers (checked by export_onnx with onnxruntime). The sums themselves, over many
    blocks: tests/kernels/test_hds.py."""
    import onnx

    def scatter_adds(path):
        graph = onnx.load(str(path)).graph
        return [n for n in graph.node if n.op_type.startswith("Scatter") and any(
            a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)]  # fmt: skip

    plain = export_onnx(tiny(), tmp_path / "plain.onnx", batch=1, steps=2)
    hot = export_onnx(tiny(), tmp_path / "hot.onnx", batch=1, steps=2, one_hot_sums=True)
    assert scatter_adds(plain.path), "the plain export no longer scatters: this test checks nothing"
    assert not scatter_adds(hot.path)
    assert hot.max_abs_error is not None and hot.max_abs_error < 1e-4


def test_export_refuses_empty_shapes(tmp_path):
    for shape in ({"batch": 0}, {"steps": 0}):
        with pytest.raises(ExportError, match="batch and steps must be at least 1"):
            export_onnx(tiny(), tmp_path / "x.onnx", **shape)
    assert not (tmp_path / "x.onnx").exists()


def test_aotinductor_package_runs_like_the_model(tmp_path):
    """The same step compiled ahead of time for the CPU (any batch), loaded back and checked
    by export_aoti at 1 and 3 rows; the package also decodes a token for 2 rows here."""
    model = tiny()
    result = export_aoti(model, tmp_path)
    assert result.path == tmp_path / "model.pt2" and result.path.exists()
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4
    runner = torch._inductor.aoti_load_package(str(result.path))
    tokens = torch.tensor([[3], [5]])
    flat = model.initial_state(2).state_dict()
    logits, *_ = runner(tokens, *(flat[k] for k in result.inputs[1:]))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tokens)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT builds for a GPU: needs CUDA")
def test_tensorrt_engine_runs_like_the_model(tmp_path):
    """The ONNX step built into a TensorRT engine (any batch up to 4), checked by export_tensorrt
    on the GPU at 1 and 3 rows. Skipped where TensorRT is not installed (every machine we have)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt)")
    result = export_tensorrt(tiny(), tmp_path, max_batch=4)
    assert result.path == tmp_path / "model.engine" and result.path.exists()
    assert (tmp_path / "model.onnx").exists()
    assert result.max_abs_error is not None and result.max_abs_error < 1e-3
    assert result.checked_with.startswith("TensorRT ")


def test_tensorrt_export_says_what_it_needs(tmp_path, monkeypatch):
    """Without the tensorrt package (or, with it, without a GPU) a one-line reason, and no file."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed
    with pytest.raises(ExportError, match="needs the tensorrt package and an NVIDIA GPU"):
        export_tensorrt(tiny(), tmp_path)
    assert not list(tmp_path.iterdir())
