"""Statistical checks shared by the unbiasedness tests.

Two complementary tests of ``E[estimate] = exact`` from R draws, both with bounds derived
from the draws' own variance (never a loose constant):

* :func:`assert_unbiased` projects the draws onto fixed random directions and runs a
  Hotelling T^2 test on the projections (valid whatever their correlation) plus per-direction
  t-tests under a Bonferroni bound;
* :func:`assert_entries_unbiased` works per entry, for gradients whose entries split into
  independently drawn groups (the batch entries of a bmm).
"""

import math

import torch


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, *, n_proj: int = 16, alpha: float = 1e-3, seed: int = 0) -> dict:
    """Assert that the mean of ``samples`` (draws x ...) matches ``exact``.

    The entries of a sampled matmul are strongly correlated (each draw adds rank-1 terms) and,
    for sparse entries, far from normal.  Projections onto ``n_proj`` fixed random directions
    are sums over many entries, close to normal by the CLT, but correlated with each other;
    one of them is the exact gradient's own direction.  Hence:
      * every per-direction |t| below the Gaussian bound for family-wise error ``alpha``
        (Bonferroni: valid under any correlation);
      * Hotelling's T^2 = R d^T S^-1 d over the projections (S their sample covariance), which
        follows (R-1) M / (R-M) F(M, R-M) when unbiased, below a chi-square-type upper bound
        ``c (M + 5 sqrt(2 M))`` with c that F's scale factor; it sees a small bias spread over
        all directions.
    Projections with (numerically) no variance must equal the exact value.
    """
    r = samples.shape[0]
    flat = samples.reshape(r, -1).double()
    ex = exact.reshape(-1).double()
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_proj, flat.shape[1], generator=gen, dtype=torch.float64)
    # The exact gradient itself is one direction: a bias along it (a missing weight, a lost
    # share of the rows) is small per entry but large in this projection.
    directions[0] = ex * (directions[1].norm() / ex.norm().clamp_min(1e-30))
    proj = flat @ directions.T
    target = directions @ ex
    mean, std = proj.mean(0), proj.std(0)
    scale = target.abs().max().clamp_min(1e-30)
    fixed = std <= 1e-9 * scale
    torch.testing.assert_close(mean[fixed], target[fixed], rtol=1e-4, atol=1e-6 * float(scale))
    proj, mean, target, std = proj[:, ~fixed], mean[~fixed], target[~fixed], std[~fixed]
    m = target.numel()
    if m == 0:
        return {"n": 0}
    t = (mean - target) / (std / math.sqrt(r))
    bound = math.sqrt(2 * math.log(2 * m / alpha))
    assert float(t.abs().max()) < bound, f"max |t| = {float(t.abs().max()):.2f} >= {bound:.2f}: biased"
    cov = torch.cov(proj.T).reshape(m, m)
    d = (mean - target).reshape(m, 1)
    t2 = float(r * (d.T @ torch.linalg.pinv(cov) @ d))
    c = (r - 1) / (r - m)
    limit = c * (m + 5 * math.sqrt(2 * m))
    assert t2 < limit, f"Hotelling T^2 = {t2:.1f} >= {limit:.1f} over {m} projections: biased"
    return {"n": m, "max_t": float(t.abs().max()), "t2": t2, "t2_limit": limit}


def assert_entries_unbiased(samples: torch.Tensor, exact: torch.Tensor, groups: int, alpha: float = 1e-3) -> dict:
    """Check that the mean of ``samples`` (draws x ...) is ``exact``, within bounds derived
    from the draws' own variance.

    Entries with (numerically) no variance must equal the exact value (a row only winners
    touch, a zero column).  For the others, ``z_e = (mean_e - exact_e) / (std_e / sqrt(R))``:

    * max |z| below the two-sided Gaussian bound at family-wise level ``alpha`` (Bonferroni
      over the entries and the mass statistic below: valid however they are correlated);
    * the mean of z^2 below ``1 + 4 sqrt(2 / groups)``.  Each z^2 has mean ~1 and variance
      ~2; entries that share a draw may be fully correlated, but if they split into
      ``groups`` sets drawn independently (the batch entries of one bmm; 1 for a whole model,
      where every gradient mixes every draw), the mean has variance at most ``2 / groups``:
      a 4-sigma bound;
    * the mass ``<draw, exact>``, whose expectation is ``||exact||^2``: its t-statistic, under
      the same bound.  One sum over all entries, it is close to normal and sees a bias along
      the exact gradient (a missing importance weight, a lost share of the rows) that is
      small per entry: it rejects a 5% scale error at 500 draws here.
    """
    r = samples.shape[0]
    flat = samples.reshape(r, -1).double()
    ex = exact.reshape(-1).double()
    mean, std = flat.mean(0), flat.std(0)
    scale = float(ex.abs().max().clamp_min(1e-30))
    fixed = std <= 1e-7 * scale
    torch.testing.assert_close(mean[fixed], ex[fixed], rtol=1e-4, atol=1e-5 * scale)
    z = (mean[~fixed] - ex[~fixed]) / (std[~fixed] / math.sqrt(r))
    n = z.numel()
    assert n > 0, "no entry varies: nothing was sampled"
    bound = math.sqrt(2 * math.log(2 * (n + 1) / alpha))
    chi = float((z**2).mean())
    mass = flat @ ex
    t_mass = float((mass.mean() - ex @ ex) / (mass.std() / math.sqrt(r)))
    assert float(z.abs().max()) < bound, f"max |z| = {float(z.abs().max()):.2f} >= {bound:.2f}: biased"
    assert chi < 1 + 4 * math.sqrt(2 / groups), f"mean z^2 = {chi:.3f} over {n} entries: biased"
    assert abs(t_mass) < bound, f"mass t = {t_mass:.2f}, bound {bound:.2f}: biased"
    return {"n": n, "fixed": int(fixed.sum()), "max_z": float(z.abs().max()), "mean_z2": chi, "t_mass": t_mass}


def assert_uniform_noise(u: torch.Tensor, shape) -> None:
    """Draw noise as the estimator needs it: float32 on [0, 1) in steps of 2**-24, uniform
    (mean and a 10-bin histogram within bounds from the sample size, 20,000 values)."""
    assert u.dtype == torch.float32 and tuple(u.shape) == tuple(shape)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).round())
    # mean 1/2, standard error sqrt(1/12 / 20000) = 0.002
    assert abs(float(u.mean()) - 0.5) < 0.01
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert float(counts.min()) > 1800 and float(counts.max()) < 2200  # 2000 +- 4.7 sd
