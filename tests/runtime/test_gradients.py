import pytest
import torch
import torch.nn.functional as F

from tests.runtime.helpers import VARIANTS, tiny_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_gets_a_nonzero_gradient_on_a_three_block_segment(variant):
    """The original design's bug: W_q, W_v and W_g received no gradient. W_q and W_v are
    row blocks of the fused projection, so each block is checked on its own."""
    model = tiny_model(variant, spread=0.05).train()
    block = model.graph.inputs[2].type.block
    tokens = torch.randint(0, model.vocab_size, (2, 3 * block + 1))
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out[0].flatten(0, 1), tokens[:, 1:].flatten())
    if out.aux is not None:
        loss = loss + out.aux
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"

    cfg_d = model.graph.inputs[1].type.shape[1]
    kd = model.graph.inputs[2].type.heads * model.graph.inputs[2].type.dim
    sizes = {"q": cfg_d, "k": kd, "v": kd, "z": cfg_d, "gz": cfg_d}
    for i in range(2):
        grad = model.get_parameter(f"layer{i}.w_in").grad
        for name, rows in zip(sizes, grad.split(list(sizes.values())), strict=True):
            assert rows.abs().sum() > 0, f"layer{i}: W_{name} rows of w_in get no gradient"
