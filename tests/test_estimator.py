"""The WTA-CRS estimator itself (eager, no compiler): winner count, weights, draws, unbiasedness."""

import math

import pytest
import torch

from wtacrs_compile.config import OpSettings
from wtacrs_compile.estimator import probabilities, sampled_matmul_reference, winner_count, wtacrs_sample

from stats import assert_unbiased


def objective(p_sorted, k, c):
    return (1 - float(p_sorted[:c].sum())) / (k - c)


def brute_force_c(p_sorted, k):
    values = [objective(p_sorted, k, c) for c in range(k)]
    return min(range(k), key=lambda c: (values[c], c)), values


@pytest.mark.parametrize("seed", range(20))
def test_adaptive_winner_count_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 200, (1,), generator=g))
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    # mixtures of flat and heavy-tailed distributions
    scores = torch.rand(n, generator=g, dtype=torch.float64) ** (1 + 10 * torch.rand(1, generator=g, dtype=torch.float64))
    p = scores / scores.sum()
    top = torch.sort(p, descending=True).values[:k]
    c = int(winner_count(top, k, "adaptive"))
    best, values = brute_force_c(top, k)
    # Equal to the brute-force minimiser, up to float ties between near-equal objectives.
    assert c == best or values[c] <= values[best] * (1 + 1e-9) + 1e-15
    assert values[c] <= 1 / k * (1 + 1e-12)  # never worse than plain CRS (c = 0)


def test_fixed_and_plain_crs_winner_counts():
    top = torch.tensor([0.5, 0.2, 0.1, 0.1])
    assert int(winner_count(top, 4, 0.0)) == 0
    assert int(winner_count(top, 4, 0.5)) == 2
    assert int(winner_count(top, 4, 0.99)) == 3  # capped at k - 1: one slot is always drawn


