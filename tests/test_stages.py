"""Each stage of the joint pass on its own, on a joint graph captured without Inductor
(tests/stage_harness.py): no model compile, well under a second per test."""

import pytest
import torch
import torch.nn as nn

from stage_harness import capture_joint, compiling, count

aten = torch.ops.aten


@pytest.fixture(scope="module")
def joint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    return capture_joint(model, torch.randn(128, 64))


def planned(joint, **options):
    """Run analyse, resolve, baseline and plan-and-rewrite on a fresh copy of the joint graph."""
    graph = joint.graph()
    jp = joint.joint_pass(**options)
    sites = jp._analyse(graph)
    with compiling(jp, graph):
        resolved = jp._resolve(graph, sites)
        outcome = jp._plan_and_rewrite(graph, resolved, jp._exact_baseline(graph), {})
    return graph, jp, sites, resolved, outcome


def test_analyse_finds_both_weight_gradient_matmuls(joint):
    graph = joint.graph()
    sites = joint.joint_pass()._analyse(graph)
    assert [s.kind for s in sites] == ["linear", "linear"]
    assert {s.n for s in sites} == {128} and sorted(s.d for s in sites) == [64, 256]
    nodes = {n.name: n for n in graph.nodes}
    assert all(nodes[s.node].target is aten.mm.default for s in sites)


def test_resolve_sorts_candidates_from_exact_sites(joint):
    graph = joint.graph()
    jp = joint.joint_pass()
    resolved = jp._resolve(graph, jp._analyse(graph))
    assert len(resolved.candidates) == 2 and resolved.skipped == {}
    assert {s.ratio for s in resolved.settings.values()} == {0.3}

    jp = joint.joint_pass(rules=[{"op": "linear", "ratio": 1.0}])
    resolved = jp._resolve(graph, jp._analyse(graph))
    assert resolved.candidates == []
    assert set(resolved.skipped.values()) == {"ratio 1.0: exact"}


def test_exact_baseline_recomputes_under_the_budget(joint):
    graph = joint.graph()
    jp = joint.joint_pass(memory_budget=0.1)
    with compiling(jp, graph):
        baseline = jp._exact_baseline(graph)
    inductor = jp.report.measurements["inductor"]
    # Inductor saves the ReLU output (128 x 256 float32); the budget recomputes it instead
    assert inductor == 128 * 256 * 4 and baseline.inductor_roots == {"relu"}
    assert baseline.saved.activation_bytes < inductor

    jp = joint.joint_pass(memory_budget=None)
    with compiling(jp, graph):
        plain = jp._exact_baseline(graph)
    assert plain.inductor_roots == set() and "inductor" not in jp.report.measurements


def test_plan_and_rewrite_compute_mode_draws_in_backward(joint):
    graph, jp, sites, resolved, outcome = planned(joint, memory_budget=None)
    assert {d.decision for d in outcome.decisions.values()} == {"compute"}
    assert outcome.applied.rows == {} and outcome.drawn_in_backward == set()
    names = {n.name for n in graph.nodes}
    assert not any(s.node in names for s in sites), "the exact weight-gradient matmuls are gone"
    # one op per site (norms, draw, gathers and the smaller matmul), nothing for Inductor to
    # generate code for; the one mm left is the input gradient
    assert count(graph, torch.ops.wtacrs.backward_estimate.default) == 2
    assert count(graph, torch.ops.wtacrs.gradient_draw.default) == 0
    assert count(graph, aten.mm.default) == 1
    # recompute_draw_inputs: the second linear reads a ReLU output, which the partitioner
    # could recompute: X's norms, rows and the smaller matmul are traced, G's side is one
    # op; the first reads the graph's input, nothing to recompute: one op for the estimate
    graph, *_ = planned(joint, memory_budget=None, recompute_draw_inputs=True)
    assert count(graph, torch.ops.wtacrs.gradient_draw.default) == 1
    assert count(graph, torch.ops.wtacrs.backward_estimate.default) == 1
    assert count(graph, aten.mm.default) == 2


def test_inline_draws_trace_the_draw_into_the_graph(joint):
    """``inline_draws=True``: G's side of each backward estimate is traced ops too (norms,
    top-k to weights, gathers: Inductor generates code for them) instead of one
    ``wtacrs::gradient_draw`` op; the same estimate otherwise."""
    graph, *_ = planned(joint, memory_budget=None, inline_draws=True)
    assert count(graph, torch.ops.wtacrs.gradient_draw.default) == 0
    assert count(graph, torch.ops.wtacrs.backward_estimate.default) == 0
    assert count(graph, torch.ops.wtacrs.draw.default) == 0
    assert count(graph, aten.topk.default) == 2 and count(graph, aten.searchsorted.Tensor) == 2
    assert count(graph, aten.mm.default) == 3


