"""Batched matmuls under the wtacrs backend: both operand gradients estimated, unbiased,
drawn once per batch entry, the forward draw's rows used in backward, and exact fallbacks
(fused SDPA, dynamic shapes, ratio 1.0) that say why."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wtacrs_compile

from stats import assert_entries_unbiased


class Bmm(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


class Matmul4d(nn.Module):
    """Attention's ``Q K^T`` with a key broadcast over the batch: expand + view + bmm, and the
    key's gradient summed over the broadcast dim after the bmm."""

    def forward(self, q, k):
        return torch.matmul(q, k.transpose(-1, -2))


class Baddbmm(nn.Module):
    def forward(self, a, b):
        bias = torch.ones(a.shape[0], a.shape[1], b.shape[2])
        return torch.baddbmm(bias, a, b, beta=0.5, alpha=2.0)


def _inputs(kind: str, gen: torch.Generator):
    if kind == "matmul4d":
        q = torch.randn(2, 3, 24, 8, generator=gen)
        k = torch.randn(3, 24, 8, generator=gen) * torch.randn(3, 24, 1, generator=gen).exp()
        return q, k, torch.randn(2, 3, 24, 24, generator=gen), 2 * 3
    # Log-normal row norms on one operand: a few rows dominate (winners).
    a = torch.randn(6, 16, 24, generator=gen)
    b = torch.randn(6, 24, 16, generator=gen) * torch.randn(6, 24, 1, generator=gen).exp()
    return a, b, torch.randn(6, 16, 16, generator=gen), 6


MODULES = {"bmm": Bmm, "matmul4d": Matmul4d, "baddbmm": Baddbmm}


def _grads(fn, a, b, target):
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    return torch.autograd.grad((fn(a, b) * target).sum(), (a, b))


@pytest.mark.parametrize("kind", ["bmm", "matmul4d", "baddbmm"])
@pytest.mark.parametrize("mode", ["all", "compute"])
def test_both_operand_gradients_are_unbiased(kind, mode):
    """500 draws of a compiled batched product's two operand gradients: their mean is the
    exact gradient of the Inductor baseline within a bound from the draws' own variance."""
    gen = torch.Generator().manual_seed(7)
    a, b, target, groups = _inputs(kind, gen)
    module = MODULES[kind]()
    exact = _grads(torch.compile(module, backend="inductor"), a, b, target)
    torch._dynamo.reset()
    # min_draw_gain=0: these products are too small for a backward draw to pay, which is
    # not what this test is about
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=0.3, mode=mode, min_draw_gain=0)
    compiled = torch.compile(module, backend=backend)
    torch.manual_seed(0)
    draws = [_grads(compiled, a, b, target) for _ in range(500)]

    assert len(backend.reports) == 1
    records = backend.reports[0].ops
    assert [r.op for r in records] == ["bmm", "bmm"], "one site per operand gradient"
    assert {r.decision for r in records} == {"memory" if mode == "all" else "compute"}
    for r in records:
        n = r.shapes["x"][0]
        assert r.k == math.ceil(0.3 * n) < n
    for i, name in enumerate(("first operand", "second operand")):
        samples = torch.stack([d[i] for d in draws])
        # The draws really are random: sampling happened.
        assert (samples[0] - samples[1]).abs().max() > 0, name
        assert_entries_unbiased(samples, exact[i], groups)


def test_the_check_detects_a_small_bias():
    """The same statistics reject the same draws scaled by 1.05: the check has power."""
    gen = torch.Generator().manual_seed(7)
    a, b, target, groups = _inputs("bmm", gen)
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=0.3, mode="all")
    compiled = torch.compile(Bmm(), backend=backend)
    torch.manual_seed(0)
    draws = torch.stack([_grads(compiled, a, b, target)[0] for _ in range(500)])
    exact = torch.bmm(target, b.transpose(1, 2))
    assert_entries_unbiased(draws, exact, groups)
    with pytest.raises(AssertionError, match="biased"):
        assert_entries_unbiased(draws * 1.05, exact, groups)


class Probe(nn.Module):
    """``C = bmm(A, B)`` with ``A = relu(x W^T)`` (b x n x m) and a parameter ``B`` (b x m x n).
    With ``dL/dC = I`` per batch entry, the exact ``dB = A^T``: column ``i`` of ``dB[b]`` is
    row ``i`` of ``A[b]``.  The estimate keeps sampled columns only, each a multiple of that
    row; a redraw in backward would pair the gradient row of one token with the saved
    activation row of another."""

    def __init__(self, b, n, m, d):
        super().__init__()
        self.proj = nn.Linear(d, m, bias=False)
        self.b = nn.Parameter(torch.randn(b, m, n))

    def forward(self, x):
        return torch.bmm(torch.relu(self.proj(x)), self.b)


