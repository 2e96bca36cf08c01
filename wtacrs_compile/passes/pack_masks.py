"""Store boolean masks saved for backward as packed bits (lossless, 8x smaller).

ReLU's backward needs only ``out > 0`` and dropout's only its keep-mask.  Once the full
activation leaves the saved set (because its weight gradient reads a sample), the partitioner
saves these masks as ``torch.bool``: one byte per element.  This pass packs every boolean
tensor the partitioner saves into ``uint8`` words in forward and unpacks it in backward::

    before                                   after
    %le   = le(%relu, 0)          # bool     %le     = le(%relu, 0)
                                             %packed = pack_bits(%le)        # uint8, numel/8
    ...backward...                           ...backward...
    %where = where(%le, 0, %grad)            %mask  = unpack_bits(%packed)   # bool, as %le
                                             %where = where(%mask, 0, %grad)

Which masks are saved is read off a partition of the graph; after the rewrite the
partitioner is free to save ``%packed`` (numel/8 bytes) instead of ``%le``, and the caller
checks by partitioning again that it did.  Packing is exact, so gradients are bit-identical.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.fx as fx

from ..graph_utils import fake_mode_of, forward_required, insert_graph, tangent_dependent, trace, val

def _bit_weights(device) -> torch.Tensor:
    # 1, 2, 4, ..., 128 built from ops, not a tensor constant (which would become a get_attr
    # the joint graph's module does not own).
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    return torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8, device=device), shifts)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a bool tensor into uint8 words, 8 elements each (zero padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.bool, device=flat.device)])
    weights = _bit_weights(flat.device)
    return (flat.reshape(-1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    weights = _bit_weights(packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(-1), weights) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


MIN_NUMEL = 64  # below this the packing ops cost more than they save


def pack_saved_masks(graph: fx.Graph, saved: Iterable[str], cache: dict) -> List[str]:
    """Pack the boolean tensors named in ``saved`` (forward nodes the partitioner saves).

    Returns the names of the masks packed."""
    backward = tangent_dependent(graph)
    forward = forward_required(graph)
    nodes: Dict[str, fx.Node] = {n.name: n for n in graph.nodes}
    packed_names = []
    for name in saved:
        node = nodes.get(name)
        if node is None or node in backward or node.op == "placeholder":
            continue
        v = val(node)
        if not isinstance(v, torch.Tensor) or v.dtype != torch.bool:
            continue
        if not all(isinstance(s, int) for s in v.shape) or v.numel() < MIN_NUMEL:
            continue
        # Every use the forward outputs do not need reads the unpacked copy: the backward's own
        # uses, and forward-only casts of the mask computed for backward.
        users = [u for u in node.users if u not in forward]
        if not users:
            continue
        shape = tuple(v.shape)
        fake = fake_mode_of(graph)
        pack = trace(pack_bits, [v], fake, cache, ("pack_bits",))
        (packed,) = [insert_graph(graph, pack, [node], before=node.next, meta={})]
        packed.meta["wtacrs"] = "packed_mask"
        unpack = trace(lambda p: unpack_bits(p, shape), [val(packed)], fake, cache, ("unpack_bits", shape))
        first = min(users, key=_position(graph))
        unpacked = insert_graph(graph, unpack, [packed], before=first, meta={})
        for user in users:
            user.replace_input_with(node, unpacked)
        packed_names.append(name)
    return packed_names


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]
