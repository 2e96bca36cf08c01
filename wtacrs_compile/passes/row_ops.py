"""What the rewriters share: the operands of a matched product, and the tensor functions they
trace into the graph.

A site's weight gradient contracts two operands over N rows: ``X`` (forward) and ``G``
(gradient).  An ``mm`` site holds them as 2-D matrices, a ``bmm`` site as one ``(n, d)``
matrix per batch entry; either may be given transposed.  The tensor functions the
rewriters trace (rows along the contracted dimension, picking sampled or live rows, the
product, for both ranks) live in ``estimator.py``, beside the estimator they serve, and are
re-exported here, so that ``sample_matmul.py``, ``sample_bmm.py`` and ``live_rows.py`` differ
only in what they pick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch.fx as fx

from ..estimator import as_rows, product, take_rows, weighted_rows  # noqa: F401 (the rewriters' tensor functions)
from ..graph_utils import transposed_source
from .match_bmm import operand_rows
from .match_matmuls import MatmulSite


def mm_operands(node: fx.Node, site: MatmulSite) -> Tuple[fx.Node, bool, fx.Node, bool]:
    """``(x, x_t, g, g_t)`` of a matched ``mm``: the nodes X and G are read from and whether
    each is given transposed (``D x N``)."""
    a, b = node.args[0], node.args[1]
    if site.x_side == "b":
        x, g_t = b, a
        g = transposed_source(g_t)
        return x, False, (g if g is not None else g_t), g is None
    x_t, g = a, b
    x = transposed_source(x_t)
    return (x if x is not None else x_t), x is None, g, False


def bmm_operands(node: fx.Node, site: MatmulSite) -> Tuple[fx.Node, bool, fx.Node, bool]:
    """``(x, x_t, g, g_t)`` of a matched ``bmm`` (per batch entry)."""
    a, b = node.args[0], node.args[1]
    x_first = site.x_side == "a"
    x, x_t = operand_rows(a if x_first else b, first=x_first)
    g, g_t = operand_rows(b if x_first else a, first=not x_first)
    return x, x_t, g, g_t


@dataclass(frozen=True)
class Feedback:
    """A forward draw's entry in the gradient-norm cache (:mod:`~wtacrs_compile.feedback`):
    its key, how many sites read the draw (each writes its ``||g_i||``), and the positions
    per example of its N rows (0: unknown)."""

    key: str
    readers: int = 1
    positions: int = 0
