"""The Triton linear scan vs its reference and a naive loop: odd shapes, fp32/bf16, all gradients,
outputs poisoned with NaN. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.scan import kernel, reference
from tests.conftest import TRITON_DEVICE, assert_close
from tests.kernels.test_linear_scan import naive

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True, params=["serial", "lookback", "walk"])
def scan_kernels(request, monkeypatch):
    """Every test runs with each pair of kernels: the chained ones with either hand-off (the
    default picks by width), and the walk."""
    monkeypatch.setattr(kernels.knobs, "poison_outputs", True)
    monkeypatch.setattr(kernels.knobs, "autotune", False)  # tuning every odd shape costs minutes
    monkeypatch.setattr(kernels.knobs, "scan_kernels", request.param)
    return request.param


def make(bsz, steps, width, dtype, with_h0=True):
    log_a = (torch.rand(bsz, steps, width) * -3).to(dtype)
    log_a[0, 0, 0] = -80.0  # clamped below: zero gradient
    log_a[-1, -1, -1] = 0.5  # clamped above: a = 1, zero gradient
    b = torch.randn(bsz, steps, width).to(dtype)
    h0 = torch.randn(bsz, width).to(dtype) if with_h0 else None
    return [t.to(TRITON_DEVICE) if t is not None else None for t in (log_a, b, h0)]


# (37, 32): whole column blocks, so the backward's unmasked pipelined loop runs as well
@pytest.mark.parametrize(("steps", "width"), [(1, 3), (37, 20), (500, 5), (37, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("scan_kernels", ["serial", "lookback", "walk"], indirect=True)
def test_triton_scan_matches_reference(steps, width, dtype, with_h0, scan_kernels):
    if scan_kernels == "lookback" and steps == 500:
        pytest.skip("63 chunks: the look-back is slow to interpret; test_chains_cross_many_chunks covers long chains")
    log_a, b, h0 = make(2, steps, width, dtype, with_h0)
    leaves = [t.requires_grad_() for t in (log_a, b, h0) if t is not None]
    h, h_last = kernels.linear_scan(log_a, b, h0)
    dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
    grads = torch.autograd.grad((h.float() * dh.float()).sum() + (h_last.float() * dlast.float()).sum(), leaves)

    cpu = [t.detach().cpu().double() if t is not None else None for t in (log_a, b, h0)]
    ref_h, ref_last = reference.forward(*cpu)
    ref_grads = reference.backward(cpu[0], ref_h, cpu[2], dh.cpu().double(), dlast.cpu().double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert_close(h.cpu(), ref_h, what="h", **tol)
    assert_close(h_last.cpu(), ref_last, what="h_last", **tol)
    for name, g, r in zip(["log_a", "b", "h0"], grads, ref_grads, strict=False):
        assert g.dtype == dtype
        assert_close(g.cpu(), r, what=f"d{name}", **tol)
    assert grads[0][0, 0, 0] == 0 and grads[0][-1, -1, -1] == 0


@pytest.mark.parametrize("scan_kernels", ["chained"], indirect=True)
def test_triton_scan_matches_the_naive_loop(scan_kernels):
    log_a, b, h0 = make(2, 9, 3, torch.float32)
    h, _ = kernels.linear_scan(log_a, b, h0)
    assert_close(h.cpu(), naive(log_a.cpu(), b.cpu(), h0.cpu()).float(), what="h")


def test_chains_cross_many_chunks_and_channel_blocks(scan_kernels):
    # 130 rows = 17 chunks of 8 under the interpreter (the two-slot ring wraps many times; the
    # backward's output pass runs 2 sub-tiles of 4 per chunk), 70 channels = 5 blocks of 16 with
    # a ragged last one, fp32 and bf16, forward and backward.
    # (The look-back's hand-offs do not depend on the dtype, and its windows are slow to
    # interpret: fp32 only.)
    for dtype in (torch.float32,) if scan_kernels == "lookback" else (torch.float32, torch.bfloat16):
        log_a, b, h0 = make(3, 130, 70, dtype)
        h, h_last = kernel.scan_fwd(log_a, b, h0)
        cpu = [t.cpu().double() for t in (log_a, b, h0)]
        ref_h, ref_last = reference.forward(*cpu)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        assert_close(h.cpu(), ref_h, what=f"h ({scan_kernels}, {dtype})", **tol)
        assert_close(h_last.cpu(), ref_last, what=f"h_last ({scan_kernels}, {dtype})", **tol)
        dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
        grads = kernel.scan_bwd(log_a, h, h0, dh, dlast)
        ref_grads = reference.backward(cpu[0], h.cpu().double(), cpu[2], dh.cpu().double(), dlast.cpu().double())
        for name, g, r in zip(["log_a", "b", "h0"], grads, ref_grads, strict=True):
            assert_close(g.cpu(), r, what=f"d{name} ({scan_kernels}, {dtype})", **tol)


def test_a_nan_log_a_stays_nan_as_in_the_reference(scan_kernels):
    # torch.clamp propagates NaN; a kernel clamp that dropped it would turn NaN into a = e^-50.
    log_a, b, h0 = make(2, 20, 33, torch.float32)
    log_a[1, 5, 7] = float("nan")
    h, h_last = kernel.scan_fwd(log_a, b, h0)
    ref_h, ref_last = reference.forward(log_a.cpu(), b.cpu(), h0.cpu())
    assert torch.isnan(ref_h).sum() == 15
    assert torch.equal(torch.isnan(h.cpu()), torch.isnan(ref_h)), scan_kernels
    assert torch.equal(torch.isnan(h_last.cpu()), torch.isnan(ref_last)), scan_kernels


def test_zero_steps_give_h0_and_pass_the_gradient_through(scan_kernels):
    # Only the launchers see T = 0 (linear_scan rejects it): h is empty, h_last is h0, and
    # the backward hands dh_last to dh0.
    log_a, b, h0 = make(2, 1, 5, torch.float32)
    log_a, b = log_a[:, :0], b[:, :0]
    h, h_last = kernel.scan_fwd(log_a, b, h0)
    assert h.shape == (2, 0, 5)
    assert torch.equal(h_last, h0)
    dlast = torch.randn_like(h0)
    dlog_a, db, dh0 = kernel.scan_bwd(log_a, h, h0, torch.zeros_like(h), dlast)
    assert dlog_a.shape == db.shape == (2, 0, 5)
    assert torch.equal(dh0, dlast)


@pytest.mark.parametrize("scan_kernels", ["serial", "lookback"], indirect=True)
def test_a_hand_off_that_never_comes_gives_nan_not_a_hang(monkeypatch, scan_kernels):
    # A ticket counter that starts one chunk late (standing in for any broken hand-off): chunk
    # 1 waits for chunk 0, which the interpreter runs only last (the last ticket wraps the
    # counter to 0). The polls give up after SPIN_LIMIT and chunks 1 and 2 are NaN, where a
    # GPU would otherwise hang. With look-back chunk 2 finds no INCL either (SPARSE: chunk 1
    # publishes none), so the same chunks are NaN.
    monkeypatch.setattr(kernel, "SPIN_LIMIT", 20)
    log_a, b, h0 = make(1, 20, 16, torch.float32)  # 3 chunks of 8 rows, 1 channel block

    def late_link(bsz, width, device):
        link = torch.zeros(1 + 2 * bsz * width, dtype=torch.int64, device=device)
        link[0] = 1  # one chunk's worth of tickets already taken
        return link

    monkeypatch.setattr(kernel, "_link", late_link)
    h, h_last = kernel.scan_fwd(log_a, b, h0)
    assert torch.isnan(h[:, 8:]).all() and torch.isnan(h_last).all()


@pytest.mark.parametrize("scan_kernels", ["serial"], indirect=True)
def test_chained_launches_leave_the_ring_zero_for_the_next(monkeypatch, scan_kernels):
    # The ticket counter and ring are reused without a memset: each launch must hand them on
    # all zero, whatever its shape (one chunk, several, ragged channels, h0 or not).
    monkeypatch.setattr(kernel, "_RINGS", {})
    for bsz, steps, width, with_h0 in ((2, 20, 33, True), (1, 5, 16, False), (3, 17, 40, False)):
        log_a, b, h0 = make(bsz, steps, width, torch.float32)
        h0 = h0 if with_h0 else None
        h, h_last = kernel.scan_fwd(log_a, b, h0)
        (ring,) = kernel._RINGS.values()
        assert not ring.any(), f"forward B{bsz} T{steps} C{width} left {int(ring.count_nonzero())} words set"
        want_h, _ = reference.forward(log_a, b, h0)
        torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
        kernel.scan_bwd(log_a, h, h0, torch.randn_like(h), torch.randn_like(h_last))
        assert not ring.any(), f"backward B{bsz} T{steps} C{width} left {int(ring.count_nonzero())} words set"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scan_kernels", ["serial"], indirect=True)
def test_word_chunks_and_the_unmasked_backward_match_the_reference(monkeypatch, dtype, scan_kernels):
    # bf16/fp16 at an even width: the forward holds chunks as raw words (`_scan_fwd_words`; masked
    # chunks at T 21 and 5 words a 8-word block, unmasked at T 16 and C 32); T a multiple of the
    # chunk and C of the channel block: the backward without its masked path (EVEN). A base that
    # is not 4-byte aligned falls back to the channel pairs. The ring is left zero each time.
    monkeypatch.setattr(kernel, "_RINGS", {})
    taken = []

    def spy(name):
        launch = getattr(kernel, name)
        return lambda *args, **meta: taken.append((name, meta.get("EVEN"))) or launch(*args, **meta)

    for name in ("_launch_fwd_words", "_launch_fwd_chained", "_launch_bwd_chained"):
        monkeypatch.setattr(kernel, name, spy(name))
    block_c, rows = kernel._chain_tile()  # 16 channels and 8 rows under the interpreter
    for bsz, steps, width, offset in ((2, 16, 32, 0), (1, 21, 10, 0), (1, 16, 32, 1)):
        log_a, b, h0 = make(bsz, steps, width, dtype)  # a log_a clamped below and one above
        if offset:  # a 2-byte offset base
            b = torch.empty(b.numel() + 1, dtype=dtype, device=b.device)[1:].view_as(b).copy_(b)
        taken.clear()
        h, h_last = kernel.scan_fwd(log_a, b, h0)
        dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
        grads = kernel.scan_bwd(log_a, h, h0, dh, dlast)
        even = steps % rows == 0 and width % block_c == 0
        assert taken == [
            ("_launch_fwd_chained" if offset else "_launch_fwd_words", None),
            ("_launch_bwd_chained", even),
        ], taken
        (ring,) = kernel._RINGS.values()
        assert not ring.any()
        cpu = [t.cpu().double() for t in (log_a, b, h0)]
        ref_h, ref_last = reference.forward(*cpu)
        assert_close(h.cpu(), ref_h, what=f"h B{bsz} T{steps} C{width}", rtol=2e-2, atol=2e-2)
        assert_close(h_last.cpu(), ref_last, what="h_last", rtol=2e-2, atol=2e-2)
        assert torch.equal(h_last, h[:, -1])  # bit for bit: both from the output pass
        ref_grads = reference.backward(cpu[0], h.cpu().double(), cpu[2], dh.cpu().double(), dlast.cpu().double())
        for name, g, r in zip(["log_a", "b", "h0"], grads, ref_grads, strict=True):
            assert_close(g.cpu(), r, what=f"d{name} B{bsz} T{steps} C{width}", rtol=2e-2, atol=2e-2)
        log_a[0, 3, 5] = float("nan")  # the words' clamp keeps it, as torch.clamp does: channel 5 NaN from row 3
        h, _ = kernel.scan_fwd(log_a, b, h0)
        ref_h, _ = reference.forward(log_a.cpu().double(), cpu[1], cpu[2])
        assert torch.isnan(ref_h).sum() == steps - 3 and torch.equal(torch.isnan(h.cpu()), torch.isnan(ref_h))


@pytest.mark.parametrize("scan_kernels", ["lookback"], indirect=True)
def test_lookback_descriptors_serve_launch_after_launch_and_survive_the_tag_wrap(monkeypatch, scan_kernels):
    # The descriptors are never cleared between launches: each launch tags above the last one,
    # so words left by a launch of another shape never pass for this launch's. Near the int32
    # tag limit the buffer is zeroed and the tags start again.
    monkeypatch.setattr(kernel, "_DESCS", {})
    rows = kernel._chain_tile()[1]  # 8 rows a chunk under the interpreter, 32 on the GPU
    for i, (bsz, steps, width) in enumerate(((2, 40, 33), (1, 70, 16), (2, 40, 33), (1, 17, 40))):
        if i == 3:  # fewer words than the first launch's: fits the buffer, so the wrap (not a growth) zeroes it
            (entry,) = kernel._DESCS.values()
            buffer = entry[0]
            entry[1] = kernel.TAG_LIMIT - 5
        log_a, b, h0 = make(bsz, steps, width, torch.float32)
        h, h_last = kernel.scan_fwd(log_a, b, h0)
        want_h, want_last = reference.forward(log_a, b, h0)
        torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_last, want_last, rtol=1e-5, atol=1e-5)
        dh, dlast = torch.randn_like(h), torch.randn_like(h_last)
        grads = kernel.scan_bwd(log_a, h, h0, dh, dlast)
        for g, r in zip(grads, reference.backward(log_a, h, h0, dh, dlast), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    (entry,) = kernel._DESCS.values()
    span = 2 * -(-17 // rows) + 3  # the tags one launch of 17 steps takes
    assert entry[0] is buffer and entry[1] == 1 + 2 * span  # wrapped: base 1, then a forward and a backward


@pytest.mark.parametrize("scan_kernels", ["lookback"], indirect=True)
def test_lookback_never_takes_an_earlier_launchs_descriptor(monkeypatch, scan_kernels):
    # The interpreter runs chunks in ticket order, so a window is always rewritten before it is
    # read. A counter that starts one chunk late makes chunk 1 read chunk 0's descriptor before
    # this launch writes it: it holds the previous launch's words (same shape, same slots), whose
    # tags must not pass for this launch's, so the carry times out to NaN.
    monkeypatch.setattr(kernel, "_DESCS", {})
    log_a, b, h0 = make(1, 20, 16, torch.float32)
    kernel.scan_fwd(log_a, b, h0)
    monkeypatch.setattr(kernel, "SPIN_LIMIT", 20)

    def late_link(bsz, width, device):
        link = torch.zeros(1 + 2 * bsz * width, dtype=torch.int64, device=device)
        link[0] = 1
        return link

    monkeypatch.setattr(kernel, "_link", late_link)
    h, h_last = kernel.scan_fwd(log_a, b * 2, h0)
    assert torch.isnan(h[:, 8:16]).all() and torch.isnan(h_last).all()


def test_chained_hand_off_is_picked_by_width(monkeypatch):
    monkeypatch.setattr(kernels.knobs, "scan_kernels", "chained")
    assert kernel._hand_off(1, 256, 128, 128)  # 2 programs a chunk row: look-back
    assert kernel._hand_off(8, 512, 128, 128)  # 32
    assert not kernel._hand_off(8, 2048, 128, 128)  # 128: the serial chain
    assert not kernel._hand_off(1, 256, 128, 1 << 20)  # descriptors over LOOKBACK_BYTES
    monkeypatch.setattr(kernels.knobs, "scan_kernels", "serial")
    assert not kernel._hand_off(1, 256, 128, 128)
    monkeypatch.setattr(kernels.knobs, "scan_kernels", "lookback")
    assert kernel._hand_off(8, 2048, 128, 128)


@pytest.mark.parametrize("scan_kernels", ["walk"], indirect=True)
def test_unknown_forward_kernel_is_a_clear_error(monkeypatch, scan_kernels):
    monkeypatch.setattr(kernels.knobs, "scan_kernels", "fast")
    log_a, b, h0 = make(1, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="MMREC_SCAN='fast': expected chained, serial, lookback or walk"):
        kernel.scan_fwd(log_a, b, h0)


def test_triton_scan_launchers_write_every_element():
    log_a, b, h0 = make(3, 45, 33, torch.float32)
    h, h_last = kernel.scan_fwd(log_a, b, h0)
    grads = kernel.scan_bwd(log_a, h, h0, torch.randn_like(h), torch.randn_like(h_last))
    for t in (h, h_last, *grads):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("scan_kernels", ["chained"], indirect=True)
def test_non_contiguous_inputs_are_made_contiguous(scan_kernels):
    log_a, b, h0 = make(2, 17, 6, torch.float32)
    strided = torch.empty(2, 17, 12, device=b.device)[:, :, ::2]
    strided.copy_(b)
    assert not strided.is_contiguous()
    h, _ = kernels.linear_scan(log_a, b, h0)
    h2, _ = kernels.linear_scan(log_a, strided, h0)
    assert torch.equal(h, h2)


@pytest.mark.parametrize("use", ["h", "h_last"])
@pytest.mark.parametrize("scan_kernels", ["serial", "lookback"], indirect=True)
def test_triton_scan_gradients_when_one_output_is_unused(use, scan_kernels):
    # Autograd passes None (not zeros) for the unused output's gradient: the kernels take that path.
    log_a, b, h0 = make(2, 21, 5, torch.float32)
    leaves = [t.requires_grad_() for t in (log_a, b, h0)]
    h, h_last = kernels.linear_scan(log_a, b, h0)
    out = h if use == "h" else h_last
    seed = torch.randn_like(out)
    grads = torch.autograd.grad((out * seed).sum(), leaves)
    cpu = [t.detach().cpu().double() for t in (log_a, b, h0)]
    ref_h, ref_last = reference.forward(*cpu)
    dh = seed.cpu().double() if use == "h" else torch.zeros_like(ref_h)
    dlast = seed.cpu().double() if use == "h_last" else torch.zeros_like(ref_last)
    for name, g, r in zip(
        ["log_a", "b", "h0"], grads, reference.backward(cpu[0], ref_h, cpu[2], dh, dlast), strict=True
    ):
        assert_close(g.cpu(), r, what=f"d{name}", rtol=1e-5, atol=1e-5)
