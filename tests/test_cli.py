import importlib.util
from pydoc_data.topics import topics

import pytest

from mmrec_ir import parse, verify
from runtime import train as train_mod
from runtime.cli import main

SMALL = """vocab_size: 400
d_model: 32
n_layers: 1
n_heads: 2
ffn_hidden: 64
memory: {heads: 1, block: 8, ratio: 2, slots: [4, 2]}
train: {batch_size: 2, seq_len: 16, steps: 4, warmup: 1, eval_every: 4, eval_tokens: 256, ckpt_every: 2}
"""


@pytest.fixture
def small(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL)
    (tmp_path / "text.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, fragment):
    assert code == 2
    assert err.startswith("mmrec: error: ") and err.count("\n") == 1, err
    assert fragment in err, err


def test_inspect_prints_ir_that_parses_back(capsys):
    code, out, _ = run(capsys, "inspect", "--config", "tiny")
    assert code == 0
    text, summary = out.rsplit("}\n", 1)
    verify(parse(text + "}\n"))
    assert "parameters" in summary


def test_inspect_print_after_all_and_chosen_passes(capsys):
    code, out, _ = run(capsys, "inspect", "--config", "tiny", "--print-after-all", "--passes", "cse,dce")
    assert code == 0
    assert "input IR" in out and "IR after cse" in out and "IR after dce" in out
    code, out, _ = run(capsys, "inspect", "--config", "tiny", "--python")
    assert "def mmrec_lm(" in out and "ops.decay_recurrence(" in out


def test_inspect_reads_edited_ir(capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", "--config", "tiny", "--passes", "")
    (tmp_path / "g.mlir").write_text(out.rsplit("}\n", 1)[0] + "}\n")
    code, out2, _ = run(capsys, "inspect", "--ir", str(tmp_path / "g.mlir"))
    assert code == 0 and "graph @mmrec_lm" in out2


def test_train_then_generate(capsys, small):
    out_dir = small / "run"
    code, out, _ = run(
        capsys,
        "train",
        "--config",
        str(small / "small.yaml"),
        "--data",
        str(small / "text.txt"),
        "--out",
        str(out_dir),
        "--quiet",
    )
    assert code == 0, out
    assert "done: step 4" in out and (out_dir / "ckpt.pt").exists()
    code, out, _ = run(capsys, "generate", "--ckpt", str(out_dir), "--prompt", "The ", "--tokens", "10")
    assert code == 0 and out.startswith("The ") and len(out) > len("The \n")
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        code, out, _ = run(capsys, "export", "--ckpt", str(out_dir), "--batch", "2")  # beside the checkpoint
        assert code == 0 and (out_dir / "model.onnx").exists() and "checked with onnxruntime" in out, out
        error = float(out.rsplit("= ", 1)[1])
        assert error < 1e-4, out
    if not importlib.util.find_spec("tensorrt"):  # none of our machines has it
        code, _, err = run(capsys, "export", "--ckpt", str(out_dir), "--format", "tensorrt")
        one_line_error(code, err, "TensorRT export needs the tensorrt package and an NVIDIA GPU")
    code, _, err = run(capsys, "export", "--ckpt", str(out_dir), "--format", "tensorrt", "--max-batch", "0")
    one_line_error(code, err, "--max-batch must be at least 1, got 0")
    code, _, err = run(capsys, "export", "--ckpt", str(out_dir), "--steps", "0")
    one_line_error(code, err, "--batch and --steps must be at least 1")
    code, _, err = run(
        capsys,
        "train",
        "--config",
        str(small / "small.yaml"),
        "--data",
        str(small / "text.txt"),
        "--out",
        str(out_dir),
        "--quiet",
    )
    one_line_error(code, err, "a checkpoint is already there; pass --resume")


def test_bad_inputs_are_one_line_errors(capsys, small, tmp_path):
    (tmp_path / "broken.yaml").write_text("d_model: [\n")
    one_line_error(*run(capsys, "train", "--config", str(tmp_path / "broken.yaml"))[::2], "not valid YAML")
    one_line_error(*run(capsys, "train", "--config", "nope")[::2], "config 'nope': no such file")
    one_line_error(*run(capsys, "generate", "--ckpt", str(tmp_path / "none.pt"))[::2], "none.pt: no such file")
    one_line_error(*run(capsys, "generate", "--prompt", "")[::2], "--prompt is empty")
    one_line_error(
        *run(
            capsys,
            "train",
            "--config",
            str(small / "small.yaml"),
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "r"),
        )[::2],
        "--data",
    )
    one_line_error(*run(capsys, "inspect", "--passes", "cse,bogus")[::2], "unknown pass 'bogus'")
    one_line_error(*run(capsys, "export", "--ckpt", str(tmp_path / "none.pt"))[::2], "none.pt: no such file")


def test_nan_loss_exits_nonzero_with_one_line(capsys, small, monkeypatch):
    real = train_mod.segment_loss

    def poisoned(*args):
        total, lm, state = real(*args)
        return total * float("nan"), lm, state

    monkeypatch.setattr(train_mod, "segment_loss", poisoned)
    code, _, err = run(
        capsys,
        "train",
        "--config",
        str(small / "small.yaml"),
        "--data",
        str(small / "text.txt"),
        "--out",
        str(small / "nan"),
        "--quiet",
    )
    one_line_error(code, err, "step 1: loss is nan; training stopped, no checkpoint had been written yet")


def test_inspect_fusion_report(capsys):
    code, out, _ = run(capsys, "inspect", "--config", "tiny", "--report")
    assert code == 0
    assert "// fusion report" in out and "// layer1" in out and "// total" in out


def test_inspect_dump_and_svg(capsys, tmp_path):
    import xml.etree.ElementTree as ET

    code, out, _ = run(
        capsys, "inspect", "--config", "tiny", "--dump", str(tmp_path / "stages"), "--svg", str(tmp_path / "g.svg")
    )
    assert code == 0 and "wrote 15 files" in out
    names = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert names == [
        "00-input.mlir",
        "01-infer-shapes.mlir",
        "02-lower-linear-recurrence.mlir",
        "03-fuse-decay-recurrence.mlir",
        "04-cse.mlir",
        "05-fuse-projections.mlir",
        "06-fuse-epilogue.mlir",
        "07-fuse-linear-residual.mlir",
        "08-fuse-norm-prologue.mlir",
        "09-fuse-residual-epilogue.mlir",
        "10-fuse-residual-norm.mlir",
        "11-dce.mlir",
        "12-select-kernels.mlir",
        "forward.py",
        "passes.txt",
    ]
    for stage in names[:13]:
        verify(parse((tmp_path / "stages" / stage).read_text()))
    for svg, recurrence in (("g.svg", "decay_recurrence"), ("g.before.svg", "gated_recurrence")):
        root = ET.parse(tmp_path / svg).getroot()
        assert root.tag.endswith("svg")
        assert recurrence in (tmp_path / svg).read_text()
