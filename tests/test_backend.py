"""The backend end to end: registration, options, rewrite, numerics and saved bytes."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import wtacrs_compile
from wtacrs_compile import WTACRSConfig

from stats import assert_unbiased


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))


def grads(model, fn, x, target):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    (fn(x) * target).sum().backward()
    return [p.grad.detach().clone() for p in model.parameters()] + [x.grad.detach().clone()]


def test_backend_by_name_in_a_fresh_interpreter():
    """After `pip install`, backend="wtacrs" works without importing wtacrs_compile first."""
    code = textwrap.dedent(
        """
        import json, torch, torch.nn as nn
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
        c = torch.compile(m, backend="wtacrs")
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        x, y = torch.randn(256, 64), torch.randn(256, 64)
        losses = []
        for _ in range(15):
            loss = ((c(x) - y) ** 2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            losses.append(loss.item())
        import sys
        assert "wtacrs_compile" in sys.modules  # loaded by the entry point, not by us
        from wtacrs_compile import recent_reports
        r = recent_reports()[-1]
        print(json.dumps({"losses": losses, "report": r.to_dict()}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["losses"][-1] < data["losses"][0]
    ops = {op["module"]: op for op in data["report"]["ops"]}
    assert set(ops) == {"0", "2"}
    second = ops["2"]
    n, d = second["shapes"]["x"]
    assert (n, d) == [256, 256] or (n, d) == (256, 256)
    # The defaults: weight gradients drawn in backward (compute mode), k = ceil(0.3 N) rows,
    # under the default memory budget; the first linear reads the user's input.
    assert second["decision"] == "compute" and second["k"] == math.ceil(0.3 * 256)
    assert ops["0"]["decision"] == "compute"
    totals = data["report"]["totals"]
    assert totals["compiled_saved_bytes"] == totals["wtacrs_saved_bytes"]
    assert totals["wtacrs_saved_bytes"] <= totals["baseline_saved_bytes"] <= totals["inductor_saved_bytes"]
    assert data["report"]["config"]["memory_budget"] == 0.1


@pytest.mark.parametrize("pack_masks", [False, True])
def test_ratio_one_leaves_the_graph_alone_and_matches_inductor(pack_masks):
    m = mlp()
    x, t = torch.randn(32, 64), torch.randn(32, 64)
    b = wtacrs_compile.backend(memory_budget=None, ratio=1.0, mode="all", pack_masks=pack_masks)
    ours = grads(m, torch.compile(m, backend=b), x, t)
    torch._dynamo.reset()
    ref = grads(m, torch.compile(m, backend="inductor"), x, t)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    report = b.reports[0]
    assert [op.decision for op in report.ops] == ["exact", "exact"]
    assert all(op.reason == "ratio 1.0: exact" for op in report.ops)
    # The only change mask packing may make is lossless: a saved bool mask stored as bits.
    assert report.packed_masks or report.joint_graph_before == report.joint_graph_after
    assert pack_masks or not report.packed_masks


@pytest.mark.parametrize("ratio", [0.1, 0.3])
@pytest.mark.parametrize("profile", ["flat", "heavy"])
def test_compiled_estimate_is_unbiased_and_input_gradients_exact(ratio, profile):
    m = mlp(1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(96, 64, generator=gen)
    if profile == "heavy":  # heavy-tailed row norms: a few tokens dominate (winners)
        x = x * (torch.rand(96, 1, generator=gen) ** -1.5)
    t = torch.randn(96, 64, generator=gen)
    torch._dynamo.reset()
    exact = grads(m, torch.compile(m, backend="inductor"), x, t)
    torch._dynamo.reset()
    b = wtacrs_compile.backend(memory_budget=None, ratio=ratio, mode="all")
    c = torch.compile(m, backend=b)
    draws = [grads(m, c, x, t) for _ in range(500)]
    assert b.reports[0].count("memory") == 2
    for i, name in [(0, "W1"), (2, "W2")]:
        stats = assert_unbiased(torch.stack([d[i] for d in draws]), exact[i])
        assert stats["n"] == 16, name
    # Biases and the input gradient are exact in every draw.
    for i in (1, 3, 4):
        for d in draws[:20]:
            torch.testing.assert_close(d[i], exact[i], rtol=1e-5, atol=1e-5)


class Probe(nn.Module):
    """h = relu(x A^T); y = h W^T with W: N x H, so that with dL/dy = I, dW = H exactly."""

    def __init__(self, n, d, h):
        super().__init__()
        self.a = nn.Linear(d, h, bias=False)
        self.w = nn.Linear(h, n, bias=False)

    def forward(self, x):
        return self.w(torch.relu(self.a(x)))


@pytest.mark.parametrize("budget", [None, 0.1])
def test_backward_uses_the_rows_drawn_in_forward(budget):
    """Row r of the estimated dW must be a multiple of h_r: a redraw in backward pairs the
    gradient row of one token with the activation of another.  Checked also under an
    activation memory budget, where the partitioner recomputes aggressively."""
    torch.manual_seed(3)
    n, d, h = 64, 16, 32
    model = Probe(n, d, h)
    x = torch.randn(n, d)
    target = torch.eye(n)
    b = wtacrs_compile.backend(memory_budget=None, ratio=0.25, mode="all")
    ctx = torch._functorch.config.patch(activation_memory_budget=budget) if budget else torch._functorch.config.patch({})
    with ctx:
        c = torch.compile(model, backend=b)
        hidden = torch.relu(model.a(x)).detach()
        for _ in range(10):
            model.zero_grad()
            (c(x) * target).sum().backward()
            est = model.w.weight.grad
            nonzero = est.abs().sum(1) > 0
            assert 0 < int(nonzero.sum()) <= math.ceil(0.25 * n)
            coef = (est[nonzero] * hidden[nonzero]).sum(1) / (hidden[nonzero] ** 2).sum(1).clamp_min(1e-12)
            torch.testing.assert_close(est[nonzero], coef[:, None] * hidden[nonzero], rtol=1e-4, atol=1e-5)
    report = b.reports[0]
    # The partitioner may recompute the draw (wtacrs::draw) in backward; its noise is then
    # replayed from saved RNG state, never drawn afresh.
    rng_lines = [line for line in report.backward_graph.splitlines() if "rand" in line]
    # (the noise op: rand_like, or randint on torch 2.11; see torch_internals.uniform_noise)
    assert all("run_with_rng_state" in line for line in rng_lines if "aten.rand" in line), rng_lines


def test_options_through_torch_compile_and_validation_errors():
    m = mlp()
    x = torch.randn(40, 64)
    c = torch.compile(m, backend="wtacrs", options={"ratio": 0.5, "mode": "all", "min_k": 4})
    c(x).sum().backward()
    report = wtacrs_compile.recent_reports()[-1]
    assert report.config["ratio"] == 0.5
    assert {op.k for op in report.ops} == {20}

    with pytest.raises(ValueError, match=r"unknown option 'ratoi' \(did you mean 'ratio'\?\)"):
        WTACRSConfig.from_options({"ratoi": 0.3})
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        WTACRSConfig(ratio=0.0)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        WTACRSConfig(ratio=1.5)
    with pytest.raises(ValueError, match="min_k must be an integer >= 1"):
        WTACRSConfig(min_k=0)
    with pytest.raises(ValueError, match="mode must be one of 'memory', 'compute', 'memory\\+compute', 'all'"):
        WTACRSConfig(mode="fast")
    with pytest.raises(ValueError, match="deterministic must be 'adaptive'"):
        WTACRSConfig(deterministic="top")
    torch._dynamo.reset()
    bad = torch.compile(mlp(), backend="wtacrs", options={"ratio": 2})
    with pytest.raises(Exception, match=r"ratio must be in \(0, 1\]"):
        bad(x)


def test_config_fingerprint_changes_with_every_setting():
    base = WTACRSConfig()
    variants = [
        base.replace(ratio=0.5),
        base.replace(min_k=2),
        base.replace(deterministic=0.0),
        base.replace(mode="all"),
        base.replace(rules=({"match": "x", "enabled": False},)),
    ]
    prints = {base.fingerprint()} | {v.fingerprint() for v in variants}
    assert len(prints) == len(variants) + 1


def test_no_grad_adds_nothing():
    m = mlp()
    x = torch.randn(16, 64)
    b = wtacrs_compile.backend(memory_budget=None, ratio=0.3)
    with torch.no_grad():
        out = torch.compile(m, backend=b)(x)
    torch.testing.assert_close(out, m(x))
    assert all(not r.ops for r in b.reports)
