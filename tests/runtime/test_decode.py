import pytest
import torch

import runtime
from runtime.opset import ReferenceOps
from tests.conftest import assert_close
from tests.runtime.helpers import VARIANTS, tiny_model

STEPS = 75  # blocks of 16: four full blocks and a partial one


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_steps_equals_one_forward_at_any_split(variant):
    model = tiny_model(variant).eval()
    tokens = torch.randint(0, model.vocab_size, (2, STEPS))
    with torch.no_grad():
        full, _ = model(tokens)
        for split in (1, 15, 16, 17, 40, STEPS - 1):
            logits, state = model(tokens[:, :split])
            outs = [logits]
            for t in range(split, STEPS):
                logits, state = model(tokens[:, t : t + 1], state)
                outs.append(logits)
            assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4, what=f"{variant} split {split}")


def test_chunked_prefill_equals_one_forward():
    model = tiny_model().eval()
    tokens = torch.randint(0, model.vocab_size, (3, STEPS))
    with torch.no_grad():
        full, _ = model(tokens)
        state, outs = None, []
        for lo, hi in [(0, 7), (7, 30), (30, 31), (31, 75)]:
            logits, state = model(tokens[:, lo:hi], state)
            outs.append(logits)
    assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4, what="chunked")


class NoMemory(ReferenceOps):
    def hds_query(self, q, k, v, beta, mem, residual=None, *, heads):
        return (torch.zeros_like(q) if residual is None else residual,)


def test_memory_changes_the_logits_of_tokens_past_the_first_block():
    """Guards the tests above: they compare something the memory influences."""
    model = tiny_model().eval()
    tokens = torch.randint(0, model.vocab_size, (1, 48))
    with torch.no_grad():
        with_memory, _ = model(tokens)
        model._ops[False] = NoMemory(training=False)
        without, _ = model(tokens)
    first_block = (with_memory[:, :16] - without[:, :16]).abs().max()
    later = (with_memory[:, 16:] - without[:, 16:]).abs().max()
    assert first_block == 0, "no slot is visible inside the first block"
    assert later > 1e-2


def test_state_round_trips_through_state_dict():
    model = tiny_model().eval()
    tokens = torch.randint(0, model.vocab_size, (2, 50))
    with torch.no_grad():
        _, state = model(tokens[:, :33])
        restored = runtime.State.from_state_dict(model.graph, state.state_dict())
        a, _ = model(tokens[:, 33:], state)
        b, _ = model(tokens[:, 33:], restored)
    assert torch.equal(a, b)
    assert state.state_dict()["format_version"] == 1
    with pytest.raises(runtime.StateError, match="format_version 99 is not supported"):
        runtime.State.from_state_dict(model.graph, {**state.state_dict(), "format_version": 99})


def test_reset_rows_makes_a_row_start_fresh():
    model = tiny_model().eval()
    history = torch.randint(0, model.vocab_size, (2, 40))
    tokens = torch.randint(0, model.vocab_size, (2, 20))
    with torch.no_grad():
        _, state = model(history)
        state = state.reset([1])
        assert state.pos.tolist() == [40, 0]
        mixed, _ = model(tokens, state)
        fresh, _ = model(tokens)
        carried, _ = model(torch.cat([history, tokens], 1))
    assert_close(mixed[1], fresh[1], what="reset row")
    assert_close(mixed[0], carried[0, 40:], rtol=1e-4, atol=1e-4, what="kept row")


def test_bad_tokens_and_state_are_one_line_errors():
    model = tiny_model()
    with pytest.raises(runtime.InputError, match=r"tokens: ids must lie in \[0, 2048\), got 5000"):
        model(torch.tensor([[1, 5000]]))
    with pytest.raises(runtime.InputError, match="got -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(runtime.InputError, match="expected an int64 tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(runtime.InputError, match="T = 0"):
        model(torch.zeros(2, 0, dtype=torch.long))
    _, state = model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(runtime.StateError, match="batch 2 does not match tokens batch 3"):
        model(torch.zeros(3, 1, dtype=torch.long), state)
