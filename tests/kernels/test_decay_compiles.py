"""The decay MLP kernel (kernels/decay) compiles for sm_90 (Hopper) on a machine without one, at
the model's bottleneck (R = 192, padded to 256) with the launch configs it uses: wgmma dots, no
register spills, and shared memory within the H100/H200's 227 KB. Triton's compiler runs on the
CPU, so CPU CI catches a config that would not fit."""

import os
import subprocess
import tempfile

import pytest
import torch
import triton

from kernels.decay import kernel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel runs on the GPU here")

SHARED_LIMIT = 227 * 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_mlp_compiles_for_sm90_without_spills(dtype):
    from triton.backends.compiler import GPUTarget

    bm, bk, bn, warps, stages = kernel.config(dtype)
    r_pad = kernel.padded_hidden(192)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    consts = {"PRECISION": "tf32" if dtype == torch.float32 else "ieee", "UPCAST": False, "R_PAD": r_pad}
    consts |= {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "STAGES": stages}
    blocks = {"XD": [bm, bk], "W1D": [r_pad, bk], "W2D": [bn, r_pad], "OD": [bm, bn]}

    def arg(a):
        if a in consts:
            return "constexpr"
        if a in blocks:
            return f"tensordesc<{name}{blocks[a]}>"
        return f"*{name}" if a in ("B1", "B2") else "i32"

    fn = kernel._mlp_fwd
    source = triton.compiler.ASTSource(fn=fn, signature={a: arg(a) for a in fn.arg_names}, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps})
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= SHARED_LIMIT, f"{compiled.metadata.shared} bytes of shared memory"
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("no cuobjdump in this Triton wheel to read the register use")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = [row for row in usage.splitlines() if "REG:" in row][-1]
    assert "STACK:0 " in line and "LOCAL:0 " in line, f"spills: {line.strip()}"
