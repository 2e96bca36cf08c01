"""Ops whose output gradient has provably zero rows read only the live rows (passes/live_rows.py):
the analysis on captured joint graphs (no compile), then exactness, bytes and the report on
compiled models."""

import pytest
import torch
from torch import nn

import wtacrs_compile
from wtacrs_compile.passes.live_rows import LiveRows, find_live_rows, rewrite_with_live_rows
from wtacrs_compile.passes.match_matmuls import find_weight_grad_matmuls
from wtacrs_compile.graph_utils import partition_saved

from stage_harness import capture_joint
from test_saved_bytes import autograd_saved_bytes
from tiny_models import tiny_bert_classifier

B, L, D = 3, 8, 16


class Head(nn.Module):
    """A block (linear, GeLU, linear, residual, LayerNorm) and a head that reads the tokens
    ``reads`` picks: ``[CLS]`` (position 0), the last position, two positions, or all (mean)."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.reads = reads
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))
        if self.reads == "cls":
            h = h[:, 0]
        elif self.reads == "last":
            h = h[:, -1]
        elif self.reads == "two":
            h = h[:, 0] + h[:, 3]
        else:
            h = h.mean(1)
        return self.head(h)


def _found(reads: str):
    torch.manual_seed(0)
    joint = capture_joint(Head(reads), torch.randn(B, L, D))
    graph = joint.graph()
    sites = find_weight_grad_matmuls(graph, joint.params)
    # no module names in an aot_function capture: up reads D columns, down 4D, head B rows
    by_module = {{D: "up", 4 * D: "down"}[s.d] if s.n == B * L else "head": s for s in sites}
    return joint, graph, sites, by_module, find_live_rows(graph, sites)


@pytest.mark.parametrize("reads, start", [("cls", 0), ("last", L - 1)])
def test_a_head_that_reads_one_token_leaves_every_lth_row_live(reads, start):
    _, _, _, by_module, found = _found(reads)
    for fqn in ("up", "down"):  # the block's two linears; the head's N is the batch
        assert found[by_module[fqn].node] == LiveRows(start=start, step=L, count=B, n=B * L)
    assert by_module["head"].node not in found


def test_every_row_live_finds_nothing():
    _, _, _, _, found = _found("mean")
    assert found == {}


def test_rows_that_are_not_evenly_strided_are_reported_not_used():
    _, _, _, by_module, found = _found("two")
    reason = found[by_module["up"].node]
    assert isinstance(reason, str) and f"{2 * B} of {B * L} rows" in reason and "not an evenly strided set" in reason


def test_the_rewrite_saves_the_live_rows_only():
    joint, graph, sites, by_module, found = _found("cls")
    before = partition_saved(graph, list(joint.static)).activations
    nodes = {n.name: n for n in graph.nodes}
    for site in sites:
        if site.node in found:
            rewrite_with_live_rows(graph, nodes[site.node], site, found[site.node])
    graph.eliminate_dead_code()
    after = partition_saved(graph, list(joint.static)).activations
    rows = B * L * 4 * D * 4  # the GeLU output, the down projection's X, in full
    # before: saved in full (beside the GeLU input, which GeLU's backward needs); after: its
    # live rows are recomputed from that input, and the input x's B live rows are saved
    assert sorted(before.values()).count(rows) == 2 and sorted(after.values()).count(rows) == 1
    assert B * D * 4 in after.values()
    assert sum(after.values()) < sum(before.values()) - rows + B * 4 * D * 4 + B * D * 4


def _bert_step(model, fn, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = fn(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bert_classifier_gradients_equal_inductors_and_the_report_says_why():
    torch.manual_seed(0)
    model = tiny_bert_classifier(layers=2).train()
    ids, labels = torch.randint(0, 100, (4, 16)), torch.tensor([0, 1, 1, 0])
    ref_loss, ref = _bert_step(model, torch.compile(model, backend="inductor"), ids, labels)
    backend = wtacrs_compile.backend(ratio=1.0)  # nothing sampled: only the exact rewrite
    loss, got = _bert_step(model, torch.compile(model, backend=backend), ids, labels)
    assert torch.equal(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    ops = {op.module: op for op in backend.reports[-1].ops}
    last = "bert.encoder.layer.1."
    live = {m for m, op in ops.items() if op.decision == "live_rows"}
    # Q, the attention output and both FFN linears of the last layer see only [CLS] rows;
    # K and V gradients reach every key position.
    assert live == {last + m for m in ("attention.self.query", "attention.output.dense",
                                       "intermediate.dense", "output.dense")}
    op = ops[last + "output.dense"]
    assert op.k == 4 and op.shapes["x"] == [64, 64]
    assert op.saved_bytes_after == 4 * 64 * 4 and op.flops_after * 16 == op.flops_before
    assert "4 of 64 rows of G can be non-zero (rows 0, 16, ... (every 16))" in op.reason


def _compiled_step(live_rows: bool):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_bert_classifier(layers=2).train()
    ids, labels = torch.randint(0, 100, (4, 16)), torch.tensor([0, 1, 1, 0])
    backend = wtacrs_compile.backend(mode="all", ratio=0.3, memory_budget=None, live_rows=live_rows)
    compiled = torch.compile(model, backend=backend)
    _bert_step(model, compiled, ids, labels)
    measured = autograd_saved_bytes(lambda x: compiled(input_ids=x, labels=labels).loss, model, ids)
    return backend.reports[-1], measured


@pytest.mark.slow  # 31 s on CI's 2 cores; forward draws are opt-in, live rows alone stay in the default run
def test_forward_draws_and_live_rows_together_and_the_bytes_they_save():
    report, measured = _compiled_step(live_rows=True)
    decisions = {op.module: op.decision for op in report.ops}
    assert decisions["bert.encoder.layer.1.output.dense"] == "live_rows"  # never sampled
    assert decisions["bert.encoder.layer.0.output.dense"] == "memory"
    assert report.inductor_saved_bytes > report.baseline_saved_bytes  # the exact rewrite's bytes
    off, measured_off = _compiled_step(live_rows=False)
    assert off.count("live_rows") == 0
    assert {op.module: op.decision for op in off.ops}["bert.encoder.layer.1.output.dense"] == "memory"
    # what the rewrite removes, counted independently (autograd's saved tensors), equals the
    # report's count of the compiled graphs' saved inputs
    assert measured_off - measured == off.compiled_saved_bytes - report.compiled_saved_bytes > 0


def test_live_rows_option_is_validated():
    with pytest.raises(ValueError, match="live_rows must be true or false"):
        wtacrs_compile.WTACRSConfig(live_rows="yes")
