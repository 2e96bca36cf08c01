"""The WTA-CRS estimator (Winner-Take-All Column-Row Sampling), as plain torch functions.

For ``A @ B`` contracted over ``N`` (rows of ``B``, columns of ``A``) with a budget of ``k``
column-row pairs:

* probabilities ``p_i`` proportional to a non-negative score per row (``||x_i||`` in the
  forward pass, ``||x_i|| * ||g_i||`` in the backward pass);
* winners ``C``: the ``c`` rows of highest ``p``, summed exactly.  ``c`` minimises
  ``(1 - P_C) / (k - c)`` over ``c = 0..k-1`` (``"adaptive"``), or is a fixed fraction of k;
* the other ``m = k - c`` slots are drawn from ``p`` restricted to the non-winners, each
  weighted ``(1 - P_C) / (m p_j)``: i.i.d. with replacement (``sampling="iid"``, the paper's
  estimator), or *systematically* (``sampling="systematic"``, the default): one uniform
  offset ``U`` and the ``m`` targets ``(j + U) / m`` on the non-winners' cumulative mass, so
  that row ``j`` is drawn ``floor(m q_j)`` or ``ceil(m q_j)`` times (``q`` the renormalised
  ``p``), ``m q_j`` in expectation, exactly as often as i.i.d. draws on average.  Both are
  unbiased with the same weights; the systematic draw has no multinomial noise in how often
  each row is hit, so its variance is lower, most where k is a large part of the rows with
  mass (like sampling without replacement; measured in ``benchmarks/grad_error.py``).

The estimate ``sum_j w_j a_{:,idx_j} b_{idx_j,:}`` is unbiased for any ``p`` that is positive
wherever a row contributes.  Every shape is static: always ``k`` indices, winners and draws are
told apart by their weight, never by a data-dependent size.

In the joint graph a forward draw is three parts: the scores and probabilities (traced ops,
which Inductor fuses into the kernel that produces ``X``), the noise (one op, see ``rng.py``)
and ``wtacrs::draw``, one custom op from probabilities and noise to indices and weights
(top-k, winner count, CDF, search).  A backward draw is one op, ``wtacrs::backward_estimate``
(norms, noise, draw, gathers and the smaller matmul), or with ``recompute_draw_inputs`` X's
side traced (X's row norms, its k rows, the smaller matmul: Inductor fuses the first two into
the kernel that produces X, so the partitioner may recompute X rather than save it) and G's
side one op, ``wtacrs::gradient_draw`` (G's norms, noise, draw, G's weighted rows).  The ops
run as eager ATen calls: traced, they made Inductor generate and compile C++ per draw site
(``inline_draws=True`` still does).  Leading batch dimensions are supported (one draw per batch entry), which is how
``bmm`` samples per (batch, head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Tuple, Union

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .config import SAMPLINGS
from . import rng

DeterministicT = Union[str, float]


def row_norms(x: Tensor) -> Tensor:
    """L2 norm of each row (last dim) in float32, without ``linalg_vector_norm``."""
    x = x.float()
    return (x * x).sum(-1).sqrt()


def probabilities(scores: Tensor) -> Tensor:
    """Normalise non-negative scores over the last dim; all-zero rows become uniform."""
    scores = scores.float()
    total = scores.sum(-1, keepdim=True)
    n = scores.shape[-1]
    uniform = torch.full_like(scores, 1.0 / n)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)


def winner_count(top_p: Tensor, k: int, deterministic: DeterministicT) -> Tensor:
    """Number of winners ``c`` for each leading index, as an int64 tensor of shape ``(*B, 1)``.

    ``top_p`` holds the k largest probabilities, sorted descending.  ``"adaptive"`` picks the
    ``c`` in ``0..k-1`` minimising ``(1 - P_c) / (k - c)``, ``P_c`` the mass of the top c rows;
    ties go to the smaller ``c``, so ``c = 0`` unless some ``c`` beats ``1/k``.
    """
    batch = top_p.shape[:-1]
    if deterministic != "adaptive":
        # sym_min/floor, not min/int: k may be a SymInt (dynamic shapes), and those would guard.
        c = torch.sym_min(math.floor(float(deterministic) * k), k - 1)
        return torch.full((*batch, 1), c, dtype=torch.int64, device=top_p.device)
    mass = torch.cumsum(top_p, dim=-1)
    # P_c for c = 0..k-1: the mass of the first c winners.
    p_c = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., : k - 1]], dim=-1)
    slots = torch.arange(k, 0, -1, device=top_p.device, dtype=top_p.dtype)  # k - c
    objective = (1.0 - p_c) / slots
    return torch.argmin(objective, dim=-1, keepdim=True)


def wtacrs_sample(
    scores: Tensor,
    k: int,
    deterministic: DeterministicT = "adaptive",
    sampling: str = "systematic",
    noise: Callable[..., Tensor] = rng.uniform,
    inline: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Draw ``k`` row indices and their weights from per-row ``scores`` of shape ``(*B, N)``.

    Returns ``(idx, weight)``, both ``(*B, k)``: ``idx`` int64, ``weight`` float32.  Winners
    have weight 1; drawn rows ``(1 - P_C) / ((k - c) p_j)``.  ``sampling``: ``"systematic"``
    or ``"iid"`` (see the module docstring).  ``noise(like, per_row)``: uniform [0, 1) noise of
    ``like``'s shape (one per leading index with ``per_row``); by default from the draws' own
    stream (:func:`rng.uniform`), for forward draws from torch's generator
    (``torch_internals.replayable_uniform``), which AOTAutograd can replay in backward.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"wtacrs: sampling must be one of {SAMPLINGS}, got {sampling!r}")
    n = scores.shape[-1]
    # With a symbolic N (dynamic shapes) k is min(N, max(ceil(ratio N), min_k)): in range by
    # construction, and comparing SymInts here would add guards (recompiles).
    if isinstance(k, int) and isinstance(n, int) and not 1 <= k <= n:
        raise ValueError(f"wtacrs: k must be in [1, N={n}], got {k}")
    p = probabilities(scores)
    # The noise is drawn here, outside the draw op, so that its source (the draws' own stream,
    # or torch's generator for forward draws, which AOTAutograd can replay) stays visible in
    # the graph.  ``like``: k values per leading index, on p's device.
    like = p.narrow(-1, 0, k)
    u = noise(like, sampling == "systematic")
    adaptive = deterministic == "adaptive"
    fraction = -1.0 if adaptive else float(deterministic)
    draw = draw_rows if inline else torch.ops.wtacrs.draw
    return draw(p, u, k, adaptive, fraction, sampling == "systematic")


def draw_rows(
    p: Tensor, u: Tensor, k: int, adaptive: bool, fraction: float, systematic: bool
) -> Tuple[Tensor, Tensor]:
    """One draw: ``(idx, weight)`` from probabilities ``p`` (``(*B, N)``, summing to 1) and
    uniform noise ``u`` (``(*B, 1)`` systematic, ``(*B, k)`` i.i.d.); ``fraction`` is the
    fixed winner fraction where not ``adaptive``.

    In a graph it is one op, ``wtacrs::draw`` (below), by default: a short chain of small ops
    on N or k numbers (top-k, two cumulative sums, a scatter, a search, gathers) that, traced,
    has Inductor generate and compile code for every draw site.  As an op it runs as eager
    ATen calls instead (36-41 ms of a 1.27 s MiniLM step on the 2-core CPU under the profiler,
    ``results/profile-minilm.md``); ``inline_draws=True`` traces it in, for Inductor to fuse
    (fewer launches on a GPU), at that compile-time price.
    """
    n = p.shape[-1]
    top_p, top_idx = torch.topk(p, k, dim=-1)
    c = winner_count(top_p, k, "adaptive" if adaptive else fraction)
    slot = torch.arange(k, device=p.device).expand_as(top_idx)
    is_winner = slot < c

    # Mass of the non-winners, and their CDF for inverse-transform sampling.
    winner_mass = torch.zeros_like(p).scatter(-1, top_idx, torch.where(is_winner, top_p, 0.0))
    rest = torch.where(winner_mass > 0, 0.0, p)
    rest_mass = rest.sum(-1, keepdim=True)
    cdf = torch.cumsum(rest, dim=-1)
    # u in (0, 1]: a target > 0 never lands on a zero-mass row at the start of the CDF.
    n_drawn = (k - c).to(p.dtype)
    if systematic:
        # Drawn slot j = 0..m-1 (slot index minus c; winner slots' targets are unused) targets
        # (j + U) / m: m evenly spaced points, one random offset per leading index.
        j = (slot - c).clamp_min(0).to(p.dtype)
        target = 1.0 - (j + u) / n_drawn
    else:
        target = 1.0 - u
    drawn = torch.searchsorted(cdf.contiguous(), (target * rest_mass).contiguous()).clamp_max(n - 1)
    p_drawn = torch.gather(p, -1, drawn)
    w_drawn = torch.where(
        p_drawn > 0, rest_mass / (n_drawn * p_drawn.clamp_min(torch.finfo(torch.float32).tiny)), 0.0
    )
    idx = torch.where(is_winner, top_idx, drawn)
    weight = torch.where(is_winner, torch.ones_like(w_drawn), w_drawn)
    return idx, weight


@torch.library.custom_op("wtacrs::draw", mutates_args=())
def _draw(
    p: Tensor, u: Tensor, k: int, adaptive: bool, fraction: float, systematic: bool
) -> Tuple[Tensor, Tensor]:
    """:func:`draw_rows` as one graph op.  Plain tensors in and out, no side effect: the
    partitioner may save its outputs (k indices and weights) or recompute it."""
    return draw_rows(p, u, k, adaptive, fraction, systematic)


@_draw.register_fake
def _(p, u, k, adaptive, fraction, systematic):
    shape = (*p.shape[:-1], k)
    return p.new_empty(shape, dtype=torch.int64), p.new_empty(shape, dtype=torch.float32)


@dataclass(frozen=True)
class DrawSpec:
    """How one draw is made, as the rewriters need it: ``k`` rows (an int, or a function of
    the traced row count ``N``, a SymInt under dynamic shapes), the winner rule and the
    sampling.  Hashable: it keys the traced-subgraph cache and shared forward draws."""

    k: Union[int, Callable[[Any], Any]]
    deterministic: DeterministicT = "adaptive"
    sampling: str = "systematic"
    inline: bool = False  # traced ops instead of the wtacrs::draw op (see draw_rows)
    recompute_x: bool = False  # backward draws: trace X's side where X is recomputable

    def k_of(self, n: Any) -> Any:
        return self.k(n) if callable(self.k) else self.k

    def sample(self, scores: Tensor, noise: Callable[..., Tensor] = rng.uniform) -> Tuple[Tensor, Tensor]:
        """:func:`wtacrs_sample` over the last dim of ``scores`` with this spec."""
        return wtacrs_sample(scores, self.k_of(scores.shape[-1]), self.deterministic, self.sampling, noise, self.inline)


# --------------------------------------------------------------------------------------
# A site's product over the rows it reads.  Its two operands are X (forward) and G
# (gradient), contracted over N rows: one (N, d) matrix each for an ``mm`` site, one per
# batch entry for a ``bmm`` site, either possibly given transposed.  The rewriters trace these.

def as_rows(t: Tensor, transposed: bool) -> Tensor:
    """``t`` with the contracted N along the last-but-one dimension."""
    return t.transpose(-1, -2) if transposed else t


def take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of ``t``: ``(k,)`` of an ``(N, d)`` matrix, or ``(b, k)`` of a ``(b, n, d)``
    batch, one gather with static shapes."""
    if t.dim() == 2:
        return t[idx]
    return torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def take_rows_eager(t: Tensor, idx: Tensor) -> Tensor:
    """:func:`take_rows` for the ops' eager bodies: ``index_select``, which on the CPU gathers
    615 of 2,048 rows of a contiguous 2,048 x 1,536 matrix in 0.17 ms against 1.9 ms for
    advanced indexing; rows of a transposed layout (``d x N`` in memory) are gathered as its
    columns (3.7 ms against 10.6 ms; a probe of 50 calls each, torch 2.14.1, 2 threads, not
    committed).  The same values as :func:`take_rows`."""
    if t.dim() != 2:
        return take_rows(t, idx)
    if t.stride(0) == 1 and t.stride(1) != 1:
        return t.t().index_select(1, idx).t()
    return t.index_select(0, idx)


