"""A/B of a kernel module against an earlier git revision, both timed side by side in one run.

    python benchmarks/ab.py REV scan   [--shape 8,4096,2048 ...] [--dtype bf16 fp32] [--repeats 3]
    python benchmarks/ab.py REV memory [--dtype bf16] [--bwd auto split fused-tma] [--repeats 3]
                                       [--offset 37] [--slots 960 --slots 240,240,460 ...]
    TRITON_INTERPRET=1 python benchmarks/ab.py REV scan --check     # no GPU: outputs only

REV's `kernels/<op>/kernel.py` (or REV itself, if it names a .py file: where there is no git
history, as on the GPU machine, which gets the files but not .git; `scripts/device_check.sh
--prepare REV` writes them) is loaded beside the working tree's, as a sibling module of the
same package, so its relative imports (`..config`, `..launch`, `..dot`) resolve to the working
tree's helpers: the two must agree on those helpers' API (true between neighbouring commits; a
revision that does not is reported in one line). For each case both versions run once, each is
checked against the fp64 reference (its relative error printed) and against the other (bit-equal
or the largest difference), then they are timed in turns (A, B, A, B, ...; drift of the device
falls on both) as CUDA-graph replays of their launches: GPU time, no host time. Every time is
printed beside a yardstick measured in the same run: the copy-bandwidth floor for the scan
(forward 3 passes over B*T*C elements, backward 5), SDPA over the same key count for the memory
query. This is how a kernel change is judged before it lands (BENCHMARKS.md).

`--check` (what CI runs, on CPU tensors under TRITON_INTERPRET=1) does the checks on small shapes
and times nothing. The fused memory backwards add dq in whatever order the slot tiles come, so
there A and B can differ in dq's last bits even for the same code.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from kernels.memory import reference as memory_ref  # noqa: E402
from kernels.scan import reference as scan_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_revision(rev: str, op: str) -> ModuleType:
    """kernels/<op>/kernel.py as it was at `rev` (or the file `rev` names, if it ends in .py),
    imported as kernels.<op>._ab_<hash>."""
    path = f"kernels/{op}/kernel.py"
    if rev.endswith(".py"):
        if not Path(rev).is_file():
            sys.exit(f"ab.py: no kernel file {rev!r}")
        source = Path(rev).read_text()
    else:
        try:
            shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        except FileNotFoundError:
            sys.exit(f"ab.py: no git here to read {path} at {rev!r}: pass a kernel .py file instead")
        if shown.returncode != 0:
            why = (shown.stderr.strip().splitlines() or ["git failed"])[-1]
            sys.exit(f"ab.py: cannot read {path} at {rev!r}: {why}")
        source = shown.stdout
    tag = hashlib.sha1(source.encode()).hexdigest()[:10]
    # A real file: Triton's @jit reads each kernel's source back through `inspect`.
    file = Path(tempfile.mkdtemp(prefix="mmrec-ab-")) / f"kernel_{tag}.py"
    file.write_text(source)
    name = f"kernels.{op}._ab_{tag}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        sys.exit(f"ab.py: {path} at {rev!r} does not import beside today's helpers: {e}")
    return module


def current(op: str) -> ModuleType:
    return importlib.import_module(f"kernels.{op}.kernel")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    """'bit-equal', or the largest element difference between A's and B's outputs."""
    if all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
        return "bit-equal"
    worst = max((x.double() - y.double()).abs().nan_to_num(math.inf).max().item() for x, y in zip(a, b, strict=True))
    return f"differ (max |A - B| {worst:.2e})"


def graph_ms(fn) -> float:
    """Median ms of one CUDA-graph replay of fn (warmed up outside the capture)."""
    import triton

    from benchmarks.common import graph_time

    return graph_time(fn, lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median"))


def in_turns(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Each fn timed `repeats` times, in turns; the median of each (NaN, said once, for one
    that cannot be timed as a graph replay)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    failed: set[str] = set()
    for _ in range(repeats):
        for k, fn in fns.items():
            if k in failed:
                continue
            try:
                times[k].append(graph_ms(fn))
            except Exception as e:  # one untimeable row must not cost the run's others
                print(f"  {k}: not timed ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
                failed.add(k)
    return {k: statistics.median(v) if v else math.nan for k, v in times.items()}


def report_errors(label: str, name: str, errs: dict[str, float], what: str = "rel err") -> None:
    print(f"  {label} {name}: {what} " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)


def report_times(label: str, versions, t: dict[str, float], base_f: float, base_b: float, base: str) -> None:
    """Each version's forward and backward time and its ratio to the yardstick of the same run."""
    for name in versions:
        f, bw = t[f"{name} fwd"], t[f"{name} bwd"]
        print(f"  {label} {name}: fwd {f:.4f} ms = {f / base_f:.3f}x {base}, bwd {bw:.4f} ms = {bw / base_b:.3f}x,"
              f" fwd+bwd {(f + bw) / (base_f + base_b):.3f}x", flush=True)  # fmt: skip


