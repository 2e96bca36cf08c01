"""Statistical checks shared by the unbiasedness tests."""

import math

import torch


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, *, n_proj: int = 32, alpha: float = 1e-3, seed: int = 0) -> dict:
    """Assert that the mean of ``samples`` (draws x ...) matches ``exact`` within a bound
    derived from the samples' own variance.

    The entries of a sampled matmul are strongly correlated (each draw adds rank-1 terms), so
    per-entry z-scores neither are independent nor, for sparse entries, close to normal.  The
    test projects every draw onto ``n_proj`` fixed random directions: each projection is a sum
    over many entries, close to normal by the CLT, and ``t = (mean - exact) / (std / sqrt(R))``
    is a proper t-statistic.  Two checks:
      * every |t| below the Gaussian bound for family-wise error ``alpha`` (Bonferroni);
      * the mean of t^2 below ``1 + 4 sqrt(2 / n_proj)`` (a chi-square upper tail), which
        catches a small bias spread over the directions.
    Projections with (numerically) no variance must equal the exact value.
    """
    r = samples.shape[0]
    flat = samples.reshape(r, -1).double()
    ex = exact.reshape(-1).double()
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_proj, flat.shape[1], generator=gen, dtype=torch.float64)
    proj = flat @ directions.T
    target = directions @ ex
    mean, std = proj.mean(0), proj.std(0)
    scale = target.abs().max().clamp_min(1e-30)
    fixed = std <= 1e-9 * scale
    torch.testing.assert_close(mean[fixed], target[fixed], rtol=1e-4, atol=1e-6 * float(scale))
    t = (mean[~fixed] - target[~fixed]) / (std[~fixed] / math.sqrt(r))
    n = t.numel()
    if n == 0:
        return {"n": 0}
    bound = math.sqrt(2 * math.log(2 * n / alpha))
    chi = float((t**2).mean())
    assert float(t.abs().max()) < bound, f"max |t| = {float(t.abs().max()):.2f} >= {bound:.2f}: biased"
    assert chi < 1 + 4 * math.sqrt(2 / n), f"mean t^2 = {chi:.3f} over {n} projections: biased"
    return {"n": n, "max_t": float(t.abs().max()), "mean_t2": chi}
