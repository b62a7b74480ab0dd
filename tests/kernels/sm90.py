"""Compiling Triton kernels for sm_90 (Hopper) on the CPU machine: Triton's compiler runs without a
GPU, so CPU CI can check that a kernel lowers to the instructions we expect, fits shared memory
and does not spill registers (with this machine's Triton; the GPU machine's may differ)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on the H100/H200


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, attrs: dict | None = None, **options):
    """`fn` a Triton or a Gluon kernel; `options`: more of triton.compile's (num_stages, maxnreg)."""
    from triton.backends.compiler import GPUTarget

    source_type = triton.compiler.ASTSource
    if type(fn).__name__ == "GluonJITFunction":  # Gluon's own source type (a private module)
        from triton.experimental.gluon._runtime import GluonASTSource as source_type
    source = source_type(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps, **options})


def _cuobjdump(compiled, flag: str) -> str | None:
    """cuobjdump's output (`flag`: -sass, --dump-resource-usage) for the kernel's cubin, or None
    where the Triton wheel ships no cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def sass(compiled) -> str | None:
    """The kernel's SASS listing, or None where the Triton wheel ships no cuobjdump."""
    return _cuobjdump(compiled, "-sass")


def sass_loops(compiled) -> list[list[str]] | None:
    """The kernel's loops in its SASS: for each backward branch, the opcodes from its target to
    it (inner loops also appear inside their outer ones). None where there is no cuobjdump."""
    if (listing := sass(compiled)) is None:
        return None
    code = []  # (address, opcode without its predicate, operands)
    for line in listing.splitlines():
        if m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)(.*?);", line):
            code.append((int(m[1], 16), m[2], m[3]))
    index = {addr: k for k, (addr, _, _) in enumerate(code)}
    loops = []
    for k, (addr, op, rest) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target[1], 16) < addr and int(target[1], 16) in index:
            loops.append([o for _, o, _ in code[index[int(target[1], 16)] : k + 1]])
    return loops


def resource_usage(compiled) -> str | None:
    """cuobjdump's resource line for the kernel (registers, stack, local memory), or None where
    the Triton wheel ships no cuobjdump."""
    if (usage := _cuobjdump(compiled, "--dump-resource-usage")) is None:
        return None
    return [row for row in usage.splitlines() if "REG:" in row][-1].strip()


def assert_fits(compiled, what: str, stack: bool = True) -> bool:
    """Shared memory within the limit and, where cuobjdump can tell, no spills: no local memory
    and (with `stack`) no stack. Returns whether the register check ran."""
    assert compiled.metadata.shared <= SHARED_LIMIT, f"{what}: {compiled.metadata.shared} bytes of shared memory"
    usage = resource_usage(compiled)
    if usage is None:
        return False
    assert "LOCAL:0 " in usage and (not stack or "STACK:0 " in usage), f"{what} spills: {usage}"
    return True
