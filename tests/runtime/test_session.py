"""DecodeSession: the state held in place (memory writes in place, CUDA graph on a GPU) gives
the same logits as one forward over the whole text, and its errors name what was wrong."""

from dataclasses import replace

import pytest
import torch

import runtime
from runtime.session import DecodeSession, SessionError
from tests.conftest import CUDA, INTERPRET, assert_close
from tests.runtime.helpers import VARIANTS, tiny_model

STEPS = 75  # blocks of 16: slots complete at several levels while decoding


def decode(session: DecodeSession, tokens: torch.Tensor, split: int) -> torch.Tensor:
    outs = [session.prefill(tokens[:, :split])]
    for t in range(split, tokens.shape[1]):
        outs.append(session.step(tokens[:, t]).clone()[:, None])
    return torch.cat(outs, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_session_equals_one_forward(variant):
    model = tiny_model(variant).eval()
    tokens = torch.randint(0, model.vocab_size, (2, STEPS))
    with torch.no_grad():
        full, _ = model(tokens)
    session = DecodeSession(model, batch=2)
    for split in (1, 17, 40):
        session.reset()
        assert_close(decode(session, tokens, split), full, rtol=1e-4, atol=1e-4, what=f"{variant} split {split}")


def test_session_state_stays_in_place_and_resets_rows():
    model = tiny_model().eval()
    tokens = torch.randint(0, model.vocab_size, (3, 40))
    session = DecodeSession(model, batch=3)
    before = [t.data_ptr() for t in session._tensors()]
    decode(session, tokens, 5)
    assert [t.data_ptr() for t in session._tensors()] == before
    session.reset([1])
    assert session.state.pos.tolist() == [40, 0, 40]
    with torch.no_grad():
        fresh, _ = model(tokens[1:2, :1])
    assert_close(session.step(tokens[:, 0])[1], fresh[0, -1], rtol=1e-5, atol=1e-5, what="row 1 after reset")


def test_session_errors_name_the_problem():
    model = tiny_model().eval()
    session = DecodeSession(model, batch=2)
    with pytest.raises(runtime.InputError, match=r"tokens: expected \[2\] \(one token per row\), got \[2, 1\]"):
        session.step(torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(runtime.InputError, match="tokens: ids must lie in"):
        session.step(torch.full((2,), 10**6, dtype=torch.int64))


def test_session_refuses_a_graph_that_reads_the_written_memory():
    model = tiny_model().eval()
    graph = model.graph
    write = next(n for n in graph.nodes if n.op == "memory_write")  # layer 0's
    reader = [n for n in graph.nodes if n.op == "hds_query"][-1]  # layer 1's: made to read it
    inputs = tuple(write.outputs[0].ref if ref.startswith("%mem.") else ref for ref in reader.inputs)
    bad = graph.with_nodes([replace(n, inputs=inputs) if n is reader else n for n in graph.nodes])
    with pytest.raises(SessionError, match="the written memory is read inside the step"):
        DecodeSession(runtime.CompiledModel(bad), batch=1)


@pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="the Triton write and query kernels need a GPU or TRITON_INTERPRET=1"
)
@pytest.mark.triton
def test_session_on_the_triton_kernels_equals_one_forward():
    device = "cuda" if CUDA else "cpu"
    model = tiny_model().to(device).eval()
    tokens = torch.randint(0, model.vocab_size, (2, 40), device=device)
    with torch.no_grad():
        full, _ = model(tokens)
    session = DecodeSession(model, batch=2, device=device)
    got = decode(session, tokens, 9)
    assert session.graphed == CUDA  # one CUDA-graph replay per token on a GPU
    assert_close(got.cpu(), full.cpu(), rtol=1e-4, atol=1e-4, what="session on Triton kernels")


@pytest.mark.skipif(not CUDA, reason="the CUDA graph and the TF32 tensor-core kernels need a GPU")
@pytest.mark.gpu
def test_session_with_tf32_matches_one_forward():
    """With TF32 on, the default pipeline's SwiGLU GEMM (its norm applied inside) is the
    persistent TMA kernel for the whole sequence's forward (exact fp32 leaves it to cuBLAS),
    and cuBLAS's two GEMMs in the session's steps (a token's step would copy the weights for
    the interleave: runtime/opset.py); the logits agree."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        from kernels.linear import kernel

        model = tiny_model().to("cuda").eval()
        assert any(n.op == "rms_linear_swiglu" for n in model.graph.nodes)  # the FFN norm inside
        tokens = torch.randint(0, model.vocab_size, (2, STEPS), device="cuda")  # 150 rows: the kernel pays
        launches = []
        real = kernel.linear_swiglu_fwd
        kernel.linear_swiglu_fwd = lambda *a: launches.append(a[0].shape[0]) or real(*a)
        try:
            with torch.no_grad():
                full, _ = model(tokens)
            assert launches == [2 * STEPS] * 2, launches  # one per layer
            session = DecodeSession(model, batch=2, device="cuda")
            got = decode(session, tokens, 9)
        finally:
            kernel.linear_swiglu_fwd = real
        assert launches == [2 * STEPS] * 2, launches  # the session's steps (and 18-row prefill) ran cuBLAS
        assert session.graphed
        # TF32 on both sides, summed in different orders (two GEMM paths, two layers): 7 of 307,200
        # logits differed by 5e-3 to 6.7e-3 on the H200, so the bound is 1e-2 (the GEMMs' own
        # accuracy against fp64 is tests/kernels' business)
        assert_close(got.cpu(), full.cpu(), rtol=1e-2, atol=1e-2, what="session with TF32")
    finally:
        torch.set_float32_matmul_precision(before)