def weighted_rows(g_rows: Tensor, idx: Tensor, w: Tensor, take: Callable[[Tensor, Tensor], Tensor] = take_rows) -> Tensor:
    """Rows ``idx`` of G scaled by their importance weights, in float32, back in G's dtype."""
    return (take(g_rows, idx).float() * w.unsqueeze(-1)).to(g_rows.dtype)


def product(gs: Tensor, xs: Tensor, x_side: str) -> Tensor:
    """The site's product over the rows given: ``X^T G`` (X first) or ``G^T X``."""
    mm = torch.bmm if xs.dim() == 3 else torch.mm
    if x_side == "a":
        return mm(xs.transpose(-1, -2), gs)
    return mm(gs.transpose(-1, -2), xs)


# --------------------------------------------------------------------------------------
# The backward estimate: one op, or X's side traced and G's side one op.


def _eager_row_norms(x: Tensor) -> Tensor:
    """:func:`row_norms` in one pass, for eager code (no float32 copy, no squared temporary);
    accumulated in float32 at least, returned in float32."""
    upcast = torch.float32 if x.dtype.itemsize < 4 else None
    return torch.linalg.vector_norm(x, dim=-1, dtype=upcast).float()


def gradient_draw(
    x_norms: Tensor,
    g_rows: Tensor,
    k: int,
    deterministic: DeterministicT = "adaptive",
    sampling: str = "systematic",
    inline: bool = True,
    norms: Callable[[Tensor], Tensor] = row_norms,
    take: Callable[[Tensor, Tensor], Tensor] = take_rows,
) -> Tuple[Tensor, Tensor]:
    """G's side of a backward draw: from X's row norms ``(*B, N)`` and G's rows
    ``(*B, N, d_g)``, ``k`` row indices drawn with ``p ∝ ||x_i|| ||g_i||`` from the draws'
    own stream (:func:`rng.uniform`) and those rows of G scaled by their weights."""
    idx, w = wtacrs_sample(x_norms * norms(g_rows), k, deterministic, sampling, rng.uniform, inline)
    return idx, weighted_rows(g_rows, idx, w, take)