@pytest.mark.parametrize("options", [{"recompute_draw_inputs": True}, {"inline_draws": True}])
def test_backward_draws_can_leave_their_input_recomputable(options):
    """With ``recompute_draw_inputs`` (or everything traced) a backward draw reads X only
    through a row-norm reduction and a gather (G's side is the op): the partitioner may
    recompute X inside those kernels.  Exact, or as one op, the second linear's weight
    gradient reads the GeLU output materialized, so the partition saves it beside the GeLU
    input its own backward needs; with the traced reads it saves the input only."""
    from wtacrs_compile.graph_utils import partition_saved

    torch.manual_seed(0)
    gelu = capture_joint(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), torch.randn(128, 64))
    graph, jp, sites, resolved, outcome = planned(gelu, memory_budget=None, **options)
    assert {d.decision for d in outcome.decisions.values()} == {"compute"}
    as_op, *_ = planned(gelu, memory_budget=None)
    with compiling(jp, graph):
        exact = partition_saved(gelu.graph(), jp.static_input_indices).activations  # Inductor's
        one_op = partition_saved(as_op, jp.static_input_indices).activations
        drawn = partition_saved(graph, jp.static_input_indices).activations
    x = next(s.x_root for s in sites if s.d == 256)  # the GeLU output (decomposed: a mul)
    assert exact == one_op == {"addmm": 128 * 256 * 4, x: 128 * 256 * 4}
    assert drawn == {"addmm": 128 * 256 * 4}


def test_recomputable_tells_which_inputs_a_traced_draw_could_recompute():
    """X's side of a backward draw is traced only where the partitioner could recompute X
    cheaply: a GeLU output yes; a dropout output (its mask redrawn over every element), the
    graph's input and a linear's output (a matmul) no."""
    from wtacrs_compile.graph_utils import recomputable
    from wtacrs_compile.passes.row_ops import mm_operands

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 64), nn.GELU(),
                          nn.Linear(64, 64), nn.Linear(64, 64))
    joint = capture_joint(model, torch.randn(128, 64))
    graph = joint.graph()
    sites = joint.joint_pass(memory_budget=None)._analyse(graph)
    nodes = {n.name: n for n in graph.nodes}
    traced = [s.x_root for s in sites if recomputable(mm_operands(nodes[s.node], s)[0])]
    assert len(sites) == 4 and len(traced) == 1
    gelu_out = nodes[traced[0]]  # x * 0.5 * (1 + erf(x / sqrt 2)), decomposed
    assert any(a.target is aten.erf.default for b in gelu_out.all_input_nodes for a in b.all_input_nodes)


def test_the_draw_op_is_the_inline_draw():
    from wtacrs_compile.estimator import draw_rows, probabilities

    g = torch.Generator().manual_seed(0)
    p = probabilities(torch.rand(4, 300, generator=g))
    for u, adaptive, fraction in ((torch.rand(4, 1, generator=g), True, -1.0), (torch.rand(4, 90, generator=g), False, 0.25)):
        systematic = u.shape[-1] == 1
        idx, w = torch.ops.wtacrs.draw(p, u, 90, adaptive, fraction, systematic)
        ref_idx, ref_w = draw_rows(p, u, 90, adaptive, fraction, systematic)
        assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)


@pytest.mark.parametrize("sampling, noise", [("systematic", (1,)), ("iid", (39,))])
def test_rewrite_draws_the_noise_the_sampling_needs(joint, sampling, noise):
    """Systematic draws take one uniform offset per draw, i.i.d. draws one number per slot
    (k = ceil(0.3 * 128) = 39)."""
    from wtacrs_compile.graph_utils import is_random

    graph, jp, sites, resolved, outcome = planned(joint, memory_budget=None, sampling=sampling, inline_draws=True)
    assert {s.sampling for s in resolved.settings.values()} == {sampling}
    shapes = [tuple(n.meta["val"].shape) for n in graph.nodes if is_random(n)]
    assert shapes == [noise, noise]
    # as one op the draw takes its noise inside; the op is what the graph sees as random
    graph, *_ = planned(joint, memory_budget=None, sampling=sampling)
    random = [n for n in graph.nodes if is_random(n)]
    assert [n.target for n in random] == [torch.ops.wtacrs.backward_estimate.default] * 2
    assert {n.args[8] for n in random} == {sampling == "systematic"}