@pytest.mark.parametrize("budget", [None, 0.1])
def test_backward_uses_the_rows_drawn_in_forward(budget):
    torch.manual_seed(3)
    b, n, m, d = 3, 48, 32, 16
    model = Probe(b, n, m, d)
    x = torch.randn(b, n, d)
    target = torch.eye(n).expand(b, n, n)
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=0.25, mode="all", rules=[{"op": "linear", "enabled": False}])
    patch = {"activation_memory_budget": budget} if budget else {}
    with torch._functorch.config.patch(patch):
        compiled = torch.compile(model, backend=backend)
        act = torch.relu(model.proj(x)).detach()  # b x n x m
        for _ in range(10):
            model.zero_grad()
            (compiled(x) * target).sum().backward()
            est = model.b.grad  # b x m x n
            for e in range(b):
                cols = est[e].t()  # n x m: row i estimates A[e, i]
                nonzero = cols.abs().sum(1) > 0
                assert 0 < int(nonzero.sum()) <= math.ceil(0.25 * n), "k rows per batch entry"
                rows = act[e][nonzero]
                coef = (cols[nonzero] * rows).sum(1) / (rows**2).sum(1).clamp_min(1e-12)
                torch.testing.assert_close(cols[nonzero], coef[:, None] * rows, rtol=1e-4, atol=1e-5)
    report = backend.reports[0]
    bmms = [r for r in report.ops if r.op == "bmm"]
    # Only dB is a site: dA = G B^T reads the parameter B, an input gradient left exact.
    assert [(r.decision, r.shapes["x"]) for r in bmms] == [("memory", [n, m])]
    # One draw per step: its noise is drawn once, in forward (and replayed in backward from
    # the saved RNG state if the partitioner recomputes part of the draw there), or, when the
    # budget moves the whole draw to backward, there alone.
    fw, bw = report.forward_graph.splitlines(), report.backward_graph.splitlines()
    fresh = [line for line in fw + bw if "target=torch.ops.aten.rand" in line]  # rand_like (randint on 2.11)
    saved = [line for line in fw if "target=torch.ops.higher_order.run_and_save_rng_state" in line]
    replayed = [line for line in bw if "target=torch.ops.higher_order.run_with_rng_state" in line]
    assert len(fresh) + len(saved) == 1, fw + bw
    assert len(replayed) <= len(saved)
    if budget is None:
        assert len(saved) == 1 and not fresh, "the draw belongs to the forward pass"


def test_ratio_one_matches_inductor_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    a, b, target, _ = _inputs("matmul4d", gen)
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=1.0, mode="all")
    ours = _grads(torch.compile(Matmul4d(), backend=backend), a, b, target)
    torch._dynamo.reset()
    ref = _grads(torch.compile(Matmul4d(), backend="inductor"), a, b, target)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert [(r.op, r.decision, r.reason) for r in backend.reports[0].ops] == [("bmm", "exact", "ratio 1.0: exact")] * 2


def test_dynamic_shapes_fall_back_to_exact_with_a_reason():
    gen = torch.Generator().manual_seed(2)
    a, b, target, _ = _inputs("bmm", gen)
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=0.3, mode="all")
    compiled = torch.compile(Bmm(), backend=backend, dynamic=True)
    got = _grads(compiled, a, b, target)
    want = _grads(Bmm(), a, b, target)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    records = [r for report in backend.reports for r in report.ops]
    assert len(records) == 2
    assert all(r.decision == "exact" and r.reason.startswith("dynamic shape") for r in records)


class Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_sdpa_is_left_exact_and_says_why():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=0.3, mode="all")
    out = torch.compile(Sdpa(), backend=backend)(q, k, v)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(Sdpa()(q, k, v).square().sum(), (q, k, v))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    (record,) = backend.reports[0].ops
    assert (record.op, record.decision) == ("bmm", "exact")
    assert record.reason.startswith("fused SDPA: no bmm to sample")


def test_bmm_kind_can_be_left_out():
    gen = torch.Generator().manual_seed(2)
    a, b, target, _ = _inputs("bmm", gen)
    backend = wtacrs_compile.backend(memory_budget=None, ratio=0.3, mode="all", ops=("linear",))
    _grads(torch.compile(Bmm(), backend=backend), a, b, target)
    assert backend.reports[0].ops == []
