"""ONNX export of a compiled model's inference step: tokens and the state in, logits and the next
state out (SPEC §6), for serving with any ONNX runtime.

The exported graph is the model's forward over `steps` tokens (1: one decoding step; more: a
prompt chunk) for any batch (or one fixed batch), with every state tensor an input and its
successor an output,
named `<state key>` and `<state key>.next` (the keys of `State.state_dict()`, e.g. `h.0`,
`mem.0.keys.1`, `mem.0.pos`). A training-only output (the auxiliary loss of MoE and UBOO) is
left out, and the ops that only feed it with it. Each MM-Rec op is lowered as its plain-PyTorch reference
(`kernels.library.tracing_references`): torch.export traces the reference's tensor ops and
torch.onnx turns them into standard ONNX operators, so no custom operator is needed to run the
file. The recurrences' references step through time, so their loops are unrolled `steps` times;
the memory read is gathers, a masked softmax and matmuls; the memory write is block sums by
index_add (one-hot matmuls for TensorRT: `one_hot_sums`) and the rings rebuilt by gathers
(select-kernels records each op's lowering on its node).

The op set is the runtime's without its size rules (`ReferenceOps(size_rules=False)`), which
pick a kernel by the row count; an exported graph has no kernels to pick, and a branch on the
row count would fix the batch.

After writing the file, `export_onnx` runs it with onnxruntime where installed, on random tokens
and a state advanced by a few steps (for a dynamic batch, at two batch sizes other than the
traced one), and compares logits and next state with the PyTorch model; a difference above
TOLERANCE is an error.

`export_tensorrt` builds a TensorRT engine from that ONNX file with TensorRT's own ONNX parser
(an optimization profile of 1 to `max_batch` rows for a dynamic batch; fp32 without TF32, so the
same tolerance holds) and checks it the same way on the GPU. It needs the `tensorrt` package and
an NVIDIA GPU, which none of our machines has: it is written against TensorRT 10's Python API
and has not been run (its test skips where TensorRT is missing).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kernels.library import tracing_references
from kernels.memory import reference as memory_reference

from .module import CompiledModel
from .opset import ReferenceOps
from .state import FORMAT_VERSION, State

TOLERANCE = 1e-3  # max |onnxruntime - PyTorch| accepted (fp32; about 1e-6 measured on the tiny config)


class ExportError(ValueError):
    """The model, its arguments or the environment do not allow the export."""


@dataclass
class ExportResult:
    path: Path
    batch: int | None  # None: any batch size (the inputs' first dimension is named "batch")
    inputs: list[str]
    outputs: list[str]
    seconds: float
    max_abs_error: float | None  # onnxruntime against PyTorch; None where onnxruntime is absent
    checked_with: str | None


class _Step(nn.Module):
    """(tokens, *state tensors) -> (logits, *next state tensors), on the reference op set
    without its size rules."""

    def __init__(self, model: CompiledModel, keys: list[str]):
        super().__init__()
        self.model = model
        self.keys = keys
        self.ops = ReferenceOps(training=False, size_rules=False)

    def forward(self, tokens: Tensor, *tensors: Tensor):
        flat = {"format_version": FORMAT_VERSION, **dict(zip(self.keys, tensors, strict=True))}
        state = State.from_state_dict(self.model.graph, flat)
        graph = self.model.graph
        args = [tokens if v.name == "tokens" else state[v.name] for v in graph.inputs]
        params = dict(self.model.named_parameters())
        outs = self.model._forward_fn(*args, params=params, ops=self.ops)
        new = State({name: outs[name] for name in graph.state_names}).state_dict()
        return (outs["logits"], *(new[k] for k in self.keys))


def _state_keys(model: CompiledModel, batch: int) -> tuple[list[str], list[Tensor]]:
    flat = model.initial_state(batch).state_dict()
    keys = [k for k in flat if k != "format_version"]
    return keys, [flat[k] for k in keys]


def _advanced_state(model: CompiledModel, batch: int, generator: torch.Generator) -> State:
    """A state with some history (memory partly filled), so the check covers more than zeros."""
    vocab = model.vocab_size or 2
    warm = torch.randint(0, vocab, (batch, 37), generator=generator)
    with torch.no_grad():
        return model(warm)[1]


@dataclass
class _Traced:
    model: CompiledModel  # the CPU copy that was traced
    step: _Step
    keys: list[str]
    program: torch.export.ExportedProgram
    example: tuple[Tensor, ...]


def _trace(model: CompiledModel, batch: int | None, steps: int, one_hot_sums: bool = False) -> _Traced:
    """torch.export of the inference step on a CPU copy of `model`, every op its reference
    (`one_hot_sums`: the memory write's slot sums without scatter, `export_onnx`)."""
    if (batch is not None and batch < 1) or steps < 1:
        raise ExportError(f"batch and steps must be at least 1, got batch {batch}, steps {steps}")
    model = copy.deepcopy(model).to("cpu").eval()
    traced = batch or 2  # a dynamic batch is traced with 2 rows (1 would be specialised)
    keys, state = _state_keys(model, traced)
    example = (torch.zeros(traced, steps, dtype=torch.int64), *state)
    shapes = None
    if batch is None:
        rows = torch.export.Dim("batch", min=1, max=1 << 16)
        shapes = ({0: rows}, tuple({0: rows} for _ in state))
    step = _Step(model, keys)
    sums = memory_reference.one_hot_sums() if one_hot_sums else contextlib.nullcontext()
    with torch.no_grad(), tracing_references(), sums:
        program = torch.export.export(step, example, dynamic_shapes=shapes, strict=False)
    leftover = sorted({str(n.target) for n in program.graph.nodes if "mmrec" in str(n.target)})
    if leftover:  # an entry point that bypassed kernels.library.call
        raise ExportError(f"custom ops left in the traced graph: {', '.join(leftover)}")
    return _Traced(model, step, keys, program, example)


def _out_path(path: str | Path, name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _checked(traced: _Traced, run, batch: int | None, steps: int, what: str, sizes=(1, 3)) -> float:
    """Max |run - PyTorch| over logits and next state, at `sizes` rows for a dynamic batch.
    `run(tokens, flat state)` -> the outputs as tensors or arrays. Above TOLERANCE: an error."""
    error = 0.0
    for rows in sizes if batch is None else (batch,):
        generator = torch.Generator().manual_seed(rows)
        flat = _advanced_state(traced.model, rows, generator).state_dict()
        tokens = torch.randint(0, traced.model.vocab_size or 2, (rows, steps), generator=generator)
        with torch.no_grad():
            expected = traced.step(tokens, *(flat[k] for k in traced.keys))
        got = run(tokens, {k: flat[k] for k in traced.keys})
        for name, g, e in zip(["logits", *traced.keys], got, expected, strict=True):
            g = torch.as_tensor(g)
            if tuple(g.shape) != tuple(e.shape):
                raise ExportError(f"{what}: output {name} has shape {list(g.shape)}, the model's {list(e.shape)}")
            if e.numel():
                error = max(error, float((g - e).abs().max()))
    if not error <= TOLERANCE:
        raise ExportError(f"{what} differs from the PyTorch model by {error:.2e} (more than {TOLERANCE})")
    return error


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs the packages onnx and onnxscript: pip install onnx onnxscript") from None


def _save_onnx(traced: _Traced, path: str | Path, opset: int) -> tuple[Path, list[str], list[str]]:
    """The traced step as an ONNX file at `path` (a folder gets `model.onnx`) -> (the file, the
    input names, the output names)."""
    path = _out_path(path, "model.onnx")
    inputs, outputs = ["tokens", *traced.keys], ["logits", *(k + ".next" for k in traced.keys)]
    quiet = logging.getLogger("torch.onnx")  # it warns that torchvision's ops cannot be registered
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(
            traced.program,
            traced.example,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            verbose=False,
        )
    finally:
        quiet.setLevel(level)
    onnx_program.save(str(path))
    return path, inputs, outputs


def export_onnx(
    model: CompiledModel,
    path: str | Path,
    batch: int | None = None,
    steps: int = 1,
    opset: int = 18,
    check: bool = True,
    one_hot_sums: bool = False,
) -> ExportResult:
    """Write `model`'s inference step for `steps` tokens to an ONNX file (a folder gets
    `model.onnx` inside): for any batch size (`batch` None: the batch dimension is symbolic) or
    for `batch` rows. A CPU copy of the model is traced (the lowering does not depend on the
    device); the caller's model is left as it was. `one_hot_sums`: the memory write's slot sums
    as MatMul with one-hot matrices instead of ScatterND with reduction="add", which TensorRT's
    ONNX parser rejects (`kernels.memory.reference.one_hot_sums`)."""
    _require_onnxscript()
    start = time.perf_counter()
    traced = _trace(model, batch, steps, one_hot_sums)
    path, inputs, outputs = _save_onnx(traced, path, opset)
    seconds = time.perf_counter() - start
    error, runtime = None, None
    if check:
        try:
            import onnxruntime
        except ImportError:
            onnxruntime = None
        if onnxruntime is not None:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

            def run(tokens, flat):
                return session.run(None, {"tokens": tokens.numpy(), **{k: t.numpy() for k, t in flat.items()}})

            runtime = f"onnxruntime {onnxruntime.__version__}"
            error = _checked(traced, run, batch, steps, f"{path}: {runtime}")
    return ExportResult(path, batch, inputs, outputs, seconds, error, runtime)


def export_aoti(
    model: CompiledModel, path: str | Path, batch: int | None = None, steps: int = 1, check: bool = True
) -> ExportResult:
    """Compile `model`'s inference step ahead of time with AOTInductor into a `.pt2` package for
    the CPU (a folder gets `model.pt2` inside): a shared library of Inductor's C++ kernels that
    runs without Python through torch's AOTI runner (`torch._inductor.aoti_load_package` in
    Python). Same step, inputs and outputs as export_onnx, in the same order."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    start = time.perf_counter()
    traced = _trace(model, batch, steps)
    path = _out_path(path, "model.pt2")
    if path.suffix != ".pt2":
        raise ExportError(f"{path}: an AOTInductor package's name must end in .pt2")
    aoti_compile_and_package(traced.program, package_path=str(path))
    seconds = time.perf_counter() - start
    inputs, outputs = ["tokens", *traced.keys], ["logits", *(k + ".next" for k in traced.keys)]
    error, runner = None, None
    if check:
        compiled = aoti_load_package(str(path))

        def run(tokens, flat):
            return compiled(tokens, *flat.values())

        runner = f"the AOTInductor runner (torch {torch.__version__})"
        error = _checked(traced, run, batch, steps, f"{path}: {runner}")
    return ExportResult(path, batch, inputs, outputs, seconds, error, runner)


def _trt_dtypes(trt) -> dict:
    """TensorRT's data types -> torch's, for those this TensorRT has."""
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
    return {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}


def export_tensorrt(
    model: CompiledModel,
    path: str | Path,
    batch: int | None = None,
    steps: int = 1,
    max_batch: int = 64,
    check: bool = True,
) -> ExportResult:
    """Build a TensorRT engine of `model`'s inference step (a folder gets `model.engine` inside):
    the step exported to ONNX beside it (`<name>.onnx`, export_onnx), parsed by TensorRT's ONNX
    parser and built for this machine's GPU, for `batch` rows or, with `batch` None, any batch
    from 1 to `max_batch`. Same inputs and outputs as export_onnx. Checked against the PyTorch
    model on the GPU (at 1 and min(3, max_batch) rows for a dynamic batch). Building takes
    minutes. Not run on our machines (none has TensorRT; the module's docstring)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(
            "TensorRT export needs the tensorrt package and an NVIDIA GPU: pip install tensorrt "
            "(not installed here; `--format onnx` writes the file TensorRT builds from)"
        ) from None
    if not torch.cuda.is_available():
        raise ExportError("TensorRT export needs an NVIDIA GPU: it builds the engine for the GPU it runs on")
    if batch is None and max_batch < 1:
        raise ExportError(f"max_batch must be at least 1, got {max_batch}")
    _require_onnxscript()
    start = time.perf_counter()
    path = _out_path(path, "model.engine")
    traced = _trace(model, batch, steps, one_hot_sums=True)
    onnx_path, inputs, outputs = _save_onnx(traced, path.with_suffix(".onnx"), opset=18)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # the parser maps some ONNX ops to TensorRT's plugins
    builder = trt.Builder(logger)
    explicit = 0  # TensorRT 10: every network has an explicit batch dimension; 8.x needs the flag
    if int(trt.__version__.split(".")[0]) < 10:
        explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 products in TF32 would miss TOLERANCE
        config.clear_flag(trt.BuilderFlag.TF32)
    if batch is None:  # the inputs' first dimension is -1: one profile over the batch sizes served
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            low, high = ([1 if d == -1 else d for d in dims], [max_batch if d == -1 else d for d in dims])
            profile.set_shape(tensor.name, low, [min(8, max_batch) if d == -1 else d for d in dims], high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(bytes(serialized))
    os.replace(partial, path)  # a crash never leaves half an engine under the real name
    seconds = time.perf_counter() - start
    error, checker = None, None
    if check:
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ExportError(f"{path}: TensorRT could not load the engine it built")
        context = engine.create_execution_context()
        dtypes = _trt_dtypes(trt)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        fed = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]

        def run(tokens, flat):
            feeds = {"tokens": tokens, **flat}
            buffers = {}
            for name in fed:
                buffers[name] = feeds[name].to("cuda", dtypes[engine.get_tensor_dtype(name)]).contiguous()
                if not context.set_input_shape(name, tuple(buffers[name].shape)):
                    raise ExportError(f"{path}: TensorRT refused input {name} of shape {list(buffers[name].shape)}")
            for name in outputs:
                shape = tuple(context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, device="cuda", dtype=dtypes[engine.get_tensor_dtype(name)])
            spare = torch.empty(1, device="cuda")  # an empty tensor's data_ptr is 0, which TensorRT refuses
            for name, tensor in buffers.items():
                if not context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else spare.data_ptr()):
                    raise ExportError(f"{path}: TensorRT refused the buffer of {name}")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # the inputs' copies
            if not context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"{path}: TensorRT failed to run the engine")
            stream.synchronize()
            return [buffers[name].cpu() for name in outputs]

        checker = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"
        error = _checked(traced, run, batch, steps, f"{path}: {checker}", sizes=(1, min(3, max_batch)))
    return ExportResult(path, batch, inputs, outputs, seconds, error, checker)