def test_backward_draws_that_cannot_pay_stay_exact():
    """A rank-4 bottleneck: its weight-gradient matmuls are too small next to what a backward
    draw reads (gain 2 * 64 * 4 * 0.7 / (1.3 * 68) = 4 FLOPs per element); the wide layer of
    the fixture pays (55)."""
    from wtacrs_compile.passes.plan_memory import backward_draw_gain

    torch.manual_seed(0)
    narrow = capture_joint(nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64)), torch.randn(128, 64))
    graph, jp, sites, resolved, outcome = planned(narrow, memory_budget=None)
    assert [round(backward_draw_gain(s, 0.3), 1) for s in sites] == [4.1, 4.1]
    for d in outcome.decisions.values():
        assert d.decision == "exact" and "saves 4 weight-gradient FLOPs per element" in d.reason
        assert "min_draw_gain 32" in d.reason
    assert count(graph, torch.ops.wtacrs.backward_estimate.default) == 0

    graph, jp, sites, resolved, outcome = planned(narrow, memory_budget=None, min_draw_gain=0)
    assert {d.decision for d in outcome.decisions.values()} == {"compute"}
    # inputs of both: the graph's input and a linear's output, neither worth recomputing
    assert count(graph, torch.ops.wtacrs.backward_estimate.default) == 2


def test_plan_and_rewrite_memory_mode_keeps_only_draws_that_save_bytes(joint):
    graph, jp, sites, resolved, outcome = planned(joint, memory_budget=None, mode="memory")
    measured = jp.report.measurements
    assert "all_candidates" in measured and "plan" in measured
    for name, d in outcome.decisions.items():
        assert d.decision in ("memory", "exact"), d
        if d.decision == "memory":
            assert outcome.applied.rows[name] and name not in outcome.drawn_in_backward


def test_record_is_plain_data_with_the_bytes(joint):
    graph, jp, sites, resolved, outcome = planned(joint, memory_budget=None)
    records = [jp._record(site, resolved, outcome) for site in sites]
    assert [r.decision for r in records] == ["compute", "compute"]
    assert sorted(r.saved_bytes_before for r in records) == [128 * 64 * 4, 128 * 256 * 4]
    assert all(r.k == 39 and r.to_dict()["shapes"]["x"][0] == 128 for r in records)  # ceil(0.3 * 128)


def test_pack_masks_packs_the_saved_relu_mask():
    torch.manual_seed(0)
    joint = capture_joint(nn.Sequential(nn.Linear(64, 256), nn.ReLU()), torch.randn(128, 64))
    graph = joint.graph()
    jp = joint.joint_pass(memory_budget=None, ratio=1.0, pack_masks=True)
    with compiling(jp, graph):
        saved = jp._exact_baseline(graph).saved
        assert saved.activations == {"le": 128 * 256}, saved.activations  # ReLU's bool mask
        packed = jp._pack_masks(graph, saved, {})
    assert jp.report.packed_masks == ["le"]
    assert packed.activation_bytes == 128 * 256 // 8


class _Attention(nn.Module):
    def __init__(self, dropout_p: float) -> None:
        super().__init__()
        self.qkv, self.out, self.dropout_p = nn.Linear(32, 96), nn.Linear(32, 32), dropout_p

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p)
        return self.out(y.transpose(1, 2).reshape(2, 16, 32))


@pytest.mark.parametrize("dropout_p, kept", [(0.0, 0), (0.1, 1)])
def test_keep_random_bans_only_ops_that_draw(dropout_p, kept):
    """The fused attention op carries the random tag for its dropout; with ``dropout_p=0`` it
    draws nothing and stays recomputable (banning it cost timm's ViT-B/16 27 MB under
    ``memory_budget=0.1``).  With dropout (on CPU the math path: its ``rand_like``) the noise
    is kept out of recomputation."""
    from wtacrs_compile.graph_utils import is_random
    from wtacrs_compile.passes.keep_random import keep_random_ops
    from wtacrs_compile.torch_internals import checkpoint_tag

    torch.manual_seed(0)
    graph = capture_joint(_Attention(dropout_p), torch.randn(2, 16, 32)).graph()
    attention = [n for n in graph.nodes if is_random(n)]
    assert len(attention) == 1
    assert ("attention" in str(attention[0].target)) == (dropout_p == 0)
    assert keep_random_ops(graph) == kept
    assert (checkpoint_tag(attention[0]) is not None) == bool(kept)