def _eager_gradient_draw(
    x_norms: Tensor, g: Tensor, k: int, g_t: bool, adaptive: bool, fraction: float, systematic: bool,
) -> Tuple[Tensor, Tensor]:
    """:func:`gradient_draw` from an op's arguments, G's norms in one eager pass: the body of
    ``wtacrs::gradient_draw`` and G's side of ``wtacrs::backward_estimate``."""
    return gradient_draw(
        x_norms, as_rows(g, g_t), k, "adaptive" if adaptive else fraction,
        "systematic" if systematic else "iid", inline=True, norms=_eager_row_norms, take=take_rows_eager,
    )


# ``wtacrs::gradient_draw``: :func:`gradient_draw` as one graph op (``recompute_draw_inputs``):
# G's norms, the noise, the draw and G's weighted rows as eager ATen calls (``g_t``: G given
# transposed).  X's side stays traced (:func:`backward_estimate`): its norms and its k rows
# are a reduction and a gather that Inductor fuses into X's producer, so the partitioner may
# still recompute X (a GeLU or LayerNorm output) instead of saving it; an op's inputs are
# materialized, and the min-cut then keeps them saved.  Tagged random: its noise comes from
# the draws' stream, so it is never merged or replayed.
_gradient_draw = torch.library.custom_op(
    "wtacrs::gradient_draw", _eager_gradient_draw, mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)