# ---- linear scan -------------------------------------------------------------------------


def scan_case(versions: dict[str, ModuleType], shape, dtype, device, repeats: int, check: bool) -> None:
    bsz, steps, width = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    log_a = (-torch.rand(bsz, steps, width, generator=g) * 0.5).to(device, dtype)
    b = torch.randn(bsz, steps, width, generator=g).to(device, dtype)
    h0 = torch.randn(bsz, width, generator=g).to(device, dtype)
    dh = torch.randn(bsz, steps, width, generator=g).to(device, dtype)
    dh_last = torch.randn(bsz, width, generator=g).to(device, dtype)
    want_h, want_last = scan_ref.forward(log_a.double(), b.double(), h0.double())
    want_g = scan_ref.backward(log_a.double(), want_h, h0.double(), dh.double(), dh_last.double())
    label = f"scan B{bsz} T{steps} C{width} {str(dtype).removeprefix('torch.')}"
    outs = {}
    for name, mod in versions.items():
        h, h_last = mod.scan_fwd(log_a, b, h0)
        grads = mod.scan_bwd(log_a, h, h0, dh, dh_last)
        outs[name] = [h, h_last, *grads]
        wants = [want_h, want_last, *want_g]
        errs = [rel_err(x, w) for x, w in zip(outs[name], wants, strict=True)]
        report_errors(label, name, dict(zip(["h", "h_last", "dlog_a", "db", "dh0"], errs, strict=True)))
    a, b_ = outs.values()
    print(f"  {label}: A and B {agreement(a, b_)}", flush=True)
    if check:
        return
    h_by = {k: v[0] for k, v in outs.items()}
    src = torch.randn(b.numel(), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    fns = {"copy": lambda: dst.copy_(src)}
    for name, mod in versions.items():
        fns[f"{name} fwd"] = lambda mod=mod: mod.scan_fwd(log_a, b, h0)
        fns[f"{name} bwd"] = lambda mod=mod, h=h_by[name]: mod.scan_bwd(log_a, h, h0, dh, dh_last)
    t = in_turns(fns, repeats)
    floor_f, floor_b = t["copy"] * 1.5, t["copy"] * 2.5
    gbps = 2 * src.numel() * src.element_size() / t["copy"] / 1e6
    print(f"  {label}: copy {t['copy']:.4f} ms ({gbps / 1e3:.2f} TB/s); floor fwd {floor_f:.4f}, bwd {floor_b:.4f} ms")
    report_times(label, versions, t, floor_f, floor_b, "floor")


# ---- memory query ------------------------------------------------------------------------


def memory_inputs(bsz, heads, steps, spec, dtype, device, offset=0):
    """q, the candidate keys/values ([B, K, S, Dh], every level full), beta, pos, rings, spans.
    `offset` tokens past a block boundary (0: every band moves at token tile boundaries only, so
    the forward masks only a level's last tile; else the bands move inside token tiles)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mem = kernels.Memory.empty(spec, bsz, dtype=torch.float32)
    mem.keys = [torch.randn(t.shape, generator=g) for t in mem.keys]
    mem.values = [torch.randn(t.shape, generator=g) for t in mem.values]
    # As benchmarks/memory.py: far enough into the stream that every ring is full (at 64 spans of
    # the last level, as before session 20, its 460-slot ring held 64: ~630 of the 1024 keys).
    mem.pos = torch.full((bsz,), spec.span(len(spec.slots) - 1) * 4096 + offset, dtype=torch.int64)
    mem = mem.map(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))
    kd = spec.heads * spec.dim
    q = torch.randn(bsz, steps, heads * spec.dim, generator=g).to(device, dtype)
    k, v = (torch.randn(bsz, steps, kd, generator=g).to(device, dtype) for _ in range(2))
    full = [int(mem.pos[0]) // spec.span(lvl) >= m for lvl, m in enumerate(spec.slots)]
    assert all(full), f"ab.py: not every ring is full ({full})"
    cand = memory_ref.candidates(mem, k, v)
    beta = (torch.randn(heads, len(spec.slots), generator=g) * 0.5).to(device, dtype)
    levels = (list(spec.slots), [spec.span(lvl) for lvl in range(len(spec.slots))])
    return q, cand.keys.contiguous(), cand.values.contiguous(), beta, mem.pos, *levels


def memory_case(versions, args_in, heads, dtype, bwd_mode, repeats, check) -> None:
    from kernels.memory import op

    q, keys, values, beta, pos, rings, spans = args_in
    bsz, steps, _ = q.shape
    g = torch.Generator(device="cpu").manual_seed(1)
    dout = torch.randn(q.shape, generator=g).to(q.device, dtype)
    # The reference on the first batch row (fp64): [T, S] weights per head fit at full T.
    row = [t[:1].double() if t.is_floating_point() else t[:1] for t in (q, keys, values)]
    want_out, _ = op._fwd_reference(*row, beta.double(), pos[:1], rings, spans, heads)
    want_g = op._bwd_reference(*row, beta.double(), pos[:1], rings, spans, dout[:1].double(), heads)
    label = f"memory B{bsz} H{heads} T{steps} S{keys.shape[2]} rings {','.join(map(str, rings))}"
    label += f" {str(dtype).removeprefix('torch.')}"
    label += f" pos {int(pos[0])} bwd={bwd_mode}"
    saved = kernels.knobs.memory_bwd
    kernels.knobs.memory_bwd = bwd_mode
    try:
        outs, saved_fwd = {}, {}
        for name, mod in versions.items():
            out, lse = mod.attend_fwd(q, keys, values, beta, pos, rings, spans, heads)
            grads = mod.attend_bwd(q, keys, values, beta, pos, rings, spans, out, lse, dout, heads)
            outs[name], saved_fwd[name] = [out, lse, *grads], (out, lse)
            # dbeta sums every batch row: the reference's is for row 0 only, so it is not compared.
            errs = [rel_err(x[:1], w) for x, w in zip([out, *grads[:3]], [want_out, *want_g[:3]], strict=True)]
            report_errors(label, name, dict(zip(["out", "dq", "dk", "dv"], errs, strict=True)), "rel err (row 0)")
        a, b = outs.values()
        print(f"  {label}: A and B {agreement(a, b)}", flush=True)
        if check:
            return
        import torch.nn.functional as F

        n_keys = keys.shape[2]
        qs = q.view(bsz, steps, heads, -1).transpose(1, 2).contiguous().requires_grad_()
        ks = torch.randn(bsz, heads, n_keys, qs.shape[-1], device=q.device, dtype=dtype, requires_grad=True)
        vs = torch.randn_like(ks, requires_grad=True)
        do_s = dout.view(bsz, steps, heads, -1).transpose(1, 2)
        # SDPA's backward as (forward + backward) - forward, both in one graph: captured alone,
        # over a forward run outside the capture (autograd runs a backward on its forward's
        # stream), the first case's SDPA backward failed to capture in sessions 20-21 (H200:
        # "operation failed due to a previous error during capture").
        fns = {
            "sdpa fwd": lambda: F.scaled_dot_product_attention(qs, ks, vs),
            "sdpa fwd+bwd": lambda: torch.autograd.grad(F.scaled_dot_product_attention(qs, ks, vs), (qs, ks, vs), do_s),
        }
        for name, mod in versions.items():
            out, lse = saved_fwd[name]
            fns[f"{name} fwd"] = lambda mod=mod: mod.attend_fwd(q, keys, values, beta, pos, rings, spans, heads)
            fns[f"{name} bwd"] = lambda mod=mod, out=out, lse=lse: mod.attend_bwd(
                q, keys, values, beta, pos, rings, spans, out, lse, dout, heads
            )
        t = in_turns(fns, repeats)
        sf, sb = t["sdpa fwd"], t["sdpa fwd+bwd"] - t["sdpa fwd"]
        print(f"  {label}: SDPA over {n_keys} keys fwd {sf:.4f} ms, bwd {sb:.4f} ms")
        report_times(label, versions, t, sf, sb, "SDPA")
    finally:
        kernels.knobs.memory_bwd = saved


def parse_slots(text: str) -> tuple[int, ...]:
    """--slots "240,240,460" -> (240, 240, 460); anything else exits with one line."""
    try:
        slots = tuple(int(x) for x in text.split(","))
    except ValueError:
        slots = ()
    if not slots or min(slots) < 1:
        sys.exit(f"ab.py: --slots {text!r}: expected ring sizes >= 1 separated by commas, e.g. 240,240,460")
    return slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="A: a git revision, or a kernel .py file; B is the working tree")
    parser.add_argument("op", choices=["scan", "memory"])
    parser.add_argument("--shape", action="append", default=None, help="scan: B,T,C (repeatable)")
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES))
    parser.add_argument("--bwd", nargs="+", default=["auto"], help="memory: MMREC_MEMORY_BWD modes to time")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each version, in turns")
    parser.add_argument("--check", action="store_true", help="small shapes, outputs only (CPU interpreter)")
    parser.add_argument("--offset", type=int, default=0, help="memory: the stream position past a block boundary")
    parser.add_argument(
        "--slots",
        action="append",
        default=None,
        help="memory: ring sizes, one per level (spans 64, 256, 1024, ...), e.g. 240,240,460 (the default) "
        "or 960; repeatable, to see what the levels cost at about the same slot count",
    )
    args = parser.parse_args()
    layouts = [parse_slots(s) for s in args.slots] if args.slots else [None]
    if args.check:
        if not (kernels.knobs.interpret or torch.cuda.is_available()):
            sys.exit("ab.py --check: set TRITON_INTERPRET=1 to run the kernels on CPU tensors")
        device = "cuda" if torch.cuda.is_available() and not kernels.knobs.interpret else "cpu"
        print(f"ab.py --check: {args.rev} (A) against the working tree (B), {device}")
    else:
        from benchmarks.common import run_info

        run_info("benchmarks/ab.py")
        device = "cuda"
    versions = {"A " + args.rev: load_revision(args.rev, args.op), "B tree": current(args.op)}
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16", "fp32"] if args.op == "scan" else ["bf16"]))]
    if args.op == "scan":
        default = [(1, 37, 20), (2, 70, 33)] if args.check else [(8, 4096, 2048), (4, 4096, 2048), (8, 4000, 1000)]
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else default
        for shape, dtype in ((s, d) for d in dtypes for s in shapes):
            scan_case(versions, shape, dtype, device, args.repeats, args.check)
        return
    # (memory heads, Dh, block, ratio, default rings), (B, H, T). Under --check, rings wide enough
    # that some tiles skip the mask under the interpreter's 16 x 16 tiles.
    if args.check:
        (kv_heads, dim, block, ratio, default), (bsz, heads, steps) = (2, 16, 2, 2, (40, 24, 8)), (2, 4, 45)
    else:
        (kv_heads, dim, block, ratio, default), (bsz, heads, steps) = (16, 64, 64, 4, (240, 240, 460)), (8, 16, 4096)
    for slots in layouts:
        spec = kernels.MemorySpec(heads=kv_heads, dim=dim, block=block, ratio=ratio, slots=slots or default)
        for dtype in dtypes:
            inputs = memory_inputs(bsz, heads, steps, spec, dtype, device, args.offset)
            for mode in args.bwd:
                memory_case(versions, inputs, heads, dtype, mode, args.repeats, args.check)


if __name__ == "__main__":
    main()
