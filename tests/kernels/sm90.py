"""Compiling Triton kernels for sm_90 (Hopper) on the CPU machine: Triton's compiler runs without a
GPU, so CPU CI can check that a kernel lowers to the instructions we expect, fits shared memory
and does not spill registers (with this machine's Triton; the GPU machine's may differ)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton

SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on the H100/H200


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, attrs: dict | None = None):
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})


def resource_usage(compiled) -> str | None:
    """cuobjdump's resource line for the kernel (registers, stack, local memory), or None where
    the Triton wheel ships no cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
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
