"""Helpers shared by the passes: node classification, module names, tracing replacements
into a joint graph, and running the partitioner on a copy of a joint graph."""

from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from .torch_internals import (
    detect_fake_mode,
    functorch_config,
    make_fx_graph,
    partition_joint,
    replay_in_backward,
    size_hint,
)

aten = torch.ops.aten

VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.t.default,
    aten.expand.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.alias.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.as_strided.default,
    aten.diagonal.default,
    aten.unfold.default,
}
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)
"""Ops whose output aliases their first input: a saved view of a graph input costs nothing."""


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: fx.Node) -> Any:
    return node.meta.get("val")


def tensor_nbytes(v: Any) -> int:
    """Bytes of a (fake) tensor's data; 0 for non-tensors (SymInts and the like)."""
    if not isinstance(v, torch.Tensor):
        return 0
    n = v.numel()
    if not isinstance(n, int):
        # Never int(n): that guards on the traced size and makes a dynamic=True graph
        # recompile for every new shape.  The hint is the size at trace time, guard-free.
        try:
            n = size_hint(n)
        except Exception:  # unbacked or unhinted symbol: count nothing rather than guess
            return 0
    return n * v.element_size()


def traced_size(n: Any) -> int:
    """A dimension as a plain int: itself, or a symbolic one's size at trace time (guard-free);
    -1 when it has no hint (unbacked)."""
    if isinstance(n, int):
        return n
    try:
        return size_hint(n)
    except Exception:
        return -1


def tangent_dependent(graph: fx.Graph) -> set:
    """Nodes whose value depends on a ``tangents_*`` input: the backward part of a joint graph."""
    dep: set = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.target.startswith("tangents"):
                dep.add(node)
        elif any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def forward_required(graph: fx.Graph) -> set:
    """Nodes the forward outputs of a joint graph depend on (the partitioner's "required
    forward" set): everything else is computed for backward only."""
    output = graph.find_nodes(op="output")[0]
    stack = [a for a in output.args[0][: num_fwd_outputs(graph)] if isinstance(a, fx.Node)]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def view_key(node: fx.Node) -> str:
    """A key equal for two nodes exactly when they are the same view of the same tensor:
    the root plus every view op and its arguments on the way (CSE does not always merge
    identical views in a joint graph)."""
    chain = []
    while is_call(node, *VIEW_OPS) or (is_call(node, operator.getitem) and is_call(node.args[0], *_SPLITS)):
        src = node.args[0]
        if node.target is operator.getitem:
            chain.append((str(src.target), repr(src.args[1:]), repr(src.kwargs), node.args[1]))
            node = src.args[0]
        else:
            chain.append((str(node.target), repr(node.args[1:]), repr(node.kwargs)))
            node = src
    return f"{node.name}|{chain!r}"


def strip_views(node: fx.Node) -> fx.Node:
    """The tensor ``node`` aliases, through view ops and the outputs of splits."""
    while True:
        if is_call(node, *VIEW_OPS):
            node = node.args[0]
        elif is_call(node, operator.getitem) and is_call(node.args[0], *_SPLITS):
            node = node.args[0].args[0]
        else:
            return node


_MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)
_COPIES = (aten.clone.default, aten._to_copy.default)


def recomputable(node: fx.Node) -> bool:
    """Whether the partitioner could recompute ``node`` (through views and copies) cheaply
    in backward instead of saving it: True for what a pointwise or normalising op makes
    (GeLU, LayerNorm outputs); False for a graph input (kept anyway), a matmul's output
    (recomputing it is a matmul) and a dropout's output (recomputing it redraws the mask
    over every element from its seed: a random op within three steps of ``node``)."""
    node = strip_views(node)
    while is_call(node, *_COPIES):
        node = strip_views(node.args[0])
    if node.op != "call_function" or is_call(node, *_MATMULS):
        return False
    frontier = [node]
    for _ in range(3):
        frontier = [a for n in frontier for a in n.all_input_nodes if a.op == "call_function"]
        if any(is_random(a) for a in frontier):
            return False
    return True


def transposed_source(node: fx.Node) -> Optional[fx.Node]:
    """``x`` when ``node`` is ``permute(x, [1, 0])`` or ``t(x)``; else None."""
    if is_call(node, aten.t.default):
        return node.args[0]
    if is_call(node, aten.permute.default) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


_ROOT = re.compile(r"^L\['(?:self|fn|mod|model|module|m)'\]\.?")


