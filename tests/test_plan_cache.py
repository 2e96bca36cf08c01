"""A recompile of the same graph is served the function compiled before (the backend's
``compiled`` cache: no trace, pass, partition or Inductor call); below it, a recompile of the
same joint graph reuses the pass's partitions (plan_cache.py): the same decisions and bytes,
no partitioner call; anything that changes the graph, the settings or the partitioner's
budget measures again."""

import pytest
import torch
import torch.nn as nn

import wtacrs_compile
from wtacrs_compile.graph_utils import PartitionerSettings
from wtacrs_compile.passes import joint_pass, plan_memory
from wtacrs_compile.plan_cache import PlanCache


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 64))


@pytest.fixture
def partitions(monkeypatch):
    """Counts the pass's partitioner runs (the exact baseline's and the planner's)."""
    calls = []
    for module in (joint_pass, plan_memory):
        real = module.partition_saved
        monkeypatch.setattr(module, "partition_saved", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def _compile_step(model, backend, n=128):
    torch._dynamo.reset()  # a new compile of the same graph, as after a failed guard
    torch.manual_seed(1)
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(n, 64)).sum().backward()
    model.zero_grad(set_to_none=True)
    return backend.reports[-1]


def _summary(report):
    return [(op.node, op.decision, op.reason, op.k, op.saved_bytes_before, op.saved_bytes_after) for op in report.ops]


@pytest.mark.parametrize(
    "options, stage",
    # backward draws only (the default): the pass partitions only to choose the partitioner's
    # settings (partition_settings); forward draws measure the exact baseline
    [({"mode": "memory", "memory_budget": None}, "exact_baseline"), ({}, "partition_settings")],
    ids=["memory", "default"],
)
def test_recompile_of_the_same_graph_reuses_the_partitions(partitions, options, stage):
    model, backend = _mlp(), wtacrs_compile.backend(**options)
    first = _compile_step(model, backend)
    measured = len(partitions)
    assert measured >= 1 and first.reused == []
    backend.compiled.clear()  # else the compiled function is served whole (see below)
    second = _compile_step(model, backend)
    assert len(partitions) == measured, "no partition on the recompile"
    assert first.count("memory") + first.count("compute") > 0
    assert second.reused == [stage, "plan"]
    assert _summary(second) == _summary(first)
    for field in ("inductor_saved_bytes", "baseline_saved_bytes", "wtacrs_saved_bytes", "compiled_saved_bytes"):
        assert getattr(second, field) == getattr(first, field), field
    assert second.measurements == first.measurements and second.flops == first.flops
    assert second.to_dict()["reused"] == second.reused


def test_other_settings_or_shapes_measure_again(partitions):
    model, backend = _mlp(), wtacrs_compile.backend(mode="memory", memory_budget=None)
    _compile_step(model, backend)
    n = len(partitions)
    other_ratio = _compile_step(model, wtacrs_compile.backend(mode="memory", memory_budget=None, ratio=0.5))
    assert other_ratio.reused == [], "another backend object has its own cache"
    backend.plans.clear()
    backend.compiled.clear()
    _compile_step(model, backend)
    m = len(partitions)
    assert m > n
    other_n = _compile_step(model, backend, n=96)  # other shapes: another graph
    assert other_n.reused == [] and len(partitions) > m


def test_recompile_of_the_same_graph_is_served_the_compiled_function(partitions, monkeypatch):
    """A guard failure that leaves the graph as it was (Hugging Face's first-call
    ``problem_type``, a ``torch._dynamo.reset()``) compiles nothing again: no joint pass, no
    partition, no Inductor; the report is the earlier one's, marked; gradients as before."""
    import wtacrs_compile.compiled_graphs as compiled_graphs

    inner = []
    real = compiled_graphs.compile_fx_inner
    monkeypatch.setattr(compiled_graphs, "compile_fx_inner", lambda *a, **k: inner.append(1) or real(*a, **k))
    model, backend = _mlp(), wtacrs_compile.backend()
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))

    def step():
        torch._dynamo.reset()  # a new compile of the same graph
        wtacrs_compile.manual_seed(0)  # the same backward draws each time
        torch.compile(model, backend=backend)(x).sum().backward()
        grad = model[0].weight.grad.clone()
        model.zero_grad(set_to_none=True)
        return backend.reports[-1], grad

    first, grad_first = step()
    calls, compiles = len(partitions), len(inner)
    assert calls >= 1 and compiles == 2 and first.count("compute") > 0  # forward and backward
    second, grad_second = step()
    assert len(partitions) == calls and len(inner) == compiles, "nothing compiled again"
    assert second.reused == ["compiled"] and second.compile_seconds == {} and first.reused == []
    assert _summary(second) == _summary(first) and second.compiled_saved_bytes == first.compiled_saved_bytes
    assert len(backend.reports) == 2
    torch.testing.assert_close(grad_second, grad_first, rtol=0, atol=0)
    # other example inputs (shape), other grad mode or other options: compiled again
    _compile_step(model, backend, n=96)
    assert len(inner) > compiles
    other = wtacrs_compile.backend(ratio=0.5)
    other.compiled = backend.compiled  # even sharing the cache (as backend="wtacrs" does)
    assert _compile_step(model, other).reused != ["compiled"]


def test_relaxed_bans_are_restored_on_a_hit():
    # the cached baseline lifted the recomputation bans: the recompile's partition must too
    p = PartitionerSettings(0.1)
    with p.active():
        cache = PlanCache()
        report = wtacrs_compile.report.CompileReport(config={})
        jp = joint_pass.WTACRSJointPass(wtacrs_compile.WTACRSConfig(), frozenset(), (), report, partitioner=p, plans=cache)

        def measure():
            p.relax_bans()
            report.measurements["exact_relaxed_bans"] = 1
            return "baseline"

        assert jp._cached(("exact_baseline", "k"), measure) == "baseline"
        p.restore_bans()
        report2 = wtacrs_compile.report.CompileReport(config={})
        jp.report = report2
        assert jp._cached(("exact_baseline", "k"), lambda: pytest.fail("measured again")) == "baseline"
        assert p.relaxed and report2.measurements == {"exact_relaxed_bans": 1} and report2.reused == ["exact_baseline"]


def test_plan_cache_is_bounded_least_recently_used():
    cache = PlanCache(size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    with pytest.raises(ValueError, match="size must be >= 1"):
        PlanCache(size=0)
