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

One level up, :func:`compile_key` keys a whole compile by the Dynamo graph, its example inputs
and every setting the compile reads: the backend keeps the compiled function under it, and a
recompile of the same graph is served whole (no joint trace, pass, partition or Inductor
call), which is what plain torch.compile gets from AOTAutograd's cache, off under this backend
(a hit there would skip the pass and leave no report).
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
        h.update(f"{_node_line(node, 'val')}\n".encode())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()


def _node_line(node: fx.Node, value_key: str) -> str:
    """A node's op, target, arguments and traced value (``meta[value_key]``)."""
    return f"{node.op}|{node.name}|{node.target}|{node.args}|{node.kwargs}|{_describe(node.meta.get(value_key))}"


def compile_key(gm: fx.GraphModule, example_inputs: Iterable[Any], extra: Iterable[Any] = ()) -> Optional[str]:
    """A key of one backend compile: the Dynamo graph's nodes (op, arguments, example value,
    module stack, annotations), the example inputs (shape, stride, dtype, device,
    requires_grad, parameter or not), the grad and autocast modes, and ``extra`` (the pass's
    uuid, the partitioner's and Inductor's settings).  ``None`` where a compile cannot be
    identified safely: symbolic shapes (another ShapeEnv), graphs with submodules or
    attributes (values outside the inputs)."""
    h = hashlib.sha256()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            return None
        # and what the pass reads off a node besides its op: the module it came from (rules
        # select by FQN and type) and in-code annotations (wtacrs_compile.annotate)
        modules = [tuple(v) for v in (node.meta.get("nn_module_stack") or {}).values()]
        h.update(f"{_node_line(node, 'example_value')}|{modules}|{node.meta.get('custom')}\n".encode())
    for t in example_inputs:
        if not isinstance(t, torch.Tensor) or not all(isinstance(d, int) for d in (*t.shape, *t.stride())):
            return None
        h.update(f"{_describe(t)}|{t.device}|{isinstance(t, torch.nn.Parameter)}\n".encode())
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
             torch.are_deterministic_algorithms_enabled(),
             *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")))
    h.update(repr(modes).encode())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()
