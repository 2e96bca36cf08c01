"""A per-entry unbiasedness check for sampled gradients (bmm operands, whole models)."""

import math

import torch


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
