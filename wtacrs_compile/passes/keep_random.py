"""Never recompute a random op in backward: tag the joint graph's random nodes ``MUST_SAVE``.

Under ``activation_memory_budget < 1`` torch's partitioner may trade a random op (dropout's
noise, ``randn_like``) back into recomputation: its knapsack over the banned nodes has no
filter for random ops, and at budget 0 the ban is skipped altogether.  The recomputed op
draws fresh numbers in backward, so backward applies another dropout mask than forward used
and the gradients are silently wrong (pytorch/pytorch#190758; measured here on torch 2.14.1,
CPU, at budgets 0.5 and 0.1: every gradient upstream of a dropout differs from Inductor's).
The backend's default runs the partitioner under a budget, so it must not inherit that::

    before                                    after
    %rand = rand_like(%x)                     %rand = rand_like(%x)   meta["recompute"] = MUST_SAVE
    %gt   = gt(%rand, 0.1)                    %gt   = gt(%rand, 0.1)
    %mul  = mul(%x, %gt)                      %mul  = mul(%x, %gt)

In the min-cut partitioner ``MUST_SAVE`` only bans recomputation: the partitioner still saves
the cheapest tensor that lets backward do without the random op (the boolean keep-mask, not
the float noise).  A node already tagged (a forward draw's noise, ``MUST_RECOMPUTE``: replayed
from the RNG state saved in forward) is left as it is.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph_utils import is_random
from ..torch_internals import checkpoint_tag, never_recompute


def keep_random_ops(graph: fx.Graph) -> int:
    """Tag every untagged random node of the joint graph ``MUST_SAVE``; returns how many."""
    tagged = 0
    for node in graph.nodes:
        if is_random(node) and checkpoint_tag(node) is None:
            never_recompute(node)
            tagged += 1
    return tagged
