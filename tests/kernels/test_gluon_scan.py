"""The linear scan's persistent Gluon forward (kernels/scan/fwd_gluon.py).

Gluon has no interpreter, so on the CPU machine the kernel is compiled for sm_90 with the installed
Triton, and its SASS is checked for the two things its design rests on: no spills with OCC
programs an SM, and no CTA barrier per row (Triton 3.6 put one after every row stored into a
shared buffer, which is why h goes out from registers). On a Hopper GPU it is compared element by
element with the fp64 reference, launch after launch (hand-off races), across clamps and NaN."""

import dataclasses

import pytest
import torch

import kernels
from kernels.scan import fwd_gluon
from kernels.scan import kernel as scan_kernel
from kernels.scan import reference as scan_ref
from tests.kernels import sm90

needs_gluon = pytest.mark.skipif(fwd_gluon.gluon is None, reason="this Triton has no Gluon Hopper API")
REGISTERS = 65536  # a Hopper SM's register file, 32-bit registers


@pytest.fixture
def gluon_forward(monkeypatch):
    """A Hopper GPU's forward through the Gluon kernel at any size (the serial hand-off, which it
    serves), with no bound plan left by an earlier test."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is Hopper's")
    monkeypatch.setattr(kernels.knobs, "scan_gluon", True)
    monkeypatch.setattr(kernels.knobs, "scan_kernels", "serial")
    monkeypatch.setattr(fwd_gluon, "MIN_ELEMENTS", 0)  # e.g. (3, 1001, 1024) is below the size rule
    monkeypatch.setattr(fwd_gluon, "_PLANS", {})


def _compile_for_sm90(dtype: torch.dtype, width: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    try:
        from triton.experimental.gluon._runtime import GluonASTSource  # noqa: F401 (sm90.compile_sm90's)
        from triton.runtime.jit import mangle_type
    except ImportError as e:  # internals this test leans on moved
        pytest.skip(f"cannot compile Gluon ahead of time with this Triton: {e}")
    rows, block_c, warps, stages, occ = fwd_gluon.TILES
    x = torch.empty(2, 4 * rows, width, dtype=dtype)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
    desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, rows, block_c], layout)
    consts = {
        "C": width, "HAS_H0": True, "R": rows, "BC": block_c, "STAGES": stages, "SPIN_LIMIT": 1 << 26,
        "ROWS": gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), "CHAIN": True, "TRACE": False, "TR": None, "PDL": 0,
    }  # fmt: skip
    # A constexpr left out would be typed as a pointer below and compiled as one.
    unset = [p.name for p in fwd_gluon._scan_fwd.params if p.is_constexpr and p.name not in consts]
    assert not unset, f"constexprs of _scan_fwd this test does not set: {unset}"
    sig = {}
    for name in fwd_gluon._scan_fwd.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            sig[name] = mangle_type(desc)
        elif name in ("B", "T", "n_chunks", "base"):
            sig[name] = "i32"
        else:
            sig[name] = mangle_type(torch.empty(1, dtype=torch.int64 if name in ("LINK", "DESC") else dtype))
    # Pointers 16-byte aligned and T a multiple of 16, as Triton specializes them at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*") or n == "T"}
    return sm90.compile_sm90(
        fwd_gluon._scan_fwd, sig, consts, warps, attrs, maxnreg=fwd_gluon.max_registers(warps, occ)
    )


@needs_gluon
@pytest.mark.parametrize(("dtype", "width"), [(torch.bfloat16, 2048), (torch.float16, 1024)])
def test_the_kernel_compiles_for_sm90_without_a_barrier_per_row(dtype, width):
    compiled = _compile_for_sm90(dtype, width)
    _, _, warps, _, occ = fwd_gluon.TILES
    sm90.assert_fits(compiled, f"scan forward {dtype} C {width}")
    assert compiled.metadata.shared * occ <= 228 * 1024, "OCC programs' buffers do not fit one SM"
    usage = sm90.resource_usage(compiled)
    listing = sm90.sass(compiled)
    if usage is None or listing is None:
        pytest.skip("no cuobjdump beside this Triton")
    registers = int(usage.split("REG:")[1].split()[0])
    assert registers * 32 * warps * occ <= REGISTERS, f"{registers} registers: fewer than {occ} programs an SM"
    # A barrier per row would be 64 a pass (192 in all); the loop's own are a handful.
    assert listing.count("BAR.SYNC") < 32


def test_the_kernel_is_not_taken_where_it_cannot_run(monkeypatch):
    log_a = torch.zeros(4, 1024, 1024, dtype=torch.bfloat16)
    assert not fwd_gluon.usable(log_a, log_a)  # CPU tensors
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(fwd_gluon, "_major", lambda device: 9)  # the capability's major, cached per device
    assert fwd_gluon.usable(log_a, log_a) == (fwd_gluon.gluon is not None and kernels.knobs.scan_gluon)
    monkeypatch.setattr(kernels.knobs, "scan_gluon", True)
    if fwd_gluon.gluon is None:
        return
    assert fwd_gluon.usable(log_a, log_a)
    shifted = torch.zeros(log_a.numel() + 1, dtype=log_a.dtype)[1:].view(log_a.shape)
    assert not fwd_gluon.usable(shifted, shifted)  # a base off 16 bytes (a TMA descriptor's rule)
    assert not fwd_gluon.usable(log_a[..., :1000].contiguous(), log_a[..., :1000].contiguous())  # ragged blocks
    assert not fwd_gluon.usable(log_a[:, :8], log_a[:, :8])  # too small to pay for its launch
    assert not fwd_gluon.usable(log_a.float(), log_a.float())
    assert not fwd_gluon.usable(log_a, log_a.half())
    monkeypatch.setattr(fwd_gluon, "_major", lambda device: 10)  # not Hopper
    assert not fwd_gluon.usable(log_a, log_a)
    monkeypatch.setattr(fwd_gluon, "_major", lambda device: 9)
    monkeypatch.setattr(kernels.knobs, "scan_gluon", False)
    assert not fwd_gluon.usable(log_a, log_a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bsz", "steps", "width"), [(8, 4096, 2048), (3, 1001, 1024), (1, 1 << 17, 128)])
def test_gluon_forward_matches_the_reference_elementwise(bsz, steps, width, dtype, gluon_forward):
    """Unmasked chunks, a masked last chunk, and a chain of 2048 chunks down one column; whole
    rows of log_a at -80, 0.25, -inf and -0.0; NaN in two places."""
    torch.manual_seed(0)
    log_a = torch.rand(bsz, steps, width, device="cuda") * -0.5
    log_a[:, 100], log_a[:, 200], log_a[:, 300], log_a[:, 400] = -80.0, 0.25, float("-inf"), -0.0
    log_a[0, 500, 6] = log_a[-1, 600, 9] = float("nan")
    log_a = log_a.to(dtype)
    b = torch.randn(bsz, steps, width, device="cuda", dtype=dtype)
    h0 = torch.randn(bsz, width, device="cuda", dtype=dtype)
    assert fwd_gluon.usable(log_a, b)
    want_h, _ = scan_ref.forward(log_a.double(), b.double(), h0.double())
    real = ~torch.isnan(want_h)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    first = None
    # The fixture left no plan: launch 1 binds this shape; 2-10 take the bound kernel.
    compiled, direct, bound = None, fwd_gluon._launch.direct_calls, fwd_gluon._launch.bound_calls
    for i in range(10):
        if i % 3 == 2:  # new bases: the lean launcher's descriptors must follow them
            log_a, b, h0 = log_a.clone(), b.clone(), h0.clone()
        h, h_last = scan_kernel.scan_fwd(log_a, b, h0)
        compiled = len(fwd_gluon._launch.compiled) if compiled is None else compiled
        assert torch.equal(torch.isnan(h), ~real)
        torch.testing.assert_close(h.double()[real], want_h[real], **tol)
        assert torch.equal(h_last.view(torch.int16), h[:, -1].view(torch.int16))  # bit for bit, NaN included
        first = h if first is None else first
        assert torch.equal(h.view(torch.int16), first.view(torch.int16))  # the same bits every launch
    # Every launch was keyed, and launches 2-10 found the first one's kernel: the lean path
    # (kernels/launch.py), not Triton's.
    assert fwd_gluon._launch.direct_calls - direct == 10
    assert fwd_gluon._launch.bound_calls - bound == 9
    assert len(fwd_gluon._launch.compiled) == compiled
    assert len(fwd_gluon._PLANS) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bound_forwards_keep_each_kind_of_call_apart(gluon_forward):
    """One bound kernel per kind of call: with and without h0, h0 in another dtype or off a 16-byte
    boundary (Triton specializes both), the same elements in another shape. Calls alternate so
    that a plan used for the wrong kind would show in the values."""
    torch.manual_seed(0)

    def inputs(bsz, steps, width):
        log_a = (torch.rand(bsz, steps, width, device="cuda") * -0.5).bfloat16()
        return log_a, torch.randn(bsz, steps, width, device="cuda", dtype=torch.bfloat16)

    la, b = inputs(4, 640, 1024)
    la2, b2 = inputs(8, 320, 1024)  # the same number of elements
    h0 = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    off = torch.empty(4 * 1024 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(4, 1024)
    off.copy_(h0 * 2)
    assert off.data_ptr() % 16 != 0
    cases = [(la, b, None), (la, b, h0), (la, b, h0.float() * -1), (la, b, off), (la2, b2, None)]
    assert all(fwd_gluon.usable(x, y) for x, y, _ in cases)
    bound = fwd_gluon._launch.bound_calls
    for _ in range(3):
        for log_a, x, init in cases:
            h, h_last = scan_kernel.scan_fwd(log_a, x, init)
            want, _ = scan_ref.forward(log_a.double(), x.double(), None if init is None else init.double())
            torch.testing.assert_close(h.double(), want, rtol=1e-2, atol=1e-2)
            assert torch.equal(h_last, h[:, -1])
    assert len(fwd_gluon._PLANS) == len(cases)
    assert fwd_gluon._launch.bound_calls - bound == 2 * len(cases)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_launch_hook_sends_the_bound_forward_back_to_tritons_path(gluon_forward):
    """A profiler's launch hook (Proton's, say) must see every launch: with one set, the bound
    launch declines and Triton's own path runs and calls it; the result is the same."""
    import triton

    log_a = (torch.rand(4, 640, 1024, device="cuda") * -0.5).bfloat16()
    b = torch.randn(4, 640, 1024, device="cuda", dtype=torch.bfloat16)
    want, _ = scan_kernel.scan_fwd(log_a, b, None)  # binds this shape after its launch
    want, _ = scan_kernel.scan_fwd(log_a, b, None)  # the bound kernel
    seen = []
    hooks = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):  # Triton < 3.5: a plain callable
        pytest.skip("this Triton's launch hook is not a HookChain")
    hooks.add(seen.append)
    try:
        got, _ = scan_kernel.scan_fwd(log_a, b, None)
    finally:
        hooks.remove(seen.append)
    assert len(seen) == 1
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pdl", [1, 2])
def test_dependent_launches_wait_for_the_kernel_before(pdl, gluon_forward, monkeypatch):
    """With programmatic dependent launch each scan may start before the one before it ends. Here
    each scan reads the h the one before wrote (and shares its ticket counter and ring): eager
    and as a CUDA-graph replay, the bits must equal launches without it."""
    torch.manual_seed(0)
    log_a = (torch.rand(8, 4096, 2048, device="cuda") * -0.5).bfloat16()
    b = torch.randn(8, 4096, 2048, device="cuda", dtype=torch.bfloat16) * 0.01

    def chain():
        h = b
        for _ in range(6):
            h, h_last = scan_kernel.scan_fwd(log_a, h, None)
        return h, h_last

    want = chain()
    monkeypatch.setattr(fwd_gluon, "PDL", pdl)
    bound, compiled = fwd_gluon._launch.bound_calls, len(fwd_gluon._launch.compiled)
    for _ in range(3):
        got = chain()
        assert all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want, strict=True))
    assert fwd_gluon._launch.bound_calls - bound == 17  # the first call binds the plan
    assert len(fwd_gluon._launch.compiled) == compiled + 1  # a kernel of its own, launched with launch_pdl
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain()
    for _ in range(3):
        got[0].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want, strict=True))