def test_winners_are_top_rows_and_drawn_rows_carry_importance_weights():
    torch.manual_seed(0)
    scores = torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.rand(97)])
    k = 10
    p = probabilities(scores)
    order = torch.argsort(p, descending=True)
    top = p[order[:k]]
    c = int(winner_count(top, k, "adaptive"))
    assert c >= 1, "heavy head must produce winners"
    rest_mass = 1 - float(p[order[:c]].sum())
    for _ in range(50):
        idx, w = wtacrs_sample(scores, k)
        assert idx.shape == (k,) and w.shape == (k,)
        assert set(idx[:c].tolist()) == set(order[:c].tolist())
        assert torch.all(w[:c] == 1)
        drawn = idx[c:]
        assert not set(drawn.tolist()) & set(order[:c].tolist()), "drawn rows exclude winners"
        expected = rest_mass / ((k - c) * p[drawn])
        torch.testing.assert_close(w[c:], expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("sampling", ["systematic", "iid"])
def test_draws_follow_the_restricted_distribution(sampling):
    """Chi-square goodness of fit of the drawn rows against p restricted to non-winners."""
    torch.manual_seed(1)
    scores = torch.tensor([100.0] + [1.0 + i for i in range(20)])
    k = 6
    reps = 4000
    idx, w = wtacrs_sample(scores.expand(reps, -1).contiguous(), k, sampling=sampling)
    winners = (w == 1) & (idx == 0)
    assert bool(winners[:, 0].all()), "row 0 is the winner in every draw"
    drawn = idx[:, 1:].reshape(-1)
    counts = torch.bincount(drawn, minlength=21).double()
    assert counts[0] == 0
    q = scores[1:].double() / scores[1:].sum()
    expected = q * drawn.numel()
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    # 19 degrees of freedom: P(chi2 > 50) < 1e-4
    assert chi2 < 50, chi2


def test_systematic_draws_hit_each_row_within_one_of_its_expected_count():
    """One systematic draw hits row j floor(m q_j) or ceil(m q_j) times (m drawn slots)."""
    torch.manual_seed(3)
    n, k = 300, 90
    scores = torch.rand(n, dtype=torch.float64) ** 3
    p = probabilities(scores).double()
    for _ in range(50):
        idx, w = wtacrs_sample(scores, k)
        c = int((w == 1).sum())
        winners = idx[:c]
        rest = p.clone()
        rest[winners] = 0
        m = k - c
        expected = m * rest / rest.sum()
        hits = torch.bincount(idx[c:], minlength=n).double()
        assert torch.all(hits >= torch.floor(expected - 1e-4)) and torch.all(hits <= torch.ceil(expected + 1e-4))


@pytest.mark.parametrize("profile", ["flat", "heavy"])
def test_systematic_draws_have_lower_variance_than_iid(profile):
    """Same weights, same expected counts, no multinomial noise: the mean squared error of the
    systematic estimate is well below the i.i.d. one's.  Drawing half of the rows, like
    sampling without replacement it removes about half of the variance (asserted: a third)."""
    torch.manual_seed(4)
    n = 400
    a = torch.randn(6, n, dtype=torch.float64)
    b = torch.randn(n, 5, dtype=torch.float64)
    if profile == "heavy":
        b = b * (torch.rand(n, 1, dtype=torch.float64) ** -1.0)
    exact = a @ b
    k = n // 2

    def mse(sampling):
        draws = torch.stack([sampled_matmul_reference(a, b, k, sampling=sampling) for _ in range(300)])
        return float(((draws - exact) ** 2).sum((1, 2)).mean())

    assert mse("systematic") * 1.5 < mse("iid")


def test_unknown_sampling_is_rejected():
    with pytest.raises(ValueError, match="sampling must be one of"):
        wtacrs_sample(torch.rand(4), 2, sampling="stratified")


@pytest.mark.parametrize("sampling", ["systematic", "iid"])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
@pytest.mark.parametrize("profile", ["flat", "heavy"])
def test_reference_estimator_is_unbiased(ratio, profile, sampling):
    torch.manual_seed(2)
    n = 200
    a = torch.randn(6, n, dtype=torch.float64)
    b = torch.randn(n, 5, dtype=torch.float64)
    if profile == "heavy":
        b = b * (torch.rand(n, 1, dtype=torch.float64) ** -1.5)
    k = math.ceil(ratio * n)
    draws = torch.stack([sampled_matmul_reference(a, b, k, sampling=sampling) for _ in range(600)])
    assert_unbiased(draws, a @ b)


@pytest.mark.parametrize("sampling", ["systematic", "iid"])
def test_forward_draw_estimator_is_unbiased_with_heavy_rows(sampling):
    """Forward draws see only ``||x_i||``: rows whose gradient is large next to their
    probability are rare heavy hits.  Systematic draws stay unbiased there too (2,000 draws:
    with fewer, a row hit with probability 0.01 is the variance, and a sample that misses it
    looks biased to a t-test -- why the compiled forward-draw tests use i.i.d. draws)."""
    torch.manual_seed(5)
    n = 120
    a = torch.randn(6, n, dtype=torch.float64) * (torch.rand(n, dtype=torch.float64) ** -1.0)
    b = torch.randn(n, 5, dtype=torch.float64)
    k = math.ceil(0.3 * n)
    draws = torch.stack([sampled_matmul_reference(a, b, k, use_a=False, sampling=sampling) for _ in range(2000)])
    assert_unbiased(draws, a @ b)


def test_k_formula():
    s = OpSettings(
        enabled=True, ratio=0.3, min_k=16, mode="memory", deterministic="adaptive", sampling="systematic", rules=()
    )
    assert s.k_for(1000) == 300
    assert s.k_for(20) == 16
    assert s.k_for(10) == 10  # min(N, ...)
    assert OpSettings(True, 0.1, 1, "memory", "adaptive", "iid", ()).k_for(128) == 13


@pytest.mark.parametrize("sampling", ["systematic", "iid"])
def test_zero_rows_never_contribute_and_all_zero_input_is_uniform(sampling):
    scores = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0])
    for k in (2, 3, 4):
        for _ in range(20):
            idx, w = wtacrs_sample(scores, k, sampling=sampling)
            zero_rows = (scores[idx] == 0)
            # A slot with no mass left to draw from points anywhere, with weight 0.
            assert torch.all(w[zero_rows] == 0)
    x = torch.tensor([[0.0], [3.0], [0.0], [1.0], [0.0]])
    idx, w = wtacrs_sample(scores, 3)  # two winners hold all the mass: the estimate is exact
    torch.testing.assert_close((w[:, None] * x[idx]).sum(0), x.sum(0))
    idx, w = wtacrs_sample(torch.zeros(5), 2)
    assert torch.isfinite(w).all()


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="k must be in"):
        wtacrs_sample(torch.rand(4), 5)


