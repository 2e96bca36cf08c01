"""The report's saved-activation bytes against an independent count: the tensors autograd
actually saves when the compiled step runs (``saved_tensors_hooks``, unique storages,
parameters and inputs left out)."""

import pytest
import torch

import wtacrs_compile
from wtacrs_compile.passes import plan_memory


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 64),
        torch.nn.LayerNorm(64), torch.nn.Linear(64, 32),
    )


def autograd_saved_bytes(fn, model, x) -> int:
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize(
    "options",
    [{}, {"memory_budget": None}, {"mode": "memory+compute", "memory_budget": None}, {"mode": "all", "memory_budget": None}],
    ids=["default", "compute-no-budget", "memory+compute", "all"],
)
def test_report_bytes_equal_what_autograd_saves(options):
    torch._dynamo.reset()
    model, x = _model(), torch.randn(256, 64)
    backend = wtacrs_compile.backend(**options)
    compiled = torch.compile(model, backend=backend)
    compiled(x).sum().backward()  # compiles forward and (lazily) backward
    measured = autograd_saved_bytes(compiled, model, x)
    (report,) = backend.reports
    assert report.wtacrs_saved_bytes == report.compiled_saved_bytes == measured > 0
    assert sum(report.saved_tensors.values()) == measured


def test_backward_draws_only_run_no_trial_partition(monkeypatch):
    # compute mode decides nothing by bytes: the planner partitions nothing, the report's
    # after-figures are those of the partition Inductor compiles
    calls = []
    real = plan_memory.partition_saved
    monkeypatch.setattr(plan_memory, "partition_saved", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch._dynamo.reset()
    model, x = _model(), torch.randn(256, 64)
    backend = wtacrs_compile.backend(memory_budget=None, min_draw_gain=0)  # tiny test layers: below the draw's break-even
    compiled = torch.compile(model, backend=backend)
    y = compiled(x)
    (report,) = backend.reports
    assert report.count("compute") == 3 and calls == []
    assert report.wtacrs_saved_bytes is None  # the backward compiles lazily, on first use
    y.sum().backward()
    assert report.wtacrs_saved_bytes == report.compiled_saved_bytes > 0
    assert report.to_dict()["totals"]["wtacrs_saved_bytes"] == report.wtacrs_saved_bytes
