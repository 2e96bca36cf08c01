"""Weight gradients over the rows of G that can be non-zero: exact, fewer bytes, fewer FLOPs.

A classifier that reads one token (``hidden[:, 0]``, ``[CLS]`` pooling) or a head that reads
the last position gives every op of the last block a gradient ``G`` that is zero on all other
rows.  After AOTAutograd the zeros are visible in the joint graph: ``select`` differentiates
to ``select_scatter`` into a ``full(..., 0)``, and the row-wise ops between there and the
weight gradient (LayerNorm backward, GeLU backward, ``mm`` with a weight, views) keep them::

    before                                       after
    %zeros = full([B, L, D], 0)                  (unchanged)
    %g3d   = select_scatter(%zeros, %g_cls, 1, 0)
    ...                                          ...
    %g2d   = view(%mul_10, [B*L, D_out])         %g2d = view(%mul_10, [B*L, D_out])
                                                 %gl  = slice(%g2d, 0, 0, B*L, L)   # B rows
                                                 %xl  = clone(slice(%x2d, 0, 0, B*L, L))
    %mm_1  = mm(permute(%g2d), %x2d)             %mm_1' = mm(permute(%gl), %xl)

``dW = G^T X`` sums over rows, and rows where ``G`` is zero add nothing, so reading only the
live rows is exact (up to the summation order of the matmul).  ``%xl`` depends on forward
values only: the partitioner saves its B rows instead of the B*L rows of ``X`` unless
another op needs ``X`` anyway.  The op is then never sampled (decision ``live_rows``).

The analysis is an abstract interpretation of the joint graph on boolean masks: each node
that depends on a zero-filled tensor carries a mask of where it may be non-zero, computed by
running the op itself on the masks (views, scatters, sums) or its rule (``a * b``: both
non-zero; ``a + b``: either; ``mm``: any product term).  Every other op, and every node that
does not depend on a zero constructor, may be non-zero everywhere.  Masks need static shapes;
live rows are used only when they form an evenly strided set (a slice: ``[CLS]`` rows are
every L-th row), else the op stays as it is, with the reason in the report.

One assumption, shared with every compiler that folds ``0 * x``: forward values are finite
(an infinite value times a zero gradient row is NaN in the exact graph and 0 here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.fx as fx

from ..graph_utils import aten, fake_mode_of, replace_with_estimate, trace, val
from ..torch_internals import real_tensors
from .match_matmuls import MatmulSite
from .row_ops import as_rows, mm_operands, product

Mask = Optional[torch.Tensor]  # None: may be non-zero everywhere

# Masks larger than this are not built (the op is treated as non-zero everywhere).
MAX_MASK_ELEMENTS = 1 << 26

_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
_FILLS = (aten.full.default, aten.full_like.default, aten.new_full.default)
# ops that map the mask exactly as they map the tensor (arguments after the first are static)
_SHAPE_OPS = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.select.int, aten.slice.Tensor,
    aten.clone.default, aten.alias.default,
)
_SAME = (torch.ops.prims.convert_element_type.default, aten._to_copy.default, aten.neg.default,
         aten.mul.Scalar, aten.div.Scalar)  # (a zero stays zero: scalars are finite)
_SCATTERS = (aten.select_scatter.default, aten.slice_scatter.default)


@dataclass(frozen=True)
class LiveRows:
    """The rows of a site's N that can carry gradient: ``start::step``, ``count`` of them."""

    start: int
    step: int
    count: int
    n: int

    def as_slice(self) -> slice:
        return slice(self.start, self.start + self.step * (self.count - 1) + 1, self.step)

    def describe(self) -> str:
        where = f"row {self.start}" if self.count == 1 else (
            f"rows {self.start}, {self.start + self.step}, ... (every {self.step})" if self.step > 1
            else f"rows {self.start}..{self.start + self.count - 1}"
        )
        return f"{self.count} of {self.n} rows of G can be non-zero ({where})"


def _shape(node: fx.Node) -> Optional[tuple]:
    v = val(node)
    if not isinstance(v, torch.Tensor) or not all(isinstance(d, int) for d in v.shape):
        return None
    return tuple(v.shape)


