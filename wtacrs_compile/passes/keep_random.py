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
the cheapest tensor that lets backward do without the random op.  Under Inductor (its
``fallback_random`` off, the default) this pass runs after Inductor's ``replace_random``, so
the random node is the one ``prims.inductor_seeds`` call per device; the masks are
``inductor_random`` of a seed looked up from it, which carry no random tag.  The seeds are
then what is saved, and backward draws the masks again from them: the same masks as
forward's (``tests/test_rng.py``), at the cost of drawing them twice (on the CPU, Philox per
element, ~144 ms of a MiniLM 32x64 step on the 2-core CPU: ``benchmarks/mask_cost.py``).
Drawing each mask once and saving it as bits instead measured no faster (commit 3e2c0a3's
``random_masks`` pass, since removed: 1.14x against 1.12x Inductor's step; re-run paired
per round 0.99x of the default's, 0.97-1.04; docs/performance.md).  A node
already tagged (a forward draw's noise, ``MUST_RECOMPUTE``: replayed from the RNG state
saved in forward) is left as it is.

A call whose drop probability is a literal 0 (``dropout_p=0.0`` of the fused attention ops,
which carry the random tag for their dropout; ``native_dropout`` with ``p=0`` or
``train=False``) draws nothing: it is left untagged, so the budget may recompute it.  Tagging
it would ban recomputing every attention output and its log-sum-exp (timm's ViT-B/16 under
``memory_budget=0.1`` saved 73 MB where torch's own budget saves 46 MB).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..graph_utils import is_random
from ..torch_internals import checkpoint_tag, never_recompute


def keep_random_ops(graph: fx.Graph) -> int:
    """Tag every untagged random node of the joint graph ``MUST_SAVE``; returns how many."""
    tagged = 0
    for node in graph.nodes:
        if is_random(node) and not draws_nothing(node) and checkpoint_tag(node) is None:
            never_recompute(node)
            tagged += 1
    return tagged


_PROBABILITY_ARGS = ("dropout_p", "p")


def draws_nothing(node: fx.Node) -> bool:
    """A random op called with a literal drop probability of 0 (or ``train=False``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        if arg.name in _PROBABILITY_ARGS:
            value = _argument(node, i, arg)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
                return True
        elif arg.name == "train" and _argument(node, i, arg) is False:
            return True
    return False


def _argument(node: fx.Node, index: int, arg: Any) -> Any:
    if arg.name in node.kwargs:
        return node.kwargs[arg.name]
    if index < len(node.args):
        return node.args[index]
    return arg.default_value if arg.has_default_value() else None
