"""Forward draws skip the rows the attention mask pads; backward checks that their gradient is zero.

A forward draw (``mode="memory"``/``"all"``) sees only ``||x_i||``.  On padded batches most
rows are padding (57 % of a movie-review batch of 64 tokens), and where the model masks them
their gradient is exactly zero: a padded key gets softmax weight exactly 0, and padded
positions reach the loss only through masked pooling or ignored labels.  A ``||x_i||`` draw
spends most of k on rows that add nothing.  With the mask found among the graph's inputs
(``padding_mask="attention_mask"``: the input of that name, integer or boolean, ``(B, L)``), a
linear site whose N rows are the ``(B, L)`` positions of a ``(B, L, D)`` activation, in that
order, draws with ``p_i ∝ ||x_i|| * [mask_i != 0]``::

    before                                       after
    %x2d = view(%x, [B*L, D])                    %x2d  = view(%x, [B*L, D])
                                                 %live = ne(view(%attention_mask, [B*L]), 0)
    %idx, %w = wtacrs_sample(||%x2d||, k)        %idx, %w = wtacrs_sample(||%x2d|| * %live, k)
    ...                                          ...
    %gs = index(%g2d, [%idx]) * %w               %gs  = index(%g2d, [%idx]) * %w
                                                 %chk = wtacrs::padded_rows_zero(%g2d, %live, site)
    %mm' = mm(permute(%gs), %xs)                 %mm' = mm(permute(%gs + %chk), %xs)

The estimate stays unbiased exactly when the padded rows of G are zero.  That is a property
of the model's masking, which this pass does not prove from the graph; backward checks it
instead, on the G it holds anyway (``wtacrs::padded_rows_zero``, whose output is a zero added
to the estimate so that it is never dead code), and raises an error naming the option that
turns the prior off if a padded row carries gradient: never a silent wrong gradient.  The
check reads G once more and, on CUDA, synchronises with the host.

Analysis here, rewrite in :mod:`.sample_matmul`: :func:`find_padding_masks` says per site
which mask input it uses, or why none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.fx as fx

from ..graph_utils import VIEW_OPS, is_call, val
from ..torch_internals import real_tensors
from .match_matmuls import MatmulSite
from .row_ops import mm_operands


@dataclass(frozen=True)
class PaddingMask:
    """The graph input a site's forward draw takes its padding from."""

    node: str  # the placeholder in the joint graph
    input: str  # its name in the Dynamo graph (``l_kwargs_attention_mask_``)


def _input_matches(name: str, wanted: str) -> bool:
    """Dynamo names an input ``l_<name>_`` or ``l_kwargs_<name>_``."""
    name, wanted = name.lower().strip("_"), wanted.lower()
    return name == wanted or name.endswith("_" + wanted)


def mask_inputs(graph: fx.Graph, input_names: Sequence[str], wanted: str) -> List[PaddingMask]:
    """The joint graph's placeholders for the Dynamo inputs named ``wanted`` that can be a
    padding mask: 2-D, integer or boolean (AOTAutograd names input i ``primals_{i+1}``)."""
    found = []
    for node in graph.nodes:
        if node.op != "placeholder" or not node.target.startswith("primals_"):
            continue
        i = int(node.target.rsplit("_", 1)[1]) - 1
        v = val(node)
        if (
            i < len(input_names) and _input_matches(input_names[i], wanted) and isinstance(v, torch.Tensor)
            and v.dim() == 2 and not v.dtype.is_floating_point and not v.dtype.is_complex
        ):
            found.append(PaddingMask(node.name, input_names[i]))
    return found


def _rows_in_mask_order(x: fx.Node, x_t: bool, mask_shape: torch.Size) -> bool:
    """Whether the rows of the site's operand ``x`` are the ``(B, L)`` positions in the mask's
    flattened order: the view chain from a ``(B, L, ...)`` tensor replayed on its row ids."""
    chain = []
    node = x
    while is_call(node, *VIEW_OPS):
        chain.append(node)
        node = node.args[0]
    root = val(node)
    if not isinstance(root, torch.Tensor) or root.dim() < 3 or tuple(root.shape[:2]) != tuple(mask_shape):
        return False
    if not all(isinstance(d, int) for d in root.shape):
        return False
    with real_tensors():
        n = mask_shape[0] * mask_shape[1]
        ids = torch.arange(n).reshape(*mask_shape, *[1] * (root.dim() - 2)).expand(root.shape)
        try:
            for view in reversed(chain):
                ids = view.target(ids, *view.args[1:], **view.kwargs)
        except (RuntimeError, TypeError, ValueError):  # a view that does not apply to row ids: not provable here
            return False
        rows = ids.transpose(-1, -2) if x_t else ids
        if rows.dim() != 2 or rows.shape[0] != n:
            return False
        return bool((rows == torch.arange(n).unsqueeze(-1)).all())


def find_padding_masks(
    graph: fx.Graph, sites: Sequence[MatmulSite], input_names: Sequence[str], wanted: Optional[str]
) -> Dict[str, Union[PaddingMask, str]]:
    """Per forward-drawn linear site (by node name): the :class:`PaddingMask` its draw uses,
    or a string saying why it uses none."""
    if not wanted:
        return {s.node: "padding_mask=None" for s in sites}
    nodes = {n.name: n for n in graph.nodes}
    masks = mask_inputs(graph, input_names, wanted)
    out: Dict[str, Union[PaddingMask, str]] = {}
    for site in sites:
        if site.kind == "bmm" or site.dynamic_n:
            out[site.node] = "attention bmm or symbolic N: no padding prior"
            continue
        if not masks:
            out[site.node] = f"no 2-D integer input named {wanted!r}"
            continue
        x, x_t, _, _ = mm_operands(nodes[site.node], site)
        fits = [m for m in masks if _rows_in_mask_order(x, x_t, val(nodes[m.node]).shape)]
        if len(fits) == 1:
            out[site.node] = fits[0]
        else:
            out[site.node] = (f"rows are not the positions of {wanted!r}" if not fits
                              else f"{len(fits)} inputs named {wanted!r} fit")
    return out


@torch.library.custom_op("wtacrs::padded_rows_zero", mutates_args=())
def padded_rows_zero(g_rows: torch.Tensor, live: torch.Tensor, where: str) -> torch.Tensor:
    """A zero ``(1,)`` after checking that the rows of ``g_rows`` (N x d) where ``live`` is
    false are zero; raises otherwise (the forward draw gave them probability 0)."""
    dead = g_rows[~live]
    if dead.numel() and bool((dead != 0).any()):
        rows = int((dead != 0).any(dim=-1).sum())
        raise RuntimeError(
            f"wtacrs: {where}: {rows} rows the padding mask removes carry gradient, so the forward "
            f"draw, which gave them probability 0, would be biased.  This model does not zero the "
            f"gradient of padded positions: compile with options={{'padding_mask': None}}, or name "
            f"the input that marks its padding"
        )
    return g_rows.new_zeros((1,), dtype=torch.float32)


@padded_rows_zero.register_fake
def _(g_rows, live, where):
    return g_rows.new_empty((1,), dtype=torch.float32)