def _full(mask: Mask, shape: tuple) -> torch.Tensor:
    """The mask materialised at ``shape`` (True everywhere for None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    return mask.expand(shape).contiguous() if tuple(mask.shape) != shape else mask


def _is_zero(x) -> bool:
    return isinstance(x, (int, float, bool)) and x == 0


def _transfer(node: fx.Node, masks: Dict[fx.Node, torch.Tensor]) -> Mask:
    """The mask of ``node``'s output from its inputs' masks; None where nothing is known."""
    shape = _shape(node)
    if shape is None or node.op != "call_function":
        return None
    t, args = node.target, node.args
    if t in _ZEROS or (t in _FILLS and _is_zero(args[1] if t is not aten.new_full.default else args[2])):
        if torch.Size(shape).numel() > MAX_MASK_ELEMENTS:
            return None
        return torch.zeros(shape, dtype=torch.bool)

    def m(a) -> Mask:
        return masks.get(a) if isinstance(a, fx.Node) else None

    if not any(isinstance(a, fx.Node) and a in masks for a in node.all_input_nodes):
        return None
    if t in _SCATTERS:
        base, src = args[0], args[1]
        src_shape = _shape(src) if isinstance(src, fx.Node) else None
        if src_shape is None:
            return None
        return t(_full(m(base), shape), _full(m(src), src_shape), *args[2:], **node.kwargs)
    if t in _SHAPE_OPS or t in _SAME:
        a = m(args[0])
        if a is None:
            return None
        if t in _SAME:
            return a
        if t in (aten.view.default, aten._unsafe_view.default):
            return a.reshape(args[1])
        return t(a, *args[1:], **node.kwargs)
    if t is aten.mul.Tensor:
        a, b = m(args[0]), m(args[1])
        if a is None and b is None:
            return None
        return a if b is None else b if a is None else a & b
    if t is torch.ops.prims.fma.default:  # a * b + c (softmax backward)
        a, b, c = (m(x) if isinstance(x, fx.Node) else None for x in args[:3])
        if c is None:  # c a constant, or a node that may be non-zero everywhere
            return None
        prod = a if b is None else b if a is None else a & b
        return None if prod is None else torch.broadcast_to(prod | c, shape)
    if t is aten.div.Tensor:  # 0 / b is 0 for b != 0 (and the forward is finite)
        return m(args[0])
    if t in (aten.add.Tensor, aten.sub.Tensor):
        a, b = args[0], args[1]
        if not isinstance(b, fx.Node):  # x + c: zero stays zero only for c == 0
            return m(a) if _is_zero(b) else None
        ma, mb = m(a), m(b)
        return None if ma is None or mb is None else ma | mb
    if t is aten.where.self:
        a, b = args[1], args[2]
        if not (isinstance(a, fx.Node) or _is_zero(a)) or not (isinstance(b, fx.Node) or _is_zero(b)):
            return None
        ma = m(a) if isinstance(a, fx.Node) else torch.zeros((), dtype=torch.bool)
        mb = m(b) if isinstance(b, fx.Node) else torch.zeros((), dtype=torch.bool)
        return None if ma is None or mb is None else torch.broadcast_to(ma | mb, shape)
    if t in (aten.mm.default, aten.bmm.default):
        a, b = args[0], args[1]
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None:
            return None
        return (_full(m(a), sa).float() @ _full(m(b), sb).float()) > 0
    if t is aten.sum.dim_IntList:
        a = m(args[0])
        if a is None:
            return None
        dims = args[1] if len(args) > 1 and args[1] else list(range(a.dim()))
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        full = _full(a, _shape(args[0]))
        return full.any(dim=tuple(dims), keepdim=keep) if full.dim() else full
    return None


def nonzero_masks(graph: fx.Graph, wanted: Iterable[fx.Node]) -> Dict[fx.Node, torch.Tensor]:
    """Masks of where each of ``wanted`` may be non-zero; a node not in the result may be
    non-zero everywhere."""
    with real_tensors():
        return _nonzero_masks(graph, set(wanted))


def _nonzero_masks(graph: fx.Graph, wanted: set) -> Dict[fx.Node, torch.Tensor]:
    remaining = {n: len(n.users) for n in graph.nodes}
    masks: Dict[fx.Node, torch.Tensor] = {}
    out: Dict[fx.Node, torch.Tensor] = {}
    for node in graph.nodes:
        mask = _transfer(node, masks)
        if mask is not None and not bool(mask.all()):
            masks[node] = mask
            if node in wanted:
                out[node] = mask
        for a in node.all_input_nodes:  # free masks no later node reads
            remaining[a] -= 1
            if remaining[a] == 0:
                masks.pop(a, None)
    return out


def _strided(rows: torch.Tensor) -> Optional[LiveRows]:
    idx = rows.nonzero().flatten().tolist()
    if not idx:
        return None
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if any(b - a != step for a, b in zip(idx, idx[1:])):
        return None
    return LiveRows(idx[0], step, len(idx), rows.numel())


def find_live_rows(graph: fx.Graph, sites: List[MatmulSite]) -> Dict[str, object]:
    """Per linear site (by node name): its :class:`LiveRows` where some rows of G are provably
    zero, or a string saying why such rows were found but are not used."""
    nodes = {n.name: n for n in graph.nodes}
    candidates = [s for s in sites if s.kind in ("linear", "lora") and s.batch == 1 and not s.dynamic_n
                  and not s.skip_reason]
    grads = {s.node: mm_operands(nodes[s.node], s) for s in candidates}
    masks = nonzero_masks(graph, [xg[2] for xg in grads.values()])
    found: Dict[str, object] = {}
    with real_tensors():
        for site in candidates:
            _, _, g, g_t = grads[site.node]
            rows = _site_rows(site, g, g_t, masks)
            if rows is not None:
                found[site.node] = rows
    return found


def _site_rows(site: MatmulSite, g: fx.Node, g_t: bool, masks: Dict[fx.Node, torch.Tensor]) -> object:
    """``site``'s LiveRows, a reason string, or None (every row of G may be non-zero)."""
    mask = masks.get(g)
    if mask is None:
        return None
    rows = as_rows(mask, g_t).any(dim=-1)
    if rows.numel() != site.n:
        return None
    live = _strided(rows)
    if live is None:
        return f"{int(rows.sum())} of {site.n} rows of G can be non-zero, not an evenly strided set: all rows read"
    return live


def rewrite_with_live_rows(
    graph: fx.Graph, node: fx.Node, site: MatmulSite, live: LiveRows, cache: Optional[dict] = None
) -> None:
    """``mm(G^T, X)`` -> ``mm(G[rows]^T, clone(X[rows]))``: exact."""
    x, x_t, g, g_t = mm_operands(node, site)
    rows = live.as_slice()

    def exact(x_in, g_in):
        xr, gr = as_rows(x_in, x_t), as_rows(g_in, g_t)
        return product(gr[rows], xr[rows].clone(), site.x_side)

    key = ("live_rows", x_t, g_t, site.x_side, live.start, live.step, live.count)
    sub = trace(exact, [val(x), val(g)], fake_mode_of(graph), cache, key)
    replace_with_estimate(graph, node, sub, [x, g])


