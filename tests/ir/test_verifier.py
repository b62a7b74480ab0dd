import pytest

import models
from mmrec_ir import Builder, VerifyError, f32, i64, parse, print_graph, verify

BASE = """graph @g(%x: f32[B, T, 8]) {
  param @w: f32[8] = ones
  %y: f32[B, T, 8] = rmsnorm(%x, @w) {eps = 1e-06}
  return y = %y
}
"""


def check(text: str, *fragments: str) -> str:
    with pytest.raises(VerifyError) as err:
        verify(parse(text))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_base_verifies():
    verify(parse(BASE))


def test_wrong_parameter_shape_names_node_op_expected_and_actual():
    check(BASE.replace("@w: f32[8]", "@w: f32[7]"), "%y (rmsnorm)", "weight", "expected shape [8]", "got [7]")


def test_wrong_declared_output_type():
    check(
        BASE.replace("%y: f32[B, T, 8] =", "%y: f32[B, T, 9] ="),
        "%y (rmsnorm)",
        "expected f32[B, T, 8]",
        "got f32[B, T, 9]",
    )


def test_unknown_op():
    check(BASE.replace("rmsnorm(", "rmsnrom("), "%y (rmsnrom)", "unknown op 'rmsnrom'")


def test_dangling_value():
    check(BASE.replace("rmsnorm(%x", "rmsnorm(%nowhere"), "%y (rmsnorm)", "%nowhere is not defined")


def test_dangling_output():
    check(BASE.replace("return y = %y", "return y = %z"), "output 'y'", "%z is not defined")


def test_value_defined_twice():
    text = BASE.replace("  return", "  %y: f32[B, T, 8] = neg(%x)\n  return")
    check(text, "%y is defined twice")


def test_unknown_and_missing_attributes():
    check(BASE.replace("{eps = 1e-06}", "{eps = 1e-06, bogus = 1}"), "unknown attribute 'bogus'")
    check(
        BASE.replace("%y: f32[B, T, 8] = rmsnorm(%x, @w) {eps = 1e-06}", "%y: f32[B, T, 8] = clamp(%x) {min = 0.0}"),
        "%y (clamp)",
        "missing required attribute 'max'",
    )


def test_wrong_operand_count():
    check(BASE.replace("rmsnorm(%x, @w)", "rmsnorm(%x)"), "expected 2 operands (x, weight), got 1")


def test_state_output_must_keep_its_type():
    graph = models.build(models.load_config("tiny"))
    text = print_graph(graph).replace("h.0 = %layer0.h_last", "h.0 = %layer0.gamma")
    check(text, "output 'h.0'", "expected f32[B, 128]", "got f32[B, T, 128]")


def test_model_level_shape_error_names_the_node():
    text = print_graph(models.build(models.load_config("tiny")))
    text = text.replace("param @layer1.w_g: f32[4, 32, 32]", "param @layer1.w_g: f32[4, 32, 31]")
    check(text, "%layer1.h (gated_recurrence)", "w_g")


def test_builder_reports_errors_as_ops_are_added():
    b = Builder("g")
    x = b.input("x", f32("B", "T", 8))
    ids = b.input("ids", i64("B", "T"))
    with pytest.raises(VerifyError, match=r"node %bad \(add\): rhs: expected shape \[B, T, 8\], got \[B, T\]"):
        b.add(x, ids, name="bad")
    y = b.linear(x, b.param("w", (6, 8)), splits=[2, 4], name=["p", "q"])
    assert y == ("%p", "%q")
    assert b.types["%q"] == f32("B", "T", 4)
