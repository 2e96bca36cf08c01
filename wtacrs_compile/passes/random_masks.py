"""Draw each random mask once: forward stores it as bits, and forward and backward read them.

Dropout's keep-mask is a boolean of a random draw: ``gt(inductor_random(...), p)`` once
Inductor's ``replace_random`` has run, ``native_dropout``'s second output under
``fallback_random``.  What backward gets of it is the partitioner's choice.  Under a memory
budget it saves the draw's seed (8 bytes; ``keep_random.py``) and backward draws the whole
mask again: on the CPU that is Philox per element, about 9 ns per element on the 2-core
host of ``docs/performance.md``, a second pass over every dropout of the model.  Without a
budget it saves the mask, one byte per element.

This pass packs every such mask that backward reads into bits where forward draws it
(``pack_masks.pack_bits``: numel/8 bytes), tags the packed word ``MUST_SAVE`` and makes
every reader of the mask read it unpacked, forward readers too::

    before                                        after
    %rand = inductor_random(%size, %seed, rand)   %rand   = inductor_random(%size, %seed, rand)
    %gt   = gt(%rand, 0.1)           # bool        %gt     = gt(%rand, 0.1)
                                                   %packed = pack_bits(%gt)    # uint8, MUST_SAVE
                                                   %mask   = unpack_bits(%packed)  # bool, as %gt
    %mul  = mul(%gt, %x)             # forward     %mul    = mul(%mask, %x)
    ...backward...                                 ...backward...
    %cvt  = convert_element_type(%gt, f32)         %cvt    = convert_element_type(%mask, f32)

The partitioner then saves ``%packed`` and recomputes ``%mask`` from it: the mask is drawn
once per step and costs an eighth of a byte per element.  Forward readers read the unpacked
copy as well, or Inductor would fuse the draw into them and draw it a second time in the
kernel that packs it.  Exact: the same mask, bit for bit (``tests/test_random_masks.py``).

Measured (MiniLM 32 x 64, 2-core CPU, 24 interleaved rounds, docs/performance.md): under
the default budget this is no faster than drawing the masks again (1.12x against 1.10x
Inductor's step, intervals overlapping) for 2.4 MiB more saved; without a budget it saves
7/8 of the masks' bytes.  So it is opt-in.

Left alone (plain ``torch.compile``'s handling): a mask that no backward node reads, one of
symbolic size or under :data:`~wtacrs_compile.passes.pack_masks.MIN_NUMEL` elements, and a
mask drawn from a random node tagged to be replayed (this package's forward draws,
``MUST_RECOMPUTE``).  ``WTACRSConfig(random_masks="packed")`` turns the pass on.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ..graph_utils import fake_mode_of, forward_required, insert_graph, is_random, tangent_dependent, trace, val
from ..torch_internals import checkpoint_tag, never_recompute
from .pack_masks import MIN_NUMEL, pack_bits, unpack_bits

_INDUCTOR_RANDOM = torch.ops.prims.inductor_random.default


def random_source(node: fx.Node) -> Optional[fx.Node]:
    """The random node a boolean ``node`` is drawn from directly (an input of it, or the op
    whose output ``node`` selects), or None."""
    for arg in node.all_input_nodes:
        if arg.op != "call_function":
            continue
        if arg.target is _INDUCTOR_RANDOM or is_random(arg):
            return arg
    return None


def pack_random_masks(graph: fx.Graph, cache: Optional[dict] = None) -> List[str]:
    """Rewrite every random boolean mask backward reads to be saved as packed bits; returns
    the names of the masks packed."""
    backward = tangent_dependent(graph)
    forward = forward_required(graph)
    fake = fake_mode_of(graph)
    packed_names = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node in backward:
            continue
        v = val(node)
        if not isinstance(v, torch.Tensor) or v.dtype != torch.bool:
            continue
        if not all(isinstance(s, int) for s in v.shape) or v.numel() < MIN_NUMEL:
            continue
        source = random_source(node)
        if source is None or checkpoint_tag(source) == CheckpointPolicy.MUST_RECOMPUTE:
            continue
        if all(user in forward for user in node.users):  # backward never reads it
            continue
        shape = tuple(v.shape)
        users = list(node.users)
        pack = trace(pack_bits, [v], fake, cache, ("pack_bits", shape))
        (packed,) = [insert_graph(graph, pack, [node], before=node.next, meta=_meta(node))]
        never_recompute(packed)
        packed.meta["wtacrs"] = "packed_random_mask"
        unpack = trace(lambda p: unpack_bits(p, shape), [val(packed)], fake, cache, ("unpack_bits", shape))
        unpacked = insert_graph(graph, unpack, [packed], before=packed.next, meta=_meta(node))
        for user in users:
            user.replace_input_with(node, unpacked)
        packed_names.append(node.name)
    return packed_names


def _meta(node: fx.Node) -> dict:
    """The module metadata the inserted nodes carry (the inspector names their module)."""
    return {k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta}