@needs_gluon
def test_bound_descriptors_equal_checked_ones():
    """The bound forward builds its TMA descriptors without TensorDescriptor's checks; they must be
    the same descriptors field for field, defaults included (which a new Triton may add)."""
    x = torch.zeros(2, 256, 1024, dtype=torch.bfloat16)
    y = torch.ones(2, 256, 1024, dtype=torch.bfloat16)
    box, layout = [1, 64, 128], fwd_gluon._box_layout(16)
    checked = [fwd_gluon.TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout) for t in (x, y)]
    fast = fwd_gluon._descriptors(x, y, box, layout)
    assert list(fast) == checked
    assert all(type(d) is fwd_gluon.TensorDescriptor for d in fast)
    # Nothing beyond the dataclass's fields (which == compares), e.g. set by a newer __post_init__.
    fields = {f.name for f in dataclasses.fields(fwd_gluon.TensorDescriptor)}
    assert all(set(vars(d)) <= fields for d in checked)


@needs_gluon
def test_the_lean_launcher_keys_descriptors_by_type_not_address():
    """kernels/launch.py keys a host TMA descriptor as Triton specializes it (dtype, box, layout):
    new bases or shapes reuse the compiled kernel (the launcher encodes them each launch), a
    new box, dtype or layout does not."""
    from kernels.launch import _spec

    def spec(x, box=(1, 64, 128), bits=16):
        return _spec(fwd_gluon.TensorDescriptor(x, list(x.shape), list(x.stride()), list(box),
                                                fwd_gluon._box_layout(bits)))  # fmt: skip

    x = torch.zeros(2, 256, 1024, dtype=torch.bfloat16)
    assert spec(x) == spec(x.clone()) == spec(torch.zeros(3, 512, 2048, dtype=torch.bfloat16))
    assert spec(x) != spec(x, box=(1, 32, 128))
    assert spec(x) != spec(x.half())
    assert spec(x) != spec(x.float(), bits=32)
    assert hash(spec(x)) == hash(spec(x.clone()))
