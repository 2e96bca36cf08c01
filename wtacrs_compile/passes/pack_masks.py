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

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx

from ..graph_utils import fake_mode_of, forward_required, insert_graph, tangent_dependent, trace, val

def plane_axis(shape) -> Optional[int]:
    """The first axis whose (static) size is a multiple of 8, or None."""
    for d, n in enumerate(shape):
        if isinstance(n, int) and n > 0 and n % 8 == 0:
            return d
    return None


def _planes(shape) -> Tuple[Tuple[int, ...], int]:
    """The shape the bits are packed along, and the axis split into 8 planes: the tensor's own
    shape where an axis allows it, else the flattened tensor zero-padded to a multiple of 8."""
    shape = tuple(shape)
    d = plane_axis(shape)
    if d is not None:
        return shape, d
    numel = math.prod(shape)
    return (numel + (-numel) % 8,), 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 words, one eighth of the elements, in bit planes: along the
    first axis of size n divisible by 8, bit b of word i is element ``b * n/8 + i`` (the
    flattened, zero-padded tensor where no axis is).  Bit planes, not 8 neighbouring elements
    per word: unpacking element i then reads word ``i mod n/8`` shifted by ``i div n/8``, one
    contiguous load and one shift for a whole vector in Inductor's CPU loops (neighbouring
    bits need a shift per element, and the loop that reads them falls back to scalar code)."""
    shape, d = _planes(mask.shape)
    if shape != tuple(mask.shape):
        flat = mask.reshape(-1)
        mask = torch.cat([flat, torch.zeros(shape[0] - flat.numel(), dtype=torch.bool, device=flat.device)])
    planes = mask.reshape(shape[:d] + (8, shape[d] // 8) + shape[d + 1:]).to(torch.uint8)
    packed = planes.select(d, 0)
    for b in range(1, 8):
        packed = torch.bitwise_or(packed, torch.bitwise_left_shift(planes.select(d, b), b))
    return packed


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    shape = tuple(shape)
    planes, d = _planes(shape)
    # the shifts 0..7 built from ops, not a tensor constant (which would become a get_attr
    # the joint graph's module does not own)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device).reshape((1,) * d + (8,) + (1,) * (len(planes) - d))
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(d), shifts), 1) != 0
    bits = bits.reshape(planes)
    if planes != shape:
        bits = bits[: math.prod(shape)].reshape(shape)
    return bits


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