@_gradient_draw.register_fake
def _(x_norms, g, k, g_t, adaptive, fraction, systematic):
    rows = as_rows(g, g_t)
    shape = (*rows.shape[:-2], k)
    return rows.new_empty(shape, dtype=torch.int64), rows.new_empty((*shape, rows.shape[-1]))


def backward_estimate(x: Tensor, g: Tensor, x_t: bool, g_t: bool, x_side: str, draw: DrawSpec,
                      trace_x: bool = False) -> Tensor:
    """A weight gradient drawn in backward: the site's product over ``draw.k`` rows drawn with
    ``p ∝ ||x_i|| ||g_i||``, G's rows scaled by their weights.  ``x_t``/``g_t``: the operand
    is given transposed (``d x N``); ``x_side``: ``"a"`` for ``X^T G``, ``"b"`` for ``G^T X``.

    By default the whole estimate is one op, ``wtacrs::backward_estimate``.  ``trace_x`` (or
    ``draw.inline``): X's norms, X's k rows and the product are traced ops and G's side is one op,
    ``wtacrs::gradient_draw`` (traced in too with ``inline``), so that the partitioner may
    recompute X inside those kernels; where nothing could recompute X (a graph input, a
    matmul's output) they would only cost Inductor two more kernels to compile."""
    xr = as_rows(x, x_t)
    k = draw.k_of(xr.shape[-2])
    adaptive = draw.deterministic == "adaptive"
    fraction = -1.0 if adaptive else float(draw.deterministic)
    systematic = draw.sampling == "systematic"
    if not (trace_x or draw.inline):
        return torch.ops.wtacrs.backward_estimate(x, g, k, x_t, g_t, x_side == "a", adaptive, fraction, systematic)
    x_norms = row_norms(xr)
    if draw.inline:
        idx, gs = gradient_draw(x_norms, as_rows(g, g_t), k, draw.deterministic, draw.sampling, inline=True)
    else:
        idx, gs = torch.ops.wtacrs.gradient_draw(x_norms, g, k, g_t, adaptive, fraction, systematic)
    return product(gs, take_rows(xr, idx), x_side)


