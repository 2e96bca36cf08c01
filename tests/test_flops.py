"""FLOP counts: the graph counter against the matmul formula, and the report's per-op and
per-graph FLOPs against each other (the per-op savings must account for the whole change of
the compiled backward's matmul FLOPs)."""

import json

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import wtacrs_compile
from wtacrs_compile.graph_utils import graph_flops


def _matmuls(a, b, c):
    return torch.mm(a, b).sum() + torch.addmm(c, a, b).sum() + torch.bmm(a[None].expand(3, -1, -1), b[None].expand(3, -1, -1)).sum()


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_graph_flops_counts_2mnk_per_product(tracing_mode):
    m, k, n = 8, 16, 4
    gm = make_fx(_matmuls, tracing_mode=tracing_mode)(torch.randn(m, k), torch.randn(k, n), torch.randn(n))
    # mm + addmm + a batch of 3 products; symbolic sizes count at their traced size
    assert graph_flops(gm) == (1 + 1 + 3) * 2 * m * k * n
    assert graph_flops(gm.graph) == graph_flops(gm)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)
    )


def _step(model, backend, n=256):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(n, 64)).sum().backward()
    assert len(backend.reports) == 1
    return backend.reports[0]


def test_compute_mode_backward_flops_drop_by_the_per_op_savings():
    # No memory budget: the partition recomputes no matmul, so the only change of the backward's
    # matmul FLOPs is the weight gradients' k/N.
    report = _step(_mlp(), wtacrs_compile.backend(ratio=0.25, memory_budget=None, min_draw_gain=0))
    flops = report.flops
    assert set(flops) == {"joint", "inductor", "baseline", "wtacrs", "compiled"}
    assert flops["joint"] == flops["inductor"], "the default partition recomputes no matmul"
    assert flops["compiled"]["forward"] == flops["inductor"]["forward"]  # forward untouched
    dims = [(64, 128), (128, 64), (64, 32)]
    assert [op.decision for op in report.ops] == ["compute"] * 3
    for op, (d_in, d_out) in zip(sorted(report.ops, key=lambda o: int(o.module)), dims):
        assert op.k == 64
        assert op.flops_before == 2 * 256 * d_in * d_out
        assert op.flops_after == 2 * 64 * d_in * d_out
    saved = sum(op.flops_before - op.flops_after for op in report.ops)
    assert flops["inductor"]["backward"] - flops["compiled"]["backward"] == saved > 0
    assert json.loads(json.dumps(report.to_dict()))["flops"] == flops


def test_exact_ops_keep_their_flops_and_the_budget_shows_its_recomputation():
    # The classifier-like last layer disabled; under the default memory budget the exact
    # partition recomputes forward matmuls in backward, which the counts must show.
    rules = [{"match": "4", "enabled": False}]
    report = _step(_mlp(), wtacrs_compile.backend(ratio=0.25, rules=rules))
    by_module = {op.module: op for op in report.ops}
    assert by_module["4"].decision == "exact"
    assert by_module["4"].flops_after == by_module["4"].flops_before == 2 * 256 * 64 * 32
    assert by_module["0"].flops_after < by_module["0"].flops_before
    f = report.flops
    recomputed = f["baseline"]["backward"] - f["inductor"]["backward"]
    assert recomputed >= 0
    saved = sum(op.flops_before - op.flops_after for op in report.ops)
    # the rewritten graph recomputes what the exact partition does, less the sampled rows
    assert f["compiled"]["backward"] == f["baseline"]["backward"] - saved
