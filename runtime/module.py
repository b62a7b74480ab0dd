"""runtime.compile: a verified graph -> a torch.nn.Module with real parameters.

The forward is generated Python (``model.code``), one line per IR node calling the op set,
so what runs is readable and torch.compile traces straight through it.
"""

from __future__ import annotations

import builtins

import torch
from torch import Tensor, nn

import passes as passlib
from mmrec_ir import Graph, Init, TensorType, print_python

from .opset import ReferenceOps
from .state import State, StateError


class InputError(ValueError):
    """The caller passed tokens or a state that this model cannot take."""


class Output(tuple):
    """``logits, state = model(tokens)``; the auxiliary loss (or None) is ``.aux``."""

    aux: Tensor | None

    def __new__(cls, logits: Tensor, state: State, aux: Tensor | None):
        out = super().__new__(cls, (logits, state))
        out.aux = aux
        return out


def _init_param(param: nn.Parameter, init: Init, generator: torch.Generator) -> None:
    with torch.no_grad():
        if init.kind == "zeros":
            param.zero_()
        elif init.kind == "ones":
            param.fill_(1.0)
        elif init.kind == "const":
            param.fill_(init.args[0])
        elif init.kind == "normal":
            param.normal_(0.0, init.args[0], generator=generator)
        elif init.kind == "uniform":
            lo, hi = init.args
            param.uniform_(lo, hi, generator=generator)
        else:
            raise ValueError(f"unknown initialiser '{init}' (known: zeros, ones, const, normal, uniform)")


def _codegen(graph: Graph, code: str | None = None):
    """The graph's forward as a Python function (inputs..., params, ops) -> {output name: value}."""
    namespace: dict = {}
    exec(builtins.compile(code or print_python(graph), f"<mmrec graph {graph.name}>", "exec"), namespace)
    return namespace[graph.name]


def run_graph(graph: Graph, inputs: dict, params: dict, training: bool = False) -> dict:
    """Execute any verified graph on the reference op set: inputs and params by name."""
    fn = _codegen(graph)
    return fn(*(inputs[v.name] for v in graph.inputs), params=params, ops=ReferenceOps(training))


class CompiledModel(nn.Module):
    def __init__(self, graph: Graph, stages: list[passlib.Stage] | None = None, seed: int = 0):
        super().__init__()
        self.graph = graph
        self.stages = stages or []
        self.vocab_size = next((p.type.shape[0] for p in graph.params if p.name == "embed"), None)
        generator = torch.Generator().manual_seed(seed)
        for p in graph.params:
            *path, leaf = p.name.split(".")
            owner: nn.Module = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            assert isinstance(p.type, TensorType)
            weight = nn.Parameter(torch.empty(tuple(int(d) for d in p.type.shape)))
            _init_param(weight, p.init, generator)
            owner.register_parameter(leaf, weight)
        self.code = print_python(graph)
        self._forward_fn = _codegen(graph, self.code)
        self._ops = {True: ReferenceOps(training=True), False: ReferenceOps(training=False)}
        self._state_names = graph.state_names

    @property
    def passes_run(self) -> list[str]:
        return [s.pass_name for s in self.stages if s.pass_name != "input"]

    @property
    def kernels(self) -> list[tuple[str, str, str]]:
        """(first output, op, what claims it per device) for each node, as select-kernels
        recorded it (empty where that pass did not run)."""
        return [(n.outputs[0].ref, n.op, n.attr["kernel"]) for n in self.graph.nodes if "kernel" in n.attr]

    def initial_state(self, batch: int, device=None) -> State:
        return State.initial(self.graph, batch, device=device)

    def _check(self, tokens: Tensor, state: State | None) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens: expected an int64 tensor [B, T], got {got}")
        if tokens.shape[1] == 0:
            raise InputError("tokens: expected at least one token per row, got T = 0")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or (self.vocab_size is not None and hi >= self.vocab_size):
            bad = lo if lo < 0 else hi
            raise InputError(f"tokens: ids must lie in [0, {self.vocab_size}), got {bad}")
        if state is not None and state.batch_size != tokens.shape[0]:
            raise StateError(f"state: batch {state.batch_size} does not match tokens batch {tokens.shape[0]}")

    def forward(self, tokens: Tensor, state: State | None = None) -> Output:
        """tokens [B, T] int64 -> Output(logits [B, T, V], next State) with `.aux`."""
        if not torch.compiler.is_compiling():
            self._check(tokens, state)
        if state is None:
            state = self.initial_state(tokens.shape[0], device=tokens.device)
        params = dict(self.named_parameters())
        args = [tokens if v.name == "tokens" else state[v.name] for v in self.graph.inputs]
        outs = self._forward_fn(*args, params=params, ops=self._ops[self.training])
        new_state = State({name: outs[name] for name in self._state_names})
        return Output(outs["logits"], new_state, outs.get("aux"))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def compile(graph: Graph, mode: str = "train", passes=None, seed: int = 0) -> CompiledModel:
    """Verify `graph`, run the pass pipeline, and build the module. `mode` is "train" or "infer"."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode: expected 'train' or 'infer', got {mode!r}")
    pipeline = passlib.default_pipeline() if passes is None else passlib.lookup(passes)
    result = passlib.run_pipeline(graph, pipeline)
    model = CompiledModel(result.graph, result.stages, seed=seed)
    return model.train(mode == "train")
