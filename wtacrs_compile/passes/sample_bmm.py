"""Rewrite a matched backward bmm to the WTA-CRS estimator, one draw per batch entry.

A site (see :mod:`.match_bmm`) is ``b`` independent products contracted over ``n``; each
batch entry (in attention: each (batch, head)) gets its own ``k`` of the ``n`` rows.  Rows are
gathered with ``torch.gather`` on a ``(b, k)`` index, so every shape stays static.

Forward sampling (``memory``), for ``dQ = bmm(dS, permute(%kt3, [0, 2, 1]))`` (``X = K``)::

    before                                     after
    %kt3   = view(..., [BH, D, S])             %kt3   = view(..., [BH, D, S])
                                               %kr    = permute(%kt3, [0, 2, 1])      # rows of X
                                               %idx, %w = wtacrs_sample(||%kr||, k)   # (BH, k)
                                               %ks    = gather(%kr, 1, %idx)          # (BH, k, D)
    %bmm_5 = bmm(%gs3, permute(%kt3, ...))     %gk    = gather(permute(%gs3), 1, %idx) * %w
                                               %bmm_5'= bmm(permute(%gk), %ks)

``%idx``, ``%w`` and ``%ks`` depend only on forward values; the draw's ``aten.rand_like`` is
tagged ``MUST_RECOMPUTE``, so if the partitioner recomputes the draw in backward it replays
the noise under the RNG state saved in forward (``functionalize_rng_ops``) instead of
drawing other indices than the forward pass saved rows for.  (Forward draws therefore take
their noise from torch's generator; backward draws from the backend's own, ``rng.py``.)
Probabilities: ``||x_i||`` of the forward operand (``g`` is not known yet), times the cached
``||g_i||`` of each (example, head, row) with ``grad_norm_feedback``.  Whether the full ``X`` then leaves the
saved set is the partitioner's call; the planner measures it.  For the softmax output ``P``
(``X`` of ``dV = bmm(P^T, dC)``) it usually does not: softmax's backward needs ``P`` itself.

Backward sampling (``compute``) draws in backward with ``p ∝ ||x_i|| ||g_i||``: nothing is
saved, the bmm's FLOPs drop to ``k/n`` (``sample_matmul.rewrite_with_backward_sample``, the
same rewrite for both ranks).

Rows of ``X`` are kept unscaled; the importance weights scale the rows of ``G`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..estimator import DrawSpec, row_norms
from ..torch_internals import replayable_uniform
from ..graph_utils import fake_mode_of, insert_forward_draw, replace_with_estimate, trace, val
from .match_matmuls import MatmulSite
from .row_ops import Feedback, as_rows, bmm_operands, product, take_rows, weighted_rows


@dataclass
class BmmForwardSample:
    """The saved sample of one operand's rows, shared by every site that reads them."""

    idx: fx.Node  # (b, k) int64
    weight: fx.Node  # (b, k) float32
    rows: fx.Node  # (b, k, d): the sampled rows of X, unscaled
    feedback: Optional[Feedback] = None


def draw_bmm_forward_sample(
    graph: fx.Graph, node: fx.Node, site: MatmulSite, draw: DrawSpec,
    cache: Optional[dict] = None, feedback: Optional[Feedback] = None,
) -> BmmForwardSample:
    """Insert the forward draw of ``site``'s X rows, ``p_i ∝ ||x_i||`` per batch entry, times
    the cached ``||g_i||`` of each (batch entry, row) with ``feedback``."""
    x, x_t, _, _ = bmm_operands(node, site)

    def sample(x_in):
        rows = as_rows(x_in, x_t)
        scores = row_norms(rows)
        if feedback is not None:  # the (b, n) scores flattened: example, head, position
            flat = scores.reshape(-1)
            scores = (flat * torch.ops.wtacrs.gnorm_read(flat, feedback.key, feedback.positions)).reshape(scores.shape)
        idx, w = draw.sample(scores, noise=replayable_uniform)
        return idx, w, take_rows(rows, idx)

    sub = trace(sample, [val(x)], fake_mode_of(graph), cache, ("bmm_fwd_sample", x_t, draw, feedback))
    idx, w, rows = insert_forward_draw(graph, sub, x)
    return BmmForwardSample(idx, w, rows, feedback)


def rewrite_bmm_with_forward_sample(
    graph: fx.Graph, node: fx.Node, site: MatmulSite, sample: BmmForwardSample, cache: Optional[dict] = None
) -> None:
    """The site's bmm on the saved rows of X and the matching, weighted rows of G; with the
    sample's feedback entry, also store this step's ``||g_i||`` in the cache."""
    _, _, g, g_t = bmm_operands(node, site)
    feedback = sample.feedback

    def estimate(g_in, idx, w, xs):
        rows = as_rows(g_in, g_t)
        gs = weighted_rows(rows, idx, w)
        if feedback is not None:  # adds a zero the compiler cannot fold: keeps the write alive
            norms = row_norms(rows).reshape(-1)
            gs = gs + torch.ops.wtacrs.gnorm_write(norms, feedback.key, feedback.readers, feedback.positions).to(gs.dtype)
        return product(gs, xs, site.x_side)

    args = [g, sample.idx, sample.weight, sample.rows]
    key = ("bmm_fwd_estimate", g_t, site.x_side, feedback)
    sub = trace(estimate, [val(a) for a in args], fake_mode_of(graph), cache, key)
    replace_with_estimate(graph, node, sub, args)
