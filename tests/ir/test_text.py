import pytest

import models
from mmrec_ir import ParseError, from_json, load_json, parse, print_graph, save_json, to_json, verify

CONFIG_VARIANTS = [
    ("tiny", {}),
    ("tiny", {"recurrence": "linear"}),
    ("tiny", {"moe": {"experts": 4, "top_k": 2}, "uboo": True}),
    ("7b", {}),
]


@pytest.mark.parametrize(("name", "overrides"), CONFIG_VARIANTS)
def test_print_parse_round_trip_is_exact(name, overrides):
    graph = models.build(models.load_config(name, overrides))
    text = print_graph(graph)
    again = parse(text)
    assert again == graph
    assert print_graph(again) == text
    verify(again)


def test_json_round_trip(tmp_path):
    graph = models.build(models.load_config("tiny", {"uboo": True}))
    assert from_json(to_json(graph)) == graph
    save_json(graph, tmp_path / "g.json")
    assert load_json(tmp_path / "g.json") == graph


def test_attribute_values_round_trip():
    text = """graph @g(%x: f32[B, T, 4]) attributes {s = "a \\"q\\"", f = 1e-06, b = true, l = [1, 2.5, "x"]} {
  %y: f32[B, T, 4] = clamp(%x) {max = 1.0, min = -0.5}
  return y = %y
}
"""
    graph = parse(text)
    assert dict(graph.meta) == {"s": 'a "q"', "f": 1e-06, "b": True, "l": (1, 2.5, "x")}
    assert parse(print_graph(graph)) == graph


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("graph @g(%x: f32[B]) {\n  %y: f32[B] = neg(%x\n  return y = %y\n}", "line 3, column 3: expected ','"),
        ("graph @g(%x: q7[B]) {\n  return x = %x\n}", "unknown dtype 'q7'"),
        ("graph @g(%x: f32[B]) {\n  %y: f32[B] = neg(%x) $\n}", "line 2, column 24: unexpected character '$'"),
        ("graph @g(%x: f32[B]) {\n  return x = %x\n} trailing", "unexpected text after the graph"),
    ],
)
def test_parse_errors_name_line_and_column(text, fragment):
    with pytest.raises(ParseError, match=None) as err:
        parse(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