def test_draw_spec_is_wtacrs_sample_with_its_k():
    """The rewriters' one draw description: k fixed or a function of N, the winner rule and
    the sampling; hashable (it keys shared draws and the traced-subgraph cache)."""
    from wtacrs_compile.estimator import DrawSpec

    def half_noise(like, per_row):
        return torch.full((*like.shape[:-1], 1) if per_row else tuple(like.shape), 0.5)

    scores = torch.rand(3, 40, generator=torch.Generator().manual_seed(0))
    for spec in (DrawSpec(lambda n: n // 4, 0.5, "iid"), DrawSpec(10, 0.5, "iid")):
        idx, w = spec.sample(scores, noise=half_noise)
        ref_idx, ref_w = wtacrs_sample(scores, 10, 0.5, "iid", half_noise)
        assert idx.shape == (3, 10) and torch.equal(idx, ref_idx) and torch.equal(w, ref_w)
    assert DrawSpec(10) == DrawSpec(10) and hash(DrawSpec(10)) == hash(DrawSpec(10))
    assert DrawSpec(10) != DrawSpec(10, sampling="iid")


@pytest.mark.parametrize("adaptive, fraction, systematic", [(True, -1.0, True), (True, -1.0, False), (False, 0.5, True)])
def test_draw_op_passes_torch_custom_op_checks(adaptive, fraction, systematic):
    """``wtacrs::draw`` (top-k to indices and weights, one graph op): schema, fake (meta)
    implementation against the real one, and tracing through AOTAutograd with dynamic shapes,
    as ``torch.library.opcheck`` tests them."""
    g = torch.Generator().manual_seed(0)
    p = probabilities(torch.rand(3, 50, generator=g))
    u = torch.rand(3, 1 if systematic else 10, generator=g)
    results = torch.library.opcheck(torch.ops.wtacrs.draw.default, (p, u, 10, adaptive, fraction, systematic))
    assert set(results.values()) == {"SUCCESS"}, results


BACKWARD_CASES = [  # (x shape, g shape, x_t, g_t, x_first): mm sites both ways, a bmm site
    ((200, 12), (200, 7), False, False, False),
    ((12, 200), (200, 7), True, False, True),
    ((3, 60, 5), (3, 60, 4), False, False, True),
]


def _exact_product(x, g, x_t, g_t, x_first):
    xr = x.transpose(-1, -2) if x_t else x
    gr = g.transpose(-1, -2) if g_t else g
    return xr.transpose(-1, -2) @ gr if x_first else gr.transpose(-1, -2) @ xr


def _backward_estimate(x, g, k, x_t, g_t, x_first, systematic=True, trace_x=True):
    """A backward draw as the rewrite traces it: X's side traced and G's side the
    ``wtacrs::gradient_draw`` op (``trace_x``), or the whole estimate one
    ``wtacrs::backward_estimate`` op."""
    from wtacrs_compile.estimator import DrawSpec, backward_estimate

    draw = DrawSpec(k, sampling="systematic" if systematic else "iid")
    return backward_estimate(x, g, x_t, g_t, "a" if x_first else "b", draw, trace_x=trace_x)


@pytest.mark.parametrize("xs, gs, x_t, g_t, x_first", BACKWARD_CASES)
def test_backward_estimate_is_exact_at_k_equal_n_and_its_ops_check(xs, gs, x_t, g_t, x_first):
    """A backward draw keeping every row is the product of the exact operands, in both
    forms; ``wtacrs::gradient_draw`` and ``wtacrs::backward_estimate`` pass torch's schema
    and fake-tensor checks (their random output cannot pass opcheck's eager-vs-traced
    comparison)."""
    from wtacrs_compile.estimator import row_norms

    g0 = torch.Generator().manual_seed(0)
    x, g = torch.randn(xs, generator=g0), torch.randn(gs, generator=g0)
    n = x.shape[-1] if x_t else x.shape[-2]
    for trace_x in (True, False):
        torch.testing.assert_close(
            _backward_estimate(x, g, n, x_t, g_t, x_first, trace_x=trace_x), _exact_product(x, g, x_t, g_t, x_first)
        )
    x_norms = row_norms(x.transpose(-1, -2) if x_t else x)
    for op, args in (
        (torch.ops.wtacrs.gradient_draw.default, (x_norms, g, n // 3, g_t, True, -1.0, True)),
        (torch.ops.wtacrs.backward_estimate.default, (x, g, n // 3, x_t, g_t, x_first, True, -1.0, True)),
    ):
        results = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("xs, gs, x_t, g_t, x_first", BACKWARD_CASES)
@pytest.mark.parametrize("systematic, trace_x", [(True, True), (False, True), (True, False)])
def test_backward_estimate_is_unbiased(xs, gs, x_t, g_t, x_first, systematic, trace_x):
    """The backward draw at k = 0.3 N, heavy-tailed rows: the mean of 800 draws is within the
    statistical bound of the exact product."""
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(xs, generator=g0, dtype=torch.float64)
    g = torch.randn(gs, generator=g0, dtype=torch.float64)
    n = x.shape[-1] if x_t else x.shape[-2]
    heavy = torch.rand(n, generator=g0, dtype=torch.float64) ** -1.0
    g = g * (heavy[:, None] if not g_t else heavy)
    k = math.ceil(0.3 * n)
    torch.manual_seed(3)
    draws = torch.stack([_backward_estimate(x, g, k, x_t, g_t, x_first, systematic, trace_x) for _ in range(800)])
    assert_unbiased(draws, _exact_product(x, g, x_t, g_t, x_first))


def test_backward_estimate_does_the_smaller_matmul():
    from torch.utils.flop_counter import FlopCounterMode

    x, g = torch.randn(200, 12), torch.randn(200, 7)
    for trace_x in (True, False):  # a traced mm, or the op's registered formula
        with FlopCounterMode(display=False) as counter:
            _backward_estimate(x, g, 60, False, False, False, trace_x=trace_x)
        assert counter.get_total_flops() == 2 * 60 * 12 * 7


def test_eager_row_gather_takes_the_rows_of_every_layout():
    """The ops' bodies gather rows with ``index_select`` (a transposed layout along its
    columns): the same values as the traced gather, for row-major, transposed, strided and
    batched operands."""
    from wtacrs_compile.estimator import take_rows, take_rows_eager

    g0 = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (17,), generator=g0)
    base = torch.randn(50, 24, generator=g0)
    for t in (base, torch.randn(24, 50, generator=g0).t(), base[:, 3:19], torch.randn(50, 2, 12, generator=g0)[:, 1]):
        assert torch.equal(take_rows_eager(t, idx), take_rows(t, idx))
    batched = torch.randn(3, 50, 8, generator=g0)
    bidx = torch.randint(0, 50, (3, 17), generator=g0)
    assert torch.equal(take_rows_eager(batched, bidx), take_rows(batched, bidx))


@pytest.mark.parametrize("xs, gs, x_t, g_t, x_first", BACKWARD_CASES)
def test_backward_estimate_op_equals_its_traced_form(xs, gs, x_t, g_t, x_first):
    """One draw of the ``wtacrs::backward_estimate`` op (eager gathers) and of the traced X
    side with the ``wtacrs::gradient_draw`` op, from the same state of the draws' stream:
    the same rows, so the same estimate up to summation order."""
    g0 = torch.Generator().manual_seed(2)
    x, g = torch.randn(xs, generator=g0), torch.randn(gs, generator=g0)
    n = x.shape[-1] if x_t else x.shape[-2]
    from wtacrs_compile import rng

    out = []
    for trace_x in (False, True):
        rng.manual_seed(5)
        out.append(_backward_estimate(x, g, n // 3, x_t, g_t, x_first, trace_x=trace_x))
    torch.testing.assert_close(out[0], out[1])
