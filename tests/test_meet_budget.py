"""``memory_budget`` holds for the counted bytes: where torch's budget solver returns a cut that
saves more than the budget, the compile partitions again under a tighter one
(``passes/meet_budget.py``)."""

import torch
import torch.fx as fx

import wtacrs_compile
from wtacrs_compile.graph_utils import PartitionerSettings, copy_graph, num_fwd_outputs, partition_saved, saved_set
from wtacrs_compile.passes import meet_budget
from wtacrs_compile.passes.meet_budget import BudgetedPartitioner, next_budget
from wtacrs_compile.torch_internals import functorch_config

from stage_harness import capture_joint, compiling


def mlp_stack(depth: int = 4) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.LayerNorm(64), torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)]
    return torch.nn.Sequential(*layers)


def test_target_is_the_backends_budget_only_where_it_is_in_force():
    assert PartitionerSettings(0.1).target == 0.1
    assert PartitionerSettings(1.0).target is None  # Inductor's default partition: nothing promised
    assert PartitionerSettings(None).target is None  # torch's setting, torch's meaning
    with functorch_config.patch(activation_memory_budget=0.05):
        assert PartitionerSettings(0.1).target is None  # the user's smaller torch budget rules


def test_next_budget_lowers_by_more_than_the_overshoot_and_at_most_halves():
    assert next_budget(0.1, 0.1022, 0.1) < 0.1 - 0.0022
    assert next_budget(0.1, 0.1022, 0.1) > 0.09
    assert next_budget(0.1, 0.9, 0.1) == 0.05


def _partition_with(settings: PartitionerSettings, jp, graph, static):
    part = BudgetedPartitioner(settings, jp.report)
    gm = fx.GraphModule(torch.nn.Module(), copy_graph(graph))
    return part(gm, None, compiler="inductor", num_fwd_outputs=num_fwd_outputs(graph),
                static_lifetime_input_indices=list(static))


def test_a_cut_above_the_target_is_partitioned_again_until_it_meets_it():
    joint = capture_joint(mlp_stack(), torch.randn(256, 64))
    graph = joint.graph()
    jp = joint.joint_pass(memory_budget=0.5)
    with compiling(jp, graph):
        inductor = jp._inductor_partition(graph).activation_bytes  # the pass's reference figure
        assert jp.report.measurements["inductor"] == inductor
        first = partition_saved(graph, list(joint.static)).activation_bytes
        assert first < inductor
        # a target below what torch's budget 0.5 gives on this graph
        settings = jp.partitioner
        settings.target = 0.6 * first / inductor
        fw, bw = _partition_with(settings, jp, graph, joint.static)
    kept = saved_set(fw, bw).activation_bytes
    assert kept <= settings.target * inductor < first
    assert jp.report.tightened_budget is not None and jp.report.tightened_budget < 0.5
    assert jp.report.measurements["cut_before_tightening"] == first
    assert "partitioned again under" in jp.report.partitioner_note
    assert "still above" not in jp.report.partitioner_note
    # the compile's own setting is left as it was: the tighter budget held for that partition only
    assert functorch_config.activation_memory_budget == 1.0


def test_a_cut_that_meets_the_target_is_torchs_own():
    joint = capture_joint(mlp_stack(), torch.randn(256, 64))
    graph = joint.graph()
    jp = joint.joint_pass(memory_budget=0.5)
    with compiling(jp, graph):
        jp._inductor_partition(graph)
        torch_cut = partition_saved(graph, list(joint.static)).activation_bytes
        fw, bw = _partition_with(jp.partitioner, jp, graph, joint.static)
    assert saved_set(fw, bw).activation_bytes == torch_cut
    assert jp.report.tightened_budget is None and jp.report.partitioner_note == ""


def test_an_unreachable_target_keeps_the_smallest_cut_and_says_so(monkeypatch):
    monkeypatch.setattr(meet_budget, "MAX_REPARTITIONS", 1)
    joint = capture_joint(mlp_stack(), torch.randn(256, 64))
    graph = joint.graph()
    jp = joint.joint_pass(memory_budget=0.5)
    with compiling(jp, graph):
        inductor = jp._inductor_partition(graph).activation_bytes
        first = partition_saved(graph, list(joint.static)).activation_bytes
        settings = jp.partitioner
        settings.target = 1e-6  # below what even recomputing everything saves
        fw, bw = _partition_with(settings, jp, graph, joint.static)
    kept = saved_set(fw, bw).activation_bytes
    assert kept < first
    assert f"still above memory_budget={settings.target:g} after 1 re-partitions" in jp.report.partitioner_note
    assert inductor > 0


def test_the_compiled_step_under_a_tightened_budget_is_exact(monkeypatch):
    """End to end through the backend: a target below torch's cut makes Inductor compile the
    re-partitioned graphs; the gradients are eager's (ratio 1.0: nothing sampled) and the
    report's figures are the compiled partition's."""
    real_init = PartitionerSettings.__init__

    def lower_target(self, memory_budget):
        real_init(self, memory_budget)
        if self.target is not None:
            self.target *= 0.6  # below torch's own cut at this budget

    monkeypatch.setattr(PartitionerSettings, "__init__", lower_target)
    model, x = mlp_stack(), torch.randn(256, 64)
    model(x).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    backend = wtacrs_compile.backend(memory_budget=0.5, ratio=1.0)
    torch.compile(model, backend=backend)(x).sum().backward()
    for got, want in zip((p.grad for p in model.parameters()), eager):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # float reassociation only
    (report,) = backend.reports
    assert report.tightened_budget is not None and report.tightened_budget < 0.5
    assert report.compiled_saved_bytes <= 0.5 * 0.6 * report.inductor_saved_bytes
    assert report.compiled_saved_bytes < report.measurements["cut_before_tightening"]
    assert report.wtacrs_saved_bytes == report.compiled_saved_bytes
    assert report.compile_seconds["partition"] > 0  # what the re-partitions cost, reported
    assert "partitioned again under" in report.partitioner_note
