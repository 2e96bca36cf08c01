"""Find the batched matmuls of a joint graph whose operand gradients WTA-CRS can estimate.

Analysis only: this pass changes nothing.  A batched product ``C = bmm(A, B)`` (``A``:
b x n x m, ``B``: b x m x p) leaves two bmms in the backward half of the joint graph, one per
operand that needs a gradient.  4-D ``matmul`` (attention's ``Q K^T`` and ``P V``) reaches the
joint graph as ``expand`` + ``view`` + ``bmm``; ``baddbmm`` keeps its own forward node but is
differentiated with the same two bmms::

    %q3    = view(clone(expand(%q)), [BH, S, D])            # forward only
    %kt3   = view(clone(expand(permute(%k))), [BH, D, S])   # forward only
    %bmm   = bmm(%q3, %kt3)                                  # forward, seq_nr s
    %gs3   = view(..., [BH, S, S])                           # backward: dC
    %bmm_4 = bmm(permute(%q3, [0, 2, 1]), %gs3)             # dB = A^T G, over S_q: a site
    %bmm_5 = bmm(%gs3, permute(%kt3, [0, 2, 1]))            # dA = G B^T, over S_k: a site

A site is a backward ``bmm`` with exactly one operand ``X`` that depends only on forward values
and one ``G`` that depends on the tangents, differentiating a forward ``bmm``/``baddbmm``
(same ``seq_nr``).  It is ``b`` independent sums of rank-1 terms over the contracted dim
(``n``), which is what gets sampled, per batch entry: in attention, per (batch, head).  The
*rows* of ``X`` and ``G`` are their slices along that dim: ``x_shape = (n, d)`` and
``g_shape = (n, e)`` per batch entry, ``batch = b``.  ``x_side`` says which operand ``X`` is:
``"a"``, first (given as ``X^T``), or ``"b"``, second (given as ``X``), as for linear sites.

Not sites: an ``X`` that is a view of a parameter (a batched weight: ``G W^T`` is an input
gradient and stays exact, like ``dX`` of a linear layer), and bmms where both or neither
operand depends on the tangents.

Attention computed by a fused SDPA kernel (``_scaled_dot_product_*_attention``, flex
attention) has no bmm in the graph: the kernel forms ``Q K^T`` and ``P V`` internally and its
backward recomputes them tile by tile.  There is nothing to sample, so each fused attention
backward is reported as a site with ``skip_reason`` (left exact, and the report says why).
That includes eager attention that Inductor's ``fuse_attention`` patterns (joint-graph
passes that run before ``joint_custom_post_pass``) turned into SDPA: the fused kernel saves
no ``P`` either, so leaving it exact costs no memory.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ..graph_utils import aten, innermost_module, is_call, strip_views, tangent_dependent, val, view_key
from ..torch_internals import FUSED_ATTENTION_BACKWARD
from .match_matmuls import SUPPORTED_DTYPES, MatmulSite, _is_param_derived

_FORWARD_BMMS = (aten.bmm.default, aten.baddbmm.default)


FUSED_SDPA_REASON = (
    "fused SDPA: no bmm to sample (the kernel forms Q K^T and P V internally and recomputes "
    "them in backward); left exact"
)
INDUCTOR_FUSED_REASON = (
    "fused SDPA: no bmm to sample (Inductor's fuse_attention pass replaced this eager "
    "matmul-softmax-matmul with the fused kernel before the wtacrs pass ran); left exact"
)


def batch_transposed_source(node: fx.Node) -> Optional[fx.Node]:
    """``x`` when ``node`` is ``permute(x, [0, 2, 1])`` or ``transpose(x, 1, 2)``; else None."""
    if is_call(node, aten.permute.default) and list(node.args[1]) == [0, 2, 1]:
        return node.args[0]
    if is_call(node, aten.transpose.int) and sorted(d % 3 for d in node.args[1:3]) == [1, 2]:
        return node.args[0]
    return None


def operand_rows(operand: fx.Node, first: bool) -> Tuple[fx.Node, bool]:
    """The node holding an operand's rows along the contracted dim, and whether it must still
    be transposed to get them.

    The contracted dim is the last of the first operand (rows: its transpose) and the middle
    one of the second (rows: the operand itself).  A first operand given as
    ``permute(y, [0, 2, 1])`` has its rows in ``y``: reading ``y`` keeps the forward draw on a
    node the forward pass computes anyway.
    """
    if not first:
        return operand, False
    source = batch_transposed_source(operand)
    return (source, False) if source is not None else (operand, True)


def _op_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet if packet is not None else target, "__name__", str(target))


def _fixed(dim) -> int:
    """A static size, or -1 for a symbolic one (records hold plain ints)."""
    return dim if isinstance(dim, int) else -1


def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def find_bmm_sites(graph: fx.Graph, params: Set[str]) -> List[MatmulSite]:
    """The operand-gradient bmms of ``graph`` and its fused attention backwards (as exact
    sites); ``params`` names the parameter placeholders."""
    backward = tangent_dependent(graph)
    fwd_by_seq: Dict[int, List[fx.Node]] = {}
    for node in graph.nodes:
        if node not in backward and is_call(node, *_FORWARD_BMMS):
            fwd_by_seq.setdefault(node.meta.get("seq_nr"), []).append(node)

    sites = []
    for node in graph.nodes:
        if node not in backward or node.op != "call_function":
            continue
        if _op_name(node.target) in FUSED_ATTENTION_BACKWARD:
            sites.append(_fused_attention_site(node))
            continue
        if node.target is not aten.bmm.default:
            continue
        site = _bmm_site(node, backward, fwd_by_seq, params)
        if site is not None:
            sites.append(site)
    return sites


def _bmm_site(
    node: fx.Node, backward: set, fwd_by_seq: Dict[int, List[fx.Node]], params: Set[str]
) -> Optional[MatmulSite]:
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    a_dep, b_dep = a in backward, b in backward
    if a_dep == b_dep:
        return None  # both from tangents, or neither: not an operand gradient
    x_side = "a" if not a_dep else "b"
    x_operand, g_operand = (a, b) if x_side == "a" else (b, a)
    if _is_param_derived(x_operand, params):
        return None  # G W^T with a batched weight: an input gradient, exact like a linear's dX

    fwd = fwd_by_seq.get(node.meta.get("seq_nr"), [])
    fqn, types = innermost_module(node)
    if not fqn and fwd:
        fqn, types = innermost_module(fwd[0])
    if not fqn:  # an Inductor attention pattern replaced the bmm and dropped its metadata
        fqn, types = innermost_module(node, search_depth=4)
    x_rows, x_t = operand_rows(x_operand, first=x_side == "a")

    a_val, b_val = val(a), val(b)
    reason = ""
    if not (isinstance(a_val, torch.Tensor) and isinstance(b_val, torch.Tensor)):
        reason = "no fake tensor on the bmm operands (meta['val'])"
        batch, n, d, e = -1, -1, -1, -1
        dtype = torch.float32
    else:
        batch, r, n = a_val.shape
        s = b_val.shape[2]
        d, e = (r, s) if x_side == "a" else (s, r)
        dtype = val(x_operand).dtype
        if not fwd:
            reason = (
                "no forward bmm/baddbmm with this seq_nr: not the gradient of a batched matmul "
                "the pass knows; left exact"
            )
        elif not _static(batch, n, d, e):
            reason = "dynamic shape: the batch or the sampled dimension is symbolic"
        elif dtype not in SUPPORTED_DTYPES or val(g_operand).dtype not in SUPPORTED_DTYPES:
            reason = f"unsupported dtype {dtype} / {val(g_operand).dtype}"
        elif n < 1 or batch < 1:
            reason = f"empty product (batch {batch}, contracted dim {n})"

    root = strip_views(x_rows)
    producer = "input" if root.op == "placeholder" else _op_name(root.target)
    # Which forward operand X is (mat1 or mat2) tells Q from K, P from V in one module's class.
    operand = "mat2" if x_side == "b" else "mat1"
    return MatmulSite(
        node=node.name,
        kind="bmm",
        x_side=x_side,
        fqn=fqn,
        module_types=types,
        n=_fixed(n),
        d=_fixed(d),
        x_shape=(_fixed(n), _fixed(d)),
        g_shape=(_fixed(n), _fixed(e)),
        dtype=dtype,
        # The view and orientation the rows are read from: two views of one tensor (Q and
        # Q^T) hold different rows and must not share a draw; identical views may.
        x_key=view_key(x_rows) + (".T" if x_t else ""),
        x_producer=f"{producer}->bmm.{operand}",
        skip_reason=reason,
        batch=_fixed(batch),
    )


def _fused_attention_site(node: fx.Node) -> MatmulSite:
    """An exact record for one fused attention backward; shapes are the query's (S, D)."""
    fqn, types = innermost_module(node)
    flex = _op_name(node.target) == "flex_attention_backward"
    query = node.args[0 if flex else 1]  # aten: (grad_out, query, ...); flex: (query, ...)
    q_val = val(query) if isinstance(query, fx.Node) else None
    shape, batch, dtype = (-1, -1), -1, torch.float32
    if isinstance(q_val, torch.Tensor) and q_val.dim() >= 2:
        shape = tuple(_fixed(s) for s in q_val.shape[-2:])
        batch = 1
        for dim in q_val.shape[:-2]:
            batch = batch * dim if isinstance(dim, int) and batch >= 0 else -1
        dtype = q_val.dtype
    return MatmulSite(
        node=node.name,
        kind="bmm",
        x_side="b",
        fqn=fqn,
        module_types=types,
        n=-1,
        d=-1,
        x_shape=shape,
        g_shape=shape,
        dtype=dtype,
        x_key=node.name,
        x_producer=_op_name(node.target),
        # Nodes traced by autograd carry a seq_nr; Inductor's pattern replacement does not.
        skip_reason=FUSED_SDPA_REASON if "seq_nr" in node.meta else INDUCTOR_FUSED_REASON,
        batch=batch,
    )