def normalize_fqn(path: str) -> str:
    """Dynamo's module path (``L['self'].encoder.layer[0]``) to a module FQN (``encoder.layer.0``)."""
    # A forward replaced by a method bound to its module (wtacrs_compile.annotate_module, or
    # hooks that wrap forward) reaches submodules through ``.forward.__self__``.
    path = re.sub(r"\.forward\.__self__(?=[.\[]|$)", "", path)
    # Modules reached through ``__dict__['_modules']`` (peft's wrappers) are children too.
    path = re.sub(r"\.__dict__\[['\"]_modules['\"]\]", "._modules", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = _ROOT.sub("", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    return path.strip(".")


def module_stack(node: fx.Node) -> List[Tuple[str, type]]:
    """The module stack of a joint-graph node, outermost first, as (fqn, type) pairs.

    Forward nodes carry ``nn_module_stack``; backward nodes ``fwd_nn_module_stack``, copied
    from the forward node they differentiate.
    """
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    out = []
    for entry in stack.values():
        path, typ = entry[0], entry[1]
        if isinstance(typ, str):
            typ = type(typ, (), {})  # a type name only: keep it matchable by name
        out.append((normalize_fqn(str(path)), typ))
    return out


def innermost_module(node: fx.Node, search_depth: int = 0) -> Tuple[str, Tuple[type, ...]]:
    """The innermost module of ``node``.  Nodes that an Inductor pattern replaced (the
    attention patterns' ``bmm_default``) carry no module stack; they take it from the nearest
    neighbour that does (the views and expands their module made), up to ``search_depth``
    hops away, inputs before users at each distance."""
    frontier, seen = [node], {node}
    for _ in range(search_depth + 1):
        for n in frontier:
            stack = module_stack(n)
            if stack:
                fqn, typ = stack[-1]
                return fqn, (typ,)
        neighbours = [a for n in frontier for a in (*n.all_input_nodes, *n.users)]
        frontier = [a for a in neighbours if a not in seen and not seen.add(a)]
    return "", ()


def is_random(node: fx.Node) -> bool:
    """A call of a random op (tagged ``nondeterministic_seeded``): a forward draw's ``rand_like``
    (``rand`` where Inductor's decompositions take it apart, torch 2.11), a backward draw's
    ``wtacrs::uniform``, dropout."""
    tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
    return torch.Tag.nondeterministic_seeded in tags


def insert_forward_draw(graph: fx.Graph, sub: fx.GraphModule, x: fx.Node, *inputs: fx.Node) -> Any:
    """Insert a traced forward draw over ``x`` (and graph ``inputs``, placeholders such as a
    padding mask) right after it (and after the placeholders), with ``x``'s module metadata; its noise (``torch_internals.replayable_uniform``) is tagged to
    be replayed, never redrawn, if the partitioner recomputes the draw (``wtacrs::draw``) in
    backward (it may: no forward output reads the draw, so the partitioner does not ban its
    recomputation).  Returns the draw's outputs, marked ``meta["wtacrs"] = "forward_sample"``."""
    before = x.next
    while before.op == "placeholder":
        before = before.next
    meta = {key: x.meta[key] for key in ("nn_module_stack", "stack_trace") if key in x.meta}
    existing = set(graph.nodes)
    outs = insert_graph(graph, sub, [x, *inputs], before=before, meta=meta)
    for node in set(graph.nodes) - existing:
        if is_random(node):
            replay_in_backward(node)
    for out in outs:
        out.meta["wtacrs"] = "forward_sample"
    return outs


def replace_with_estimate(graph: fx.Graph, node: fx.Node, sub: fx.GraphModule, args: Sequence[fx.Node]) -> fx.Node:
    """Insert the traced estimate ``sub(*args)`` before the backward matmul ``node`` (with its
    ``seq_nr`` and module metadata, so the partitioner and the report see it as that op's), and
    replace ``node`` with it; the estimate must have the matmul's shape and dtype."""
    meta = {key: node.meta[key] for key in ("seq_nr", "fwd_nn_module_stack", "stack_trace") if key in node.meta}
    new = insert_graph(graph, sub, args, before=node, meta=meta)
    old, ours = val(node), val(new)
    static = all(isinstance(d, int) for d in (*old.shape, *ours.shape))  # comparing SymInts would guard
    if (static and tuple(old.shape) != tuple(ours.shape)) or old.dtype != ours.dtype:
        raise AssertionError(
            f"wtacrs: estimate of {node.name} has shape {tuple(ours.shape)} {ours.dtype}, "
            f"expected {tuple(old.shape)} {old.dtype}"
        )
    new.meta["wtacrs"] = "estimate"
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def fake_mode_of(graph: fx.Graph):
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals)
    if mode is None:
        raise RuntimeError("wtacrs: the joint graph carries no fake tensors (meta['val'])")
    return mode


def trace(fn: Callable, example_vals: Sequence[Any], fake_mode, cache: Optional[dict] = None, key: Any = None) -> fx.GraphModule:
    """Trace ``fn`` over fake values into an ATen graph with Inductor's decompositions.

    With ``cache`` and ``key`` (which must determine the traced graph: shapes, dtypes and every
    constant ``fn`` closes over), a trace is reused: the planner rewrites many copies of a graph.
    """
    if cache is not None:
        # str(): symbolic sizes are unhashable; their names tell traces apart without a guard.
        full_key = (key, tuple((tuple(map(str, v.shape)), v.dtype, v.device) for v in example_vals))
        if full_key in cache:
            return cache[full_key]
    gm = make_fx_graph(fn, example_vals, fake_mode)
    if cache is not None:
        cache[full_key] = gm
    return gm


def insert_graph(
    graph: fx.Graph, sub: fx.GraphModule, args: Sequence[fx.Node], before: fx.Node, meta: Dict[str, Any]
) -> Any:
    """Copy ``sub``'s nodes into ``graph`` before ``before``, wiring its inputs to ``args``.

    ``meta`` (module stacks, seq_nr, ...) is merged into every inserted node so module names
    survive the rewrite.  Returns the inserted counterparts of ``sub``'s outputs.
    """
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise AssertionError("wtacrs: replacement arity mismatch")
    val_map = dict(zip(placeholders, args))
    with graph.inserting_before(before):
        out = graph.graph_copy(sub.graph, val_map)
    for node in sub.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        new = val_map[node]
        for key, value in meta.items():
            new.meta.setdefault(key, value)
    return out


# --------------------------------------------------------------------------------------
# Partitioning a copy of the joint graph: the planner's measuring stick.


def graph_flops(graph: Any) -> int:
    """FLOPs of a graph's matmul-class ops (mm, addmm, bmm, convolutions, fused attention),
    counted with ``torch.utils.flop_counter``'s formulas on the nodes' fake values: what
    ``FlopCounterMode`` would count running the graph, without running it.  Symbolic sizes
    count at their traced size; nodes without values are not counted."""
    return sum(node_flops(node) for node in getattr(graph, "graph", graph).nodes)


def node_flops(node: fx.Node) -> int:
    """One node's share of :func:`graph_flops`."""
    if node.op != "call_function":
        return 0
    formula = flop_registry.get(getattr(node.target, "overloadpacket", None))
    out = node.meta.get("val")
    if formula is None or out is None:
        return 0
    missing = []

    def value(a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if v is None:
                missing.append(a)
            return v
        return a

    args, kwargs = fx.map_arg((node.args, node.kwargs), value)
    if missing:
        return 0
    return traced_size(formula(*args, out_val=out, **kwargs))


def joint_flops(graph: fx.Graph) -> Dict[str, int]:
    """FLOPs of a joint graph's matmul-class ops split into its forward and backward parts:
    the default partition's figures (it never recomputes a matmul: not in the partitioner's
    recomputation allowlist), without partitioning."""
    backward = tangent_dependent(graph)
    counts = {"forward": 0, "backward": 0}
    for node in graph.nodes:
        counts["backward" if node in backward else "forward"] += node_flops(node)
    return counts


def fw_bw_flops(saved: "SavedSet") -> Dict[str, int]:
    """FLOPs of a partition's forward and backward graphs (see :func:`graph_flops`)."""
    return {"forward": graph_flops(saved.fw), "backward": graph_flops(saved.bw)}


@dataclass
class SavedSet:
    """What the partitioner saves for backward, split into activations and the rest."""

    activations: Dict[str, int]  # forward node name -> bytes, excluding inputs and their views
    fw: fx.GraphModule
    bw: fx.GraphModule

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())


def input_bytes(graph: fx.Graph) -> int:
    """Bytes of a graph's inputs other than tangents: a joint graph's primals, parameters
    included."""
    return sum(
        tensor_nbytes(n.meta.get("val")) for n in graph.nodes
        if n.op == "placeholder" and not n.target.startswith("tangents")
    )


def saved_value_bytes(saved: SavedSet) -> int:
    """Bytes of every tensor a partition's backward takes from its forward (its backward
    graph's inputs other than tangents): activations, parameters and views of inputs alike
    (how torch's budget solver weighs a partition)."""
    return input_bytes(saved.bw.graph)


def num_fwd_outputs(graph: fx.Graph) -> int:
    """A joint graph returns ``[*forward_outputs, *grad_per_primal]``."""
    output = graph.find_nodes(op="output")[0]
    primals = [n for n in graph.nodes if n.op == "placeholder" and not n.target.startswith("tangents")]
    return len(output.args[0]) - len(primals)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep copy that remembers the module owning the original: its ``get_attr`` targets
    (lifted tensor constants, e.g. T5's ``_tensor_constant0``) must resolve when the copy is
    partitioned, and a deep copy of a graph has no owning module."""
    g = copy.deepcopy(graph)
    g._wtacrs_root = _root_of(graph)
    return g


def _root_of(graph: fx.Graph) -> Optional[torch.nn.Module]:
    return graph.owning_module if graph.owning_module is not None else getattr(graph, "_wtacrs_root", None)


def partition_saved(graph: fx.Graph, static_input_indices: Optional[List[int]] = None) -> SavedSet:
    """Run Inductor's partitioner on a copy of ``graph`` and report what it saves."""
    g = copy_graph(graph)
    root = _root_of(graph)
    if root is None:
        root = torch.nn.Module()
    gm = fx.GraphModule(root, g)
    fw, bw = partition_joint(gm, num_fwd_outputs(g), static_input_indices)
    return saved_set(fw, bw)


def saved_set(fw: fx.GraphModule, bw: fx.GraphModule) -> SavedSet:
    """Classify the backward graph's inputs: saved activations vs inputs, views of inputs, tangents."""
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    activations: Dict[str, int] = {}
    for node in bw.graph.nodes:
        if node.op != "placeholder" or node.target.startswith("tangents"):
            continue
        src = fw_nodes.get(node.name)
        root = strip_views(src) if src is not None else None
        if not (node.name.startswith("primals") or (root is not None and root.op == "placeholder")):
            activations[node.name] = tensor_nbytes(node.meta.get("val"))  # inputs' views cost nothing
    return SavedSet(activations, fw, bw)


# --------------------------------------------------------------------------------------
# The partitioner's settings for one compile (torch._functorch.config).

_RELAXED_BANS = ("ban_recompute_used_far_apart", "ban_recompute_long_fusible_chains", "ban_recompute_materialized_backward")
"""The min-cut bans torch's budget solver lifts first (its "more aggressive" step): with them
off the partitioner recomputes cheap ops (views, pointwise, norms) wherever that saves bytes,
and still never recomputes a matmul (``ban_recompute_not_in_allowlist`` stays on)."""


class PartitionerSettings:
    """The ``torch._functorch.config`` values one compile runs its partitions under.

    ``with settings.active(): compile_fx(...)`` patches them for the whole compile, so that the
    planner's trial partitions and AOTAutograd's real one agree; :meth:`relax_bans` (called by
    the joint pass, inside that scope) changes them for the rest of the compile, and leaving the
    scope restores the caller's values.
    """

    def __init__(self, memory_budget: Optional[float]) -> None:
        self._config = functorch_config
        user = functorch_config.activation_memory_budget
        self.budget = user if memory_budget is None else min(float(memory_budget), user)
        # what the compile promises of the counted bytes (passes/meet_budget.py): the backend's
        # memory_budget where it is the budget in force; a smaller one the user set in
        # torch._functorch.config keeps torch's meaning
        self.target: Optional[float] = (
            float(memory_budget) if memory_budget is not None and float(memory_budget) <= user and memory_budget < 1.0 else None
        )
        self.relaxed = False
        self._initial_bans = self.bans()

    def active(self):
        patch = {"activation_memory_budget": self.budget, "enable_autograd_cache": False}
        patch.update(self._initial_bans)
        return self._config.patch(**patch)

    def relax_bans(self) -> None:
        for key in _RELAXED_BANS:
            if hasattr(self._config, key):
                setattr(self._config, key, False)
        self.relaxed = True

    def restore_bans(self) -> None:
        for key, value in self._initial_bans.items():
            setattr(self._config, key, value)
        self.relaxed = False

    def key(self) -> Tuple[Any, ...]:
        """What a partition under these settings depends on (for caching measurements)."""
        return (self.budget, tuple(sorted(self._initial_bans.items())), self.relaxed)

    def bans(self) -> Dict[str, Any]:
        return {k: getattr(self._config, k) for k in _RELAXED_BANS if hasattr(self._config, k)}

    def unbudgeted(self):
        """Inductor's default partition, for the report's reference figure."""
        return self._config.patch(activation_memory_budget=1.0, **self._initial_bans)
