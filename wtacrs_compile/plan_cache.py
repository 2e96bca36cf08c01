"""What the joint pass measured on a joint graph, kept for the next compile of the same graph.

Dynamo compiles one frame again when a guard fails even though the traced graph is the same
(Hugging Face models set ``config.problem_type`` on their first call: the second call
recompiles an identical graph).  Inductor's FX graph cache then serves the generated code,
but the pass would partition the joint graph again: the exact baseline (2-3 partitions under
a memory budget) and, in ``memory`` modes, the planner's trials -- most of a recompile.

A :class:`PlanCache` maps a key of the graph's structure (every node's op, target, arguments
and traced value: shapes, dtypes) and of what the measurement depends on (the partitioner's
settings, the static inputs; for plans, each candidate's settings) to the measurement.  The
rewrite itself always runs on the new graph.  Each backend object owns one; ``backend="wtacrs"``
given by name shares one per process.  It is bounded (least recently used entries go).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Hashable, Iterable, Optional

import torch
import torch.fx as fx


class PlanCache:
    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError(f"PlanCache: size must be >= 1, got {size}")
        self.size = size
        self._entries: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Optional[Any]:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({tuple(value.shape)},{tuple(value.stride())},{value.dtype},{value.requires_grad})"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return repr(value) if value is not None else "-"


def graph_key(graph: fx.Graph, extra: Iterable[Any] = ()) -> str:
    """A hash of the graph's structure and traced values, and of ``extra``."""
    h = hashlib.sha256()
    for node in graph.nodes:
        h.update(f"{node.op}|{node.name}|{node.target}|{node.args}|{node.kwargs}|{_describe(node.meta.get('val'))}\n".encode())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()
