"""Rewrite a matched weight-gradient matmul to the WTA-CRS estimator.

Forward sampling (``memory``), for ``dW = mm(permute(G), X)``::

    before                                   after
    %x2d = view(%x, [N, D])                  %x2d = view(%x, [N, D])
                                             %idx, %w = wtacrs_sample(||%x2d||, k)
                                             %xs  = index(%x2d, [%idx])
    %mm  = mm(permute(%g2d), %x2d)           %gs  = index(%g2d, [%idx]) * %w[:, None]
                                             %mm' = mm(permute(%gs), %xs)

``%idx``, ``%w`` and ``%xs`` depend only on forward values and no forward output reads them,
so the partitioner is free to save them, or to save what they are computed from and compute
them in backward.  The one thing it must not do is draw the noise again: the partitioner does
not ban recomputation of such nodes, so the draw's ``aten.rand_like`` is tagged
``MUST_RECOMPUTE``, which makes AOTAutograd replay it in backward under the RNG state saved
in forward (``functionalize_rng_ops``); that replay knows torch's generators only, so forward
draws take their noise from torch's generator (``torch_internals.replayable_uniform``) and
backward draws from the backend's own stream (``rng.py``).  Either way backward uses exactly
the rows drawn in forward.  Whether the full ``%x2d`` then leaves the saved set is the
partitioner's call; the planner only picks this rewrite where it measured that it does.

Backward sampling (``compute``) draws in backward with ``p ∝ ||x_i|| ||g_i||``: the exact
gradient-row norms (lower variance), nothing saved, weight-gradient FLOPs cut to ``k/N``.

The rows of ``X`` are saved unscaled; the importance weights scale the rows of ``G`` (in
float32), so a low-precision activation is stored bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..estimator import DrawSpec, backward_estimate, row_norms
from ..torch_internals import replayable_uniform
from ..graph_utils import fake_mode_of, insert_forward_draw, recomputable, replace_with_estimate, trace, val
from .match_matmuls import MatmulSite
from .row_ops import Feedback, as_rows, bmm_operands, mm_operands, product



@dataclass
class ForwardSample:
    """The saved sample of one activation, shared by every site that reads it."""

    idx: fx.Node
    weight: fx.Node
    rows: fx.Node
    feedback: Optional[Feedback] = None
    live: Optional[fx.Node] = None  # the rows the padding mask keeps (padding_prior.py)


def draw_forward_sample(
    graph: fx.Graph,
    node: fx.Node,
    site: MatmulSite,
    draw: DrawSpec,
    cache: Optional[dict] = None,
    feedback: Optional[Feedback] = None,
    mask: Optional[fx.Node] = None,
) -> ForwardSample:
    """Insert the forward draw for ``site``'s activation; tag its outputs MUST_SAVE.

    ``feedback``: the draw's cache entry; scores become ``||x_i|| * cached ||g_i||``.
    ``mask``: the padding mask input whose flattened positions are X's rows; rows it pads get
    probability 0 (:mod:`.padding_prior`)."""
    x, x_t, _, _ = mm_operands(node, site)

    def sample(x_in, *mask_in):
        rows = as_rows(x_in, x_t)
        scores = row_norms(rows)
        if feedback is not None:
            scores = scores * torch.ops.wtacrs.gnorm_read(scores, feedback.key, feedback.positions)
        live = ()
        if mask_in:
            live = (mask_in[0].reshape(-1) != 0,)
            scores = scores * live[0]
        idx, w = draw.sample(scores, noise=replayable_uniform)
        return (idx, w, rows[idx], *live)

    inputs = [x] if mask is None else [x, mask]
    sub = trace(sample, [val(a) for a in inputs], fake_mode_of(graph), cache, ("fwd_sample", x_t, draw, feedback))
    idx, w, rows, *live = insert_forward_draw(graph, sub, *inputs)
    return ForwardSample(idx, w, rows, feedback, live[0] if live else None)


def rewrite_with_forward_sample(
    graph: fx.Graph, node: fx.Node, site: MatmulSite, sample: ForwardSample, cache: Optional[dict] = None
) -> None:
    """``mm(G^T, X)`` -> ``mm((w * G[idx])^T, X[idx])`` with the saved forward sample; with
    the sample's feedback entry, also store this step's ``||g_i||`` in the cache; with its
    padding mask, check that the padded rows of G are zero."""
    _, _, g, g_t = mm_operands(node, site)
    feedback, where = sample.feedback, f"{site.fqn or site.node} ({site.node})"

    def estimate(g_in, idx, w, xs, *live):
        rows = as_rows(g_in, g_t)
        scaled = rows[idx].float() * w.unsqueeze(-1)
        # each adds a zero the compiler cannot fold: keeps the call alive
        if feedback is not None:
            write = torch.ops.wtacrs.gnorm_write(row_norms(rows), feedback.key, feedback.readers, feedback.positions)
            scaled = scaled + write
        if live:
            scaled = scaled + torch.ops.wtacrs.padded_rows_zero(rows, live[0], where)
        return product(scaled.to(rows.dtype), xs, site.x_side)

    args = [g, sample.idx, sample.weight, sample.rows] + ([sample.live] if sample.live is not None else [])
    key = ("fwd_estimate", g_t, site.x_side, feedback, where if sample.live is not None else None)
    sub = trace(estimate, [val(a) for a in args], fake_mode_of(graph), cache, key)
    replace_with_estimate(graph, node, sub, args)


def rewrite_with_backward_sample(
    graph: fx.Graph,
    node: fx.Node,
    site: MatmulSite,
    draw: DrawSpec,
    cache: Optional[dict] = None,
) -> None:
    """``mm(G^T, X)`` -> the estimator drawn in backward with ``p ∝ ||x_i|| ||g_i||``; a
    ``bmm`` site draws per batch entry.  By default the whole estimate is one
    ``wtacrs::backward_estimate`` op (eager ATen calls, no kernel for Inductor to compile).
    With ``recompute_draw_inputs``, where X could be recomputed in backward (a GeLU or
    LayerNorm output: :func:`~wtacrs_compile.graph_utils.recomputable`), X's norms and k
    rows are traced (Inductor fuses them into X's producer, which the partitioner may then
    recompute instead of saving X) and G's side is one ``wtacrs::gradient_draw`` op.
    ``inline_draws`` traces everything (``estimator.backward_estimate``)."""
    x, x_t, g, g_t = (bmm_operands if site.kind == "bmm" else mm_operands)(node, site)
    trace_x = draw.recompute_x and recomputable(x)

    def estimate(x_in, g_in):
        return backward_estimate(x_in, g_in, x_t, g_t, site.x_side, draw, trace_x)

    key = ("bwd_estimate", site.kind == "bmm", x_t, g_t, site.x_side, draw, trace_x)
    sub = trace(estimate, [val(x), val(g)], fake_mode_of(graph), cache, key)
    replace_with_estimate(graph, node, sub, [x, g])