@torch.library.custom_op("wtacrs::backward_estimate", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _backward_estimate(
    x: Tensor, g: Tensor, k: int, x_t: bool, g_t: bool, x_first: bool,
    adaptive: bool, fraction: float, systematic: bool,
) -> Tensor:
    """:func:`backward_estimate` as one graph op, the backward draws' default form: X's
    norms, then :func:`gradient_draw`, X's k rows and the smaller matmul, as eager ATen
    calls.  Its inputs are materialized in backward, so the partitioner keeps X saved where
    it could recompute it for an exact weight gradient (``recompute_draw_inputs`` traces
    X's side instead).  Tagged random: its noise comes from the draws' stream, so it is
    never merged or replayed."""
    xr = as_rows(x, x_t)
    idx, gs = _eager_gradient_draw(_eager_row_norms(xr), g, k, g_t, adaptive, fraction, systematic)
    return product(gs, take_rows_eager(xr, idx), "a" if x_first else "b")


@_backward_estimate.register_fake
def _(x, g, k, x_t, g_t, x_first, adaptive, fraction, systematic):
    dx = x.shape[-2] if x_t else x.shape[-1]
    dg = g.shape[-2] if g_t else g.shape[-1]
    shape = (*x.shape[:-2], dx, dg) if x_first else (*x.shape[:-2], dg, dx)
    return x.new_empty(shape, dtype=torch.promote_types(x.dtype, g.dtype))


@register_flop_formula(torch.ops.wtacrs.backward_estimate)
def _backward_estimate_flops(x_shape, g_shape, k, *args, out_shape=None, **kwargs) -> int:
    """The smaller matmul's FLOPs (2 k d_x d_g per batch entry); the norms and gathers are
    not matmul-class work, as FlopCounterMode counts."""
    return 2 * k * math.prod(out_shape)


def sampled_matmul_reference(
    a: Tensor,
    b: Tensor,
    k: int,
    deterministic: DeterministicT = "adaptive",
    use_a: bool = True,
    sampling: str = "systematic",
) -> Tensor:
    """Eager reference of the estimator for ``a @ b`` (2-D): used by tests, not by the pass."""
    scores = row_norms(b)
    if use_a:
        scores = scores * row_norms(a.t())
    idx, w = wtacrs_sample(scores, k, deterministic, sampling)
    return (a[:, idx] * w.to(a.dtype)) @ b[idx]
