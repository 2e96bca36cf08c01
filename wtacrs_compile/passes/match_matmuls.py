"""Find the matmuls of a joint graph whose forward operand is saved for a weight gradient.

Analysis only: this pass changes nothing.  After AOTAutograd and Inductor's decompositions, a
linear layer ``y = x @ W.T + b`` (``linear``/``addmm``/``mm``, 3-D inputs flattened by views)
leaves two matmuls in the backward half of the joint graph::

    %x2d    = view(%x, [N, D_in])                        # forward only
    %addmm  = addmm(%b, %x2d, permute(%W, [1, 0]))       # forward, seq_nr s
    %g2d    = view(%tangents_1, [N, D_out])              # backward
    %mm     = mm(%g2d, %W)                               # dX: exact, not a match
    %mm_1   = mm(permute(%g2d, [1, 0]), %x2d)            # dW = G^T X, seq_nr s: a match

A match is an ``mm`` with exactly one operand that depends on the tangents (``G``) and one
that does not (``X``, contracted over its rows, the tokens), where ``X`` is an activation (not
a view of a parameter: that is the input-gradient matmul) and the forward op it
differentiates (same ``seq_nr``) multiplies ``X`` by a parameter.  Either orientation is
matched: ``mm(G^T, X)`` (``dW``) and ``mm(X^T, G)`` (``dW^T``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..graph_utils import (
    aten,
    innermost_module,
    is_call,
    strip_views,
    view_key,
    tangent_dependent,
    traced_size,
    transposed_source,
    val,
)


@dataclass
class MatmulSite:
    """One matched matmul.  Nodes are kept by name so a site can be re-found in a copy."""

    node: str  # the backward matmul
    kind: str  # "linear" | "lora" | "bmm"
    x_side: str  # "a" when X^T is the first operand, "b" when X is the second
    fqn: str
    module_types: Tuple[type, ...]
    n: int  # rows of X: the contracted dimension that is sampled
    d: int  # columns of X
    x_shape: Tuple[int, ...]
    g_shape: Tuple[int, ...]
    dtype: torch.dtype
    x_key: str  # the N x D node X is read from: sites with one key share a draw
    x_producer: str  # what computes X ("input" for a graph input): part of the planner's class
    skip_reason: str = ""  # non-empty: matched but cannot be rewritten safely
    # bmm sites: independent (n x d) products, one draw each; x_shape stays the per-entry (n, d)
    batch: int = 1
    # N is symbolic (dynamic shapes): ``n`` is -1 and k is a SymInt following N at run time
    dynamic_n: bool = False

    @property
    def x_root(self) -> str:
        """The forward node X comes from, through views (``x_key`` is ``"<root>|<views>"``)."""
        return self.x_key.split("|")[0]

    def x_bytes(self, rows: int) -> int:
        """Bytes of ``rows`` of the N rows of X (per batch entry, times the batch); 0 where a
        size is unknown."""
        return self.batch * rows * self.d * self.dtype.itemsize if rows > 0 and self.d > 0 else 0

    def weight_grad_flops(self, rows: int) -> int:
        """FLOPs of the matmul ``G^T X`` over ``rows`` of the N rows: ``2 rows D_in D_out`` per
        batch entry (traced sizes); 0 where a size is unknown."""
        d_out = traced_size(self.g_shape[-1]) if self.g_shape else 0
        return 2 * self.batch * rows * self.d * d_out if rows > 0 and self.d > 0 and d_out > 0 else 0


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


_CASTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)


def _is_param_derived(node: fx.Node, params: Set[str]) -> bool:
    """A parameter, through views and dtype casts (autocast multiplies ``W.to(bf16)``)."""
    root = strip_views(node)
    while is_call(root, *_CASTS):
        root = strip_views(root.args[0])
    return root.op == "placeholder" and root.name in params


def _forward_linear(node: fx.Node, fwd_by_seq: Dict[int, List[fx.Node]], params: Set[str]) -> Optional[fx.Node]:
    """The forward mm/addmm this backward mm differentiates, when it multiplies by a parameter."""
    for fwd in fwd_by_seq.get(node.meta.get("seq_nr"), []):
        mats = fwd.args[1:3] if fwd.target is aten.addmm.default else fwd.args[0:2]
        if any(_is_param_derived(m, params) for m in mats):
            return fwd
    return None


def find_weight_grad_matmuls(graph: fx.Graph, params: Set[str]) -> List[MatmulSite]:
    """All weight-gradient matmuls of ``graph``; ``params`` names the parameter placeholders."""
    backward = tangent_dependent(graph)
    fwd_by_seq: Dict[int, List[fx.Node]] = {}
    for node in graph.nodes:
        if node not in backward and is_call(node, aten.mm.default, aten.addmm.default):
            fwd_by_seq.setdefault(node.meta.get("seq_nr"), []).append(node)

    sites = []
    for node in graph.nodes:
        if node not in backward or not is_call(node, aten.mm.default):
            continue
        a, b = node.args[0], node.args[1]
        a_dep, b_dep = a in backward, b in backward
        if a_dep == b_dep:
            continue  # both from tangents, or neither: not a gradient of a forward matmul
        x_side = "a" if not a_dep else "b"
        x_operand = a if x_side == "a" else b
        if _is_param_derived(x_operand, params):
            continue  # dX = G @ W: input gradients stay exact
        fwd = _forward_linear(node, fwd_by_seq, params)
        if fwd is None:
            continue  # a product of two activations in 2-D: not a linear layer
        x_val, g_val = val(a if x_side == "a" else b), val(b if x_side == "a" else a)
        if x_side == "a":  # X^T is [D, N]
            d, n = x_val.shape
            x_shape = (n, d)
        else:
            n, d = x_val.shape
            x_shape = (n, d)
        g_shape = tuple(g_val.shape[::-1]) if x_side == "b" else tuple(g_val.shape)
        fqn, types = innermost_module(node)
        if not fqn:
            fqn, types = innermost_module(fwd)
        kind = "lora" if _is_lora(fqn, types) else "linear"
        reason = ""
        if not isinstance(d, int):
            reason = "dynamic shape: the feature dimension is symbolic"
        elif x_val.dtype not in SUPPORTED_DTYPES:
            reason = f"unsupported dtype {x_val.dtype}"
        x_node = x_operand if x_side == "b" else (transposed_source(x_operand) or x_operand)
        x_root = strip_views(x_node)
        producer = "input" if x_root.op == "placeholder" else getattr(x_root.target, "__name__", str(x_root.target))
        sites.append(
            MatmulSite(
                node=node.name,
                kind=kind,
                x_side=x_side,
                fqn=fqn,
                module_types=types,
                n=n if isinstance(n, int) else -1,
                d=d if isinstance(d, int) else -1,
                x_shape=tuple(x_shape),
                g_shape=g_shape,
                dtype=x_val.dtype,
                # The same view of the same tensor, not just the same root: two views of one
                # tensor with equal shapes (a fused QKV split, a transposed reshape) hold
                # different rows.
                x_key=view_key(x_node),
                x_producer=producer,
                skip_reason=reason,
                dynamic_n=not isinstance(n, int),
            )
        )
    return sites


def _is_lora(fqn: str, types: Sequence[type]) -> bool:
    if any(part.startswith("lora_") for part in fqn.split(".")):
        return True
    return any("lora" in t.__name__.lower() for t in types)
