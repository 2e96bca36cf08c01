"""What the rewriters share: the operands of a matched product, and the tensor functions they
trace into the graph.

A site's weight gradient contracts two operands over N rows: ``X`` (forward) and ``G``
(gradient).  An ``mm`` site holds them as 2-D matrices, a ``bmm`` site as one ``(n, d)``
matrix per batch entry; either may be given transposed.  The functions below take rows along
the contracted dimension (the last-but-one after :func:`as_rows`), pick sampled or live rows
out of them and form the product, for both ranks, so that ``sample_matmul.py``,
``sample_bmm.py`` and ``live_rows.py`` differ only in what they pick.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.fx as fx

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


def as_rows(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``t`` with the contracted N along the last-but-one dimension."""
    return t.transpose(-1, -2) if transposed else t


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``t``: ``(k,)`` of an ``(N, d)`` matrix, or ``(b, k)`` of a ``(b, n, d)``
    batch, one gather with static shapes."""
    if t.dim() == 2:
        return t[idx]
    return torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def weighted_rows(g_rows: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of G scaled by their importance weights, in float32, back in G's dtype."""
    return (take_rows(g_rows, idx).float() * w.unsqueeze(-1)).to(g_rows.dtype)


def product(gs: torch.Tensor, xs: torch.Tensor, x_side: str) -> torch.Tensor:
    """The site's product over the rows given: ``X^T G`` (X first) or ``G^T X``."""
    mm = torch.bmm if xs.dim() == 3 else torch.mm
    if x_side == "a":
        return mm(xs.transpose(-1, -2), gs)
    return mm(gs.transpose(-1, -2), xs)
