"""The `mmrec` command: train, generate, inspect, export.

User mistakes (a bad config, a missing checkpoint, out-of-range tokens, an empty prompt, a
non-finite loss) end in one line on stderr, `mmrec: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "runs/tiny"


def _cmd_train(args) -> int:
    import models

    from .train import Trainer

    overrides = {"train.steps": args.steps} if args.steps is not None else None
    cfg = None if args.resume else models.load_config(args.config, overrides)
    if args.resume and args.steps is not None:
        raise SystemExit("mmrec: error: --steps cannot change a resumed run's schedule; resume continues it")
    if not args.resume and (Path(args.out) / "ckpt.pt").exists() and not args.force:
        raise ValueError(f"--out {args.out}: a checkpoint is already there; pass --resume to continue or --force")
    if not args.resume:
        log = Path(args.out) / "log.jsonl"
        log.unlink(missing_ok=True)
    trainer = Trainer(cfg, args.out, data=args.data, resume=args.resume, device=args.device, progress=not args.quiet)
    c = trainer.cfg
    print(
        f"model {c.name}: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {c.n_layers} layers, "
        f"d_model {c.d_model}, recurrence {c.recurrence}; tokenizer {c.tokenizer} ({trainer.tokenizer.vocab_size}); "
        f"{trainer.train_stream.tokens.numel():,} training tokens, {trainer.val_stream.tokens.numel():,} held out"
    )
    result = trainer.run()
    eval_text = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.3f}"
    print(f"done: step {result.step}, loss {result.loss:.3f}{eval_text}; checkpoint {result.checkpoint}")
    return 0


def _cmd_generate(args) -> int:
    import torch

    from .generate import generate
    from .module import InputError
    from .train import load_for_inference

    if args.ids is None and not args.prompt:
        raise InputError("--prompt is empty: give at least one character of text")
    model, tokenizer, _ = load_for_inference(args.ckpt, device=args.device)
    if args.ids is not None:
        try:
            ids = [int(i) for i in args.ids.split(",") if i.strip()]
        except ValueError:
            raise InputError(f"--ids: expected comma-separated integers, got {args.ids!r}") from None
        args.prompt = tokenizer.decode([i for i in ids if 0 <= i < tokenizer.vocab_size])
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    prompt = torch.tensor([ids], device=args.device)
    generated: list[int] = []
    printed = 0
    sys.stdout.write(args.prompt)

    def stream(token):
        nonlocal printed
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        # Print only whole characters: a byte-level token can end inside a UTF-8 sequence.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    temperature = 0.0 if args.greedy else args.temperature
    generate(model, prompt, args.tokens, temperature=temperature, top_k=args.top_k, seed=args.seed, on_token=stream)
    sys.stdout.write(tokenizer.decode(generated)[printed:] + "\n")
    return 0


def _cmd_inspect(args) -> int:
    import models
    import passes as passlib
    from mmrec_ir import MemoryType, parse, print_graph, print_python, verify

    if args.ir:
        path = Path(args.ir)
        if not path.is_file():
            raise ValueError(f"--ir {path}: no such file")
        graph = verify(parse(path.read_text()))
    else:
        cfg = models.load_config(args.config)
        graph = models.build(cfg)
    pipeline = passlib.default_pipeline() if args.passes is None else passlib.lookup(args.passes)

    def show(stage):
        if args.print_after_all:
            print(passlib.print_after(stage))

    show(passlib.Stage("input", graph, 0.0))
    result = passlib.run_pipeline(graph, pipeline, after_each=show)
    if not args.print_after_all:
        print(print_python(result.graph) if args.python else print_graph(result.graph), end="")
    if args.dump:
        written = passlib.dump_stages(result, args.dump)
        print(f"// wrote {len(written)} files to {args.dump}")
    if args.svg:
        for path in passlib.render_pipeline(result, args.svg):
            print(f"// wrote {path}")
    if args.report:
        print(passlib.fusion_report(graph, result.graph), end="")
    g = result.graph
    timings = ", ".join(f"{s.pass_name} {s.seconds * 1e3:.1f} ms" for s in result.stages[1:]) or "none"
    memories = [v.type for v in g.inputs if isinstance(v.type, MemoryType)]
    coverage = f", memory coverage {memories[0].coverage:,} tokens per layer" if memories else ""
    print(
        f"// {len(g.nodes)} nodes, {len(g.params)} parameters ({g.param_count():,} values){coverage}; passes: {timings}"
    )
    return 0


def _cmd_export(args) -> int:
    from .export import ExportError, export_aoti, export_onnx, export_tensorrt
    from .train import load_for_inference

    if (args.batch is not None and args.batch < 1) or args.steps < 1:
        raise ExportError(f"--batch and --steps must be at least 1, got {args.batch} and {args.steps}")
    if args.max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1, got {args.max_batch}")
    model, _, _ = load_for_inference(args.ckpt, device="cpu")
    ckpt = Path(args.ckpt)
    name = {"onnx": "model.onnx", "aotinductor": "model.pt2", "tensorrt": "model.engine"}[args.format]
    out = args.out or (ckpt if ckpt.is_dir() else ckpt.parent) / name
    rows = "any batch" if args.batch is None else f"batch {args.batch}"
    if args.format == "tensorrt" and args.batch is None:
        rows = f"any batch up to {args.max_batch}"
    print(f"exporting {args.ckpt} ({args.format}): {rows}, {args.steps} token(s) a step -> {out}", flush=True)
    if args.format == "aotinductor":
        print("compiling C++ kernels with AOTInductor (the tiny model: about 100 s on 2 cores)", flush=True)
    if args.format == "tensorrt":
        print("writing the ONNX step, then building a TensorRT engine for this GPU (minutes)", flush=True)
    if args.format == "tensorrt":
        result = export_tensorrt(model, out, batch=args.batch, steps=args.steps, max_batch=args.max_batch)
    else:
        export = export_onnx if args.format == "onnx" else export_aoti
        result = export(model, out, batch=args.batch, steps=args.steps)
    print(f"wrote {result.path} in {result.seconds:.1f} s: inputs tokens + {len(result.inputs) - 1} state tensors")
    if result.max_abs_error is None:
        print("not checked: onnxruntime is not installed")
    else:
        print(f"checked with {result.checked_with}: max |exported - torch| = {result.max_abs_error:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrec", description="Compile, train and run MM-Rec recurrent language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on the bundled Shakespeare or your text")
    p.add_argument("--config", default="tiny", help="bundled config name (tiny, 125m, 1.3b, 7b) or a YAML path")
    p.add_argument("--data", default=None, help="a text file or folder (default: the bundled Shakespeare)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run folder for ckpt.pt and log.jsonl (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="start over even if --out has a checkpoint")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("generate", help="generate text from a trained checkpoint")
    p.add_argument("--ckpt", default=f"{DEFAULT_OUT}/ckpt.pt", help="checkpoint file or run folder")
    p.add_argument("--prompt", default="ROMEO:\n", help="text to continue")
    p.add_argument("--ids", default=None, help="comma-separated token ids to use as the prompt instead of text")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("inspect", help="print a model's IR, optionally after each pass")
    p.add_argument("--config", default="tiny", help="bundled config name or YAML path")
    p.add_argument("--ir", default=None, help="read IR text from this file instead of building a config")
    p.add_argument("--passes", default=None, help="comma-separated pipeline, e.g. infer-shapes,cse,dce")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--python", action="store_true", help="print the generated Python forward instead of IR")
    p.add_argument("--dump", default=None, metavar="DIR", help="write every stage's IR, the forward and timings here")
    p.add_argument("--svg", default=None, metavar="FILE", help="draw the graph after the passes (and FILE.before.svg)")
    p.add_argument(
        "--report",
        action="store_true",
        help="fusion report: ops and activation bytes per token, per block, and one block op by op",
    )
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser(
        "export", help="export a trained model's inference step (ONNX, an AOTInductor package or a TensorRT engine)"
    )
    p.add_argument("--ckpt", default=f"{DEFAULT_OUT}/ckpt.pt", help="checkpoint file or run folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "tensorrt", "aotinductor"])
    p.add_argument("--out", default=None, help="the file to write (default: model.onnx, .pt2 or .engine by --ckpt)")
    p.add_argument("--batch", type=int, default=None, help="fix the rows per call (default: any, checked at 1 and 3)")
    p.add_argument("--steps", type=int, default=1, help="tokens per call: 1 for decoding (fixed in the file)")
    p.add_argument(
        "--max-batch", type=int, default=64, help="tensorrt without --batch: the largest batch the engine takes"
    )
    p.set_defaults(fn=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmrec_ir import IRError
    from models import ConfigError
    from passes.inspect import RenderError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .module import InputError
    from .state import StateError
    from .train import TrainingError

    user_errors = (
        ConfigError,
        IRError,
        CheckpointError,
        DataError,
        InputError,
        StateError,
        TrainingError,
        RenderError,
        NotImplementedError,
        ValueError,
    )
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except user_errors as err:
        print(f"mmrec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
