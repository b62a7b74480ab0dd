"""The fusion report counts what fusion changes: ops and per-token activation bytes."""

import models
import passes
from mmrec_ir import parse


def test_residual_norm_fusion_saves_one_read_in_the_report():
    before = parse("""graph @g(%a: f32[B, T, 8], %b: f32[B, T, 8]) {
  param @w: f32[8] = ones
  %layer0.x: f32[B, T, 8] = add(%a, %b)
  %layer0.u: f32[B, T, 8] = rmsnorm(%layer0.x, @w) {eps = 1e-05}
  return u = %layer0.u, x = %layer0.x
}
""")
    after = passes.run_pipeline(before, passes.lookup("fuse-residual-norm")).graph
    b, a = passes.block_costs(before)["layer0"], passes.block_costs(after)["layer0"]
    # add reads 2 and writes 1 row, rmsnorm reads 1 and writes 1: 5 x 8 x 4 bytes; fused: 4 rows.
    assert (b.ops, b.kernels, b.bytes_per_token) == (2, 2, 5 * 32)
    assert (a.ops, a.kernels, a.bytes_per_token) == (1, 1, 4 * 32)
    assert a.by_op == {"add_rmsnorm": 1}


def test_model_report_has_every_block_and_a_total():
    graph = models.build(models.load_config("tiny"))
    result = passes.run_pipeline(graph, passes.default_pipeline())
    text = passes.fusion_report(graph, result.graph)
    assert "layer0" in text and "layer1" in text and "// total" in text
    before, after = passes.block_costs(graph), passes.block_costs(result.graph)
    assert sum(c.ops for c in after.values()) < sum(c.ops for c in before.values())
    assert sum(c.bytes_per_token for c in after.values()) < sum(c.bytes_per_token for c in before.values())


def test_decay_fusion_removes_the_tail_kernels_and_gamma():
    """mdi_decay's tail (2 sigmoids, product, clamp: 9 rows of D) goes, and the recurrence reads the
    two logits instead of gamma (one more row): 8 x D x 4 bytes fewer per token and 4 kernels."""
    cfg = models.load_config("tiny")
    graph = passes.run_pipeline(models.build(cfg), passes.lookup("infer-shapes")).graph
    fused = passes.run_pipeline(graph, passes.lookup("fuse-decay-recurrence")).graph
    b, a = passes.block_costs(graph)["layer0"], passes.block_costs(fused)["layer0"]
    assert b.kernels - a.kernels == 4
    assert b.bytes_per_token - a.bytes_per_token == 8 * cfg.d_model * 4


def test_op_table_lists_one_block_op_by_op_and_sums_to_its_row():
    import re

    graph = models.build(models.load_config("tiny"))
    result = passes.run_pipeline(graph, passes.default_pipeline())
    text = passes.fusion_report(graph, result.graph)
    table = text[text.index("// layer1 op by op") :].splitlines()[2:]
    before = [cell.split("|")[0] for cell in table]
    after = [cell.split("|")[1] for cell in table if "|" in cell]
    assert any("mdi_decay (10 kernels)" in c for c in before) and any("linear_residual" in c for c in after)

    def total(cells):
        return sum(int(m.group(1).replace(",", "")) for c in cells if (m := re.search(r"([\d,]+)\s*$", c.strip())))

    costs_before, costs_after = passes.block_costs(graph)["layer1"], passes.block_costs(result.graph)["layer1"]
    assert total(before) == costs_before.bytes_per_token and total(after) == costs_after.bytes_per_token
