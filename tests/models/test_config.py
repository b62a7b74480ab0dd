import pytest

import models
from models import ConfigError


@pytest.mark.parametrize("name", ["tiny", "125m", "1.3b", "7b"])
def test_bundled_configs_load_and_build(name):
    cfg = models.load_config(name)
    graph = models.build(cfg)
    assert cfg.vocab_size > 0 and graph.param_count() > 0


def test_sizes_are_what_the_names_say():
    counts = {n: models.build(models.load_config(n)).param_count() for n in ("125m", "1.3b", "7b")}
    assert 100e6 < counts["125m"] < 150e6
    assert 1.2e9 < counts["1.3b"] < 1.6e9
    assert 6e9 < counts["7b"] < 7.5e9
    big = models.load_config("7b")
    assert (big.d_model, big.n_layers, big.memory.heads, big.memory.slots[-1]) == (4096, 24, 8, 1024)
    assert big.train.seq_len >= 32768


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("d_model: -3\n", "field 'd_model': expected a positive value, got -3"),
        ("d_modle: 64\n", "field 'd_modle': unknown field"),
        ("n_heads: three\n", "field 'n_heads': expected an integer, got 'three'"),
        ("memory: {slots: [8, 0]}\n", "field 'memory.slots': expected a list of positive integers"),
        ("memory: {heads: 3}\n", "field 'memory.heads': n_heads 4 is not a multiple of 3"),
        ("recurrence: lstm\n", "field 'recurrence': expected 'gated' or 'linear', got 'lstm'"),
        ("train: {lr: fast}\n", "field 'train.lr': expected a number, got 'fast'"),
        ("moe: {experts: 2, top_k: 3}\n", "field 'moe.top_k': 3 exceeds moe.experts 2"),
        ("uboo: maybe\n", "field 'uboo': expected true or false"),
        ("d_model: [1\n", "not valid YAML at line"),
        ("- a\n- b\n", "expected a mapping of fields"),
    ],
)
def test_config_errors_name_the_field(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        models.load_config(path)
    assert message in str(err.value)
    assert str(err.value).startswith("config bad.yaml: ")
    assert "\n" not in str(err.value)


def test_unknown_config_name():
    with pytest.raises(
        ConfigError, match=r"config 'huge': no such file, and not a bundled config \(1\.3b, 125m, 7b, tiny\)"
    ):
        models.load_config("huge")


def test_block_graph_runs_and_the_pipeline_keeps_its_numerics():
    import torch

    import passes
    from models import Config, build_block
    from runtime.module import CompiledModel

    graph = build_block(Config(d_model=32, n_heads=4, ffn_hidden=64, n_layers=1))
    assert [v.name for v in graph.inputs] == ["x_in", "h.0", "mem.0"]
    outs = []
    for pipeline in (passes.lookup(["infer-shapes"]), passes.default_pipeline()):
        model = CompiledModel(passes.run_pipeline(graph, pipeline).graph, seed=3)
        state = model.initial_state(2)
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
        params = dict(model.named_parameters())
        outs.append(model._forward_fn(x, state["h.0"], state["mem.0"], params=params, ops=model._ops[True]))
    for name in ("x", "h.0"):
        torch.testing.assert_close(outs[0][name], outs[1][name], rtol=1e-5, atol=1e-6)
