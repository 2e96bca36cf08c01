"""``wtacrs_compile.inspect``: what the ``wtacrs`` pass changed in a model's training step.

The model is compiled twice in this process, for one step (forward, then backward of the
output's ``.loss`` or its sum):

* plain ``torch.compile`` (Inductor), the baseline, with an ``inner_compile`` hook that keeps
  the forward and backward graphs Inductor really compiled;
* the ``wtacrs`` backend, whose :class:`~wtacrs_compile.report.CompileReport` per graph gives
  every matched op's decision, reason and bytes, and the graphs it compiled.

Saved-activation totals are read off the two compiled backward graphs (their inputs that are
neither tangents, parameters nor views of graph inputs: :func:`graph_utils.saved_set`), not
estimated, so the figures are those of the partition Inductor actually runs.  With graph
breaks every Dynamo graph is one :class:`GraphInspection`; ops and totals add up over them.

Caches are off while inspecting (a cache hit would skip the pass and the graphs), Dynamo is
reset before and after, and the model's gradients, buffers and the global RNG state are
restored: inspecting a model does not change it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import rng
from .backend import WTACRSBackend
from .config import WTACRSConfig
from .compiled_graphs import BACKWARD, FORWARD, CompiledGraphs, recording_compile_fx
from .graph_utils import innermost_module, saved_set, tangent_dependent, tensor_nbytes
from .report import CompileReport
from .torch_internals import fresh_compiles, original_module, reset_dynamo, tree_leaves

GRAPH_KINDS = ("forward", "backward", "joint")
_NUM_USERS = re.compile(r"(?: :)? \[num_users=\d+\]")


class InspectError(RuntimeError):
    """The model cannot be inspected as given (no backward pass, graphs that do not pair up)."""


@dataclass
class SavedTensor:
    """One tensor the forward graph saves for backward (a backward-graph input)."""

    name: str
    bytes: int
    shape: Optional[List[int]] = None
    dtype: Optional[str] = None
    module: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BaselineGraph:
    """What plain Inductor compiled for one Dynamo graph."""

    forward: str = ""
    backward: str = ""
    saved: List[SavedTensor] = field(default_factory=list)  # activations only
    saved_bytes: Optional[int] = None  # None: an inference graph, no backward
    modules: Dict[str, fx.GraphModule] = field(default_factory=dict, repr=False, compare=False)
    flops: Dict[str, int] = field(default_factory=dict)  # "forward"/"backward": matmul FLOPs, counted at compile


@dataclass
class GraphInspection:
    """One Dynamo graph: the baseline compile next to the wtacrs compile of the same graph."""

    index: int
    baseline: BaselineGraph
    report: CompileReport
    wtacrs_saved: List[SavedTensor] = field(default_factory=list)  # activations only
    # op node -> (before, after): the saved activations (name -> bytes) of the compiled graphs
    # that the op's weight gradient computes its X side from
    gradient_reads: Dict[str, Tuple[Dict[str, int], Dict[str, int]]] = field(default_factory=dict)

    @property
    def baseline_saved_bytes(self) -> int:
        return self.baseline.saved_bytes or 0

    @property
    def wtacrs_saved_bytes(self) -> int:
        return self.report.compiled_saved_bytes or 0

    def flops(self, after: bool) -> Dict[str, Optional[int]]:
        """FLOPs of the matmul-class ops of the compiled forward and backward graphs, plain
        Inductor's or wtacrs' (:func:`~wtacrs_compile.graph_utils.graph_flops`), as each
        backend counted them when it compiled them."""
        counted = self.report.flops.get("compiled", {}) if after else self.baseline.flops
        return {kind: counted.get(kind) for kind in ("forward", "backward")}

    def graph_text(self, kind: str, after: bool) -> str:
        """The ``kind`` graph before (plain Inductor) or after (wtacrs) the pass."""
        if kind == "forward":
            return self.report.forward_graph if after else self.baseline.forward
        if kind == "backward":
            return self.report.backward_graph if after else self.baseline.backward
        if kind == "joint":
            return self.report.joint_graph_after if after else self.report.joint_graph_before
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")

    def diff(self, kind: str, context: int = 3, users: bool = False) -> str:
        """Unified diff of the ``kind`` graph: plain Inductor (``-``) vs wtacrs (``+``).

        ``[num_users=N]`` annotations are left out unless ``users``: a rewrite that adds a
        consumer to a node would otherwise show that node as changed, and the new edge is
        already visible on the consumer's line.
        """

        def lines_of(text: str) -> List[str]:
            return (text if users else _NUM_USERS.sub("", text)).splitlines()

        lines = difflib.unified_diff(
            lines_of(self.graph_text(kind, False)),
            lines_of(self.graph_text(kind, True)),
            fromfile=f"graph {self.index} {kind} (torch.compile)",
            tofile=f"graph {self.index} {kind} (wtacrs)",
            n=context,
            lineterm="",
        )
        return "\n".join(lines) or f"graph {self.index} {kind}: unchanged"

    def saved_tensor_changes(self) -> Tuple[List[SavedTensor], List[SavedTensor]]:
        """(removed, added): saved activations only the baseline / only wtacrs keeps.

        The rewrite keeps the names of the nodes it does not touch, so a name on one side
        only is a tensor that left or entered the saved set.
        """
        before = {t.name for t in self.baseline.saved}
        after = {t.name for t in self.wtacrs_saved}
        removed = [t for t in self.baseline.saved if t.name not in after]
        added = [t for t in self.wtacrs_saved if t.name not in before]
        return removed, added

    def to_dict(self, graphs: bool = False) -> Dict[str, Any]:
        removed, added = self.saved_tensor_changes()
        d: Dict[str, Any] = {
            "index": self.index,
            "baseline_saved_bytes": self.baseline.saved_bytes,
            "wtacrs_saved_bytes": self.report.compiled_saved_bytes,
            "planned_baseline_saved_bytes": self.report.baseline_saved_bytes,
            "planned_wtacrs_saved_bytes": self.report.wtacrs_saved_bytes,
            "baseline_saved_tensors": [t.to_dict() for t in self.baseline.saved],
            "wtacrs_saved_tensors": [t.to_dict() for t in self.wtacrs_saved],
            "removed_saved_tensors": [t.to_dict() for t in removed],
            "added_saved_tensors": [t.to_dict() for t in added],
            "packed_masks": list(getattr(self.report, "packed_masks", []) or []),
            "measurements": dict(self.report.measurements),
            "compile_seconds": dict(self.report.compile_seconds),
            "flops": {"torch.compile": self.flops(False), "wtacrs": self.flops(True)},
            "planned_flops": {k: dict(v) for k, v in self.report.flops.items()},
        }
        if graphs:
            d["graphs"] = {
                f"{kind}_{side}": self.graph_text(kind, after)
                for kind in GRAPH_KINDS
                for side, after in (("before", False), ("after", True))
            }
        return d


@dataclass
class InspectReport:
    """What :func:`inspect` found; :meth:`to_dict` is JSON-serialisable."""

    model: str  # a label: the model's class name, or the name it was given on the CLI
    config: WTACRSConfig
    objective: str  # "loss" (output.loss) or "sum" (sum of the output's tensors)
    graphs: List[GraphInspection]
    module_order: Dict[str, int] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- ops and totals

    def ops(self) -> List[Dict[str, Any]]:
        """One entry per matched op over all graphs, in module definition order."""
        rows = []
        for g in self.graphs:
            module_of = {op.node: op.module for op in g.report.ops}
            for op in g.report.ops:
                row = op.to_dict()
                row["graph"] = g.index
                # the op whose forward draw this one reuses (same activation), by module name
                shared = row.get("shared_draw_with")
                row["shared_draw_with_module"] = module_of.get(shared) if shared else None
                reads = g.gradient_reads.get(op.node)
                row["compiled_reads_before"] = sum(reads[0].values()) if reads else None
                row["compiled_reads_after"] = sum(reads[1].values()) if reads else None
                row["compiled_reads"] = {"before": reads[0], "after": reads[1]} if reads else None
                rows.append(row)
        unknown = len(self.module_order)
        rows.sort(key=lambda r: (r["graph"], self.module_order.get(r["module"], unknown), r["module"]))
        return rows

    def totals(self) -> Dict[str, Any]:
        base = sum(g.baseline_saved_bytes for g in self.graphs)
        after = sum(g.wtacrs_saved_bytes for g in self.graphs)
        decisions: Dict[str, int] = {}
        for g in self.graphs:
            for op in g.report.ops:
                decisions[op.decision] = decisions.get(op.decision, 0) + 1
        flops: Dict[str, Dict[str, Optional[int]]] = {}
        for side, rewritten in (("torch.compile", False), ("wtacrs", True)):
            per_graph = [g.flops(rewritten) for g in self.graphs]
            flops[side] = {
                kind: None if any(f[kind] is None for f in per_graph) else sum(f[kind] for f in per_graph)
                for kind in ("forward", "backward")
            }
        planned_base = [g.report.baseline_saved_bytes for g in self.graphs]
        planned_after = [g.report.wtacrs_saved_bytes for g in self.graphs]
        return {
            # read off the backward graphs Inductor compiled, baseline and wtacrs
            "baseline_saved_bytes": base,
            "wtacrs_saved_bytes": after,
            "ratio": (after / base) if base else None,
            "saved_bytes_reduction": base - after,
            # the pass's own partition of the joint graph: equal unless something after the
            # pass changed the partition
            "planned_baseline_saved_bytes": None if None in planned_base else sum(planned_base),
            "planned_wtacrs_saved_bytes": None if None in planned_after else sum(planned_after),
            # matmul-class FLOPs of the compiled graphs (forward, backward), both compiles
            "flops": flops,
            "graphs": len(self.graphs),
            "ops": sum(decisions.values()),
            "decisions": dict(sorted(decisions.items())),
        }

    def to_dict(self, graphs: bool = False) -> Dict[str, Any]:
        """``graphs=True`` adds the graph texts (forward, backward, joint; before and after)."""
        return {
            "model": self.model,
            "torch_version": torch.__version__,
            "objective": self.objective,
            "config": self.config.to_dict(),
            "ops": self.ops(),
            "totals": self.totals(),
            "graphs": [g.to_dict(graphs=graphs) for g in self.graphs],
        }

    # ---------------------------------------------------------------- graph diffs

    def diff(self, kinds: Sequence[str] = ("forward", "backward"), context: int = 3, users: bool = False) -> str:
        """Unified diff of each graph of ``kinds``, plain Inductor (``-``) vs wtacrs (``+``);
        see :meth:`GraphInspection.diff`."""
        chunks = [g.diff(kind, context, users) for g in self.graphs for kind in kinds]
        return "\n".join(chunks) + "\n"

    def format(self, **kwargs: Any) -> str:
        """The text report ``wtacrs-inspect`` prints; see :func:`text_report.format_report`."""
        from .text_report import format_report

        return format_report(self, **kwargs)

    def to_html(self, **kwargs: Any) -> str:
        """A self-contained HTML page: table, totals, saved-tensor changes, highlighted diffs."""
        from .html_report import render_html

        return render_html(self, **kwargs)

    def __str__(self) -> str:
        return self.format()


# -------------------------------------------------------------------------------------


def inspect(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    config: Optional[WTACRSConfig] = None,
    name: Optional[str] = None,
    dynamic: Optional[bool] = None,
    **options: Any,
) -> InspectReport:
    """Compile one training step of ``model`` with plain Inductor and with ``wtacrs`` and
    report, per matched op, the decision, the reason and the bytes, and the saved-activation
    totals of both compiled backward graphs.

    Args:
        model: an ``nn.Module`` (a ``torch.compile``-d one is unwrapped).
        example_inputs: a tuple of positional inputs or a dict of keyword inputs (a single
            tensor is taken as one positional input).
        config: a :class:`WTACRSConfig`; ``options`` (``ratio=0.3``, ``mode="compute"``, ...)
            override it field by field, validated like ``torch.compile(options=...)``.
        name: label of the model in the report (default: its class name).
        dynamic: ``torch.compile``'s ``dynamic`` for both compiles (``True``: symbolic sizes;
            the report gives bytes and k at the traced sizes and the expressions in the reasons).

    The step is the forward pass, then backward of ``output.loss`` when the output has one,
    else of the sum of the output's floating-point tensors.  Gradients, buffers and the RNG
    state are restored afterwards; Dynamo is reset before and after (so other functions
    compiled in this process recompile on their next call) and compile caches are off while
    inspecting, so both compiles really run.
    """
    if config is None:
        config = WTACRSConfig.from_options(options)
    elif options:
        WTACRSConfig.from_options(options)  # unknown keys and bad values: the config's message
        config = config.replace(**options)
    if not isinstance(config, WTACRSConfig):
        raise TypeError(f"inspect: config must be a WTACRSConfig, got {type(config).__name__}")
    model = original_module(model)  # a torch.compile-d module: inspect the original
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"inspect: model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)

    baseline_graphs: List[BaselineGraph] = []
    backend = WTACRSBackend(config)
    with _preserved(model, (args, kwargs)), fresh_compiles():
        objective = _step(torch.compile(model, backend=recording_inductor(baseline_graphs), dynamic=dynamic), args, kwargs)
        _clear_grads(model, (args, kwargs))
        reset_dynamo()
        _step(torch.compile(model, backend=backend, dynamic=dynamic), args, kwargs)

    if len(baseline_graphs) != len(backend.reports):
        raise InspectError(
            f"inspect: plain Inductor compiled {len(baseline_graphs)} graph(s) but wtacrs "
            f"{len(backend.reports)}: the two compiles split the model differently"
        )
    graphs = [_pair(i, b, r) for i, (b, r) in enumerate(zip(baseline_graphs, backend.reports))]
    order = {fqn: i for i, (fqn, _) in enumerate(model.named_modules())}
    return InspectReport(name or type(model).__name__, config, objective, graphs, order)


def _split_inputs(example_inputs: Any) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"inspect: keyword inputs need string keys, got {bad!r}")
        return (), dict(example_inputs)
    hint = " (wrap a single list argument as (your_list,))" if isinstance(example_inputs, list) else ""
    raise TypeError(
        "inspect: example_inputs must be a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}{hint}"
    )


def _step(compiled: Any, args: tuple, kwargs: dict) -> str:
    """Forward, then backward of ``.loss`` or of the output's sum; returns which one."""
    out = compiled(*args, **kwargs)
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        objective = "loss"
    else:
        leaves = [
            t
            for t in tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
        ]
        if not leaves:
            raise InspectError(
                "inspect: the model's output has no `.loss` and no floating-point tensor that "
                "requires grad: there is no backward pass to inspect (no_grad? frozen parameters?)"
            )
        loss = sum(t.sum() for t in leaves)
        objective = "sum"
    if not loss.requires_grad:
        raise InspectError("inspect: the output's `.loss` does not require grad: no backward pass to inspect")
    loss.backward()
    return objective


def recording_inductor(sink: List[BaselineGraph]):
    """Plain Inductor (what ``torch.compile(model)`` runs) that records what it compiled: one
    :class:`BaselineGraph` per graph appended to ``sink`` (graphs, saved activations, FLOPs).
    The inspector's baseline; the benchmarks' Inductor configurations too."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]):
        record = BaselineGraph()
        sink.append(record)

        def on_graph(kind: str, graphs: CompiledGraphs) -> None:
            module = graphs.modules[kind]
            if kind == BACKWARD:
                record.backward = str(module.graph)
                record.modules["backward"] = module
                record.flops["backward"] = graphs.flops[BACKWARD]
                if graphs.saved is not None:
                    record.saved_bytes = graphs.saved.activation_bytes
                    record.saved = _describe(module, graphs.saved.activations)
            else:  # forward, or inference (no backward will follow)
                record.forward = str(module.graph)
                record.modules["forward"] = module
                if kind == FORWARD:
                    record.flops["forward"] = graphs.flops[FORWARD]

        return recording_compile_fx(gm, example_inputs, CompiledGraphs(), on_graph)

    return backend


def _pair(index: int, baseline: BaselineGraph, report: CompileReport) -> GraphInspection:
    """Put one graph's two compiles side by side and measure, per op, what it reads."""
    graph = GraphInspection(index, baseline, report)
    modules = getattr(report, "graph_modules", None) or {}
    fw, bw = modules.get("forward"), modules.get("backward")
    if fw is None or bw is None:
        # A backend that does not keep its compiled graphs: names and bytes of the pass's final
        # partition (an identical rewrite of a copy of the compiled joint graph).
        graph.wtacrs_saved = [SavedTensor(n, b) for n, b in (report.saved_tensors or {}).items()]
        return graph
    after = saved_set(fw, bw).activations
    graph.wtacrs_saved = _describe(bw, after)
    base_fw, base_bw = baseline.modules.get("forward"), baseline.modules.get("backward")
    if base_fw is None or base_bw is None:
        return graph
    before = saved_set(base_fw, base_bw).activations
    backward = tangent_dependent(base_bw.graph)
    nodes = {n.name: n for n in base_bw.graph.nodes}
    for op in report.ops:
        # The joint graph's weight-gradient matmul keeps its name in the baseline's backward
        # graph, and the gradient it computes is returned at the same output position by both
        # compiles.  Its upstream gradient G (and all that G is computed from) is the rest of
        # backward, kept the same by the rewrite: what is left is the op's own X side.
        mm = nodes.get(op.node)
        if mm is None:
            continue
        outputs = _outputs_reached(base_bw, mm)
        upstream = {n.name for n in _ancestors([a for a in mm.all_input_nodes if a in backward])}
        graph.gradient_reads[op.node] = (
            _saved_read(base_bw, outputs, upstream, before),
            _saved_read(bw, outputs, upstream, after),
        )
    return graph


def _ancestors(roots: Sequence[fx.Node], stop: Callable[[fx.Node], bool] = lambda n: False) -> set:
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen or stop(node):
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _outputs_reached(bw: fx.GraphModule, start: fx.Node) -> List[int]:
    reached, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(node.users)
    outputs = bw.graph.find_nodes(op="output")[0].args[0]
    return [i for i, out in enumerate(outputs) if out in reached]


def _saved_read(
    bw: fx.GraphModule, outputs: Sequence[int], upstream: set, activations: Dict[str, int]
) -> Dict[str, int]:
    """The saved activations (name -> bytes) the given outputs of ``bw`` are computed from, not
    counting what the upstream gradient (nodes named in ``upstream``) is computed from."""
    results = bw.graph.find_nodes(op="output")[0].args[0]
    roots = [results[i] for i in outputs if isinstance(results[i], fx.Node)]
    reached = _ancestors(roots, stop=lambda n: n.name in upstream)
    return {
        n.name: activations[n.name]
        for n in bw.graph.find_nodes(op="placeholder")
        if n in reached and n.name in activations
    }


def _describe(bw: fx.GraphModule, activations: Dict[str, int]) -> List[SavedTensor]:
    out = []
    for node in bw.graph.find_nodes(op="placeholder"):
        if node.name not in activations:
            continue
        v = node.meta.get("val")
        shape = [int(s) if isinstance(s, int) else str(s) for s in v.shape] if isinstance(v, torch.Tensor) else None
        dtype = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else None
        out.append(SavedTensor(node.name, tensor_nbytes(v), shape, dtype, innermost_module(node)[0]))
    return out


@contextlib.contextmanager
def _preserved(model: torch.nn.Module, inputs: Any) -> Iterator[None]:
    """Restore what a training step changes: ``.grad`` of every parameter and of inputs that
    require grad, buffers (running statistics), the global RNG state (dropout) and the draws'
    stream (sampling)."""
    leaves = _grad_leaves(model, inputs)
    grads = [t.grad for t in leaves]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(), rng.fork():
        try:
            _clear_grads(model, inputs)
            yield
        finally:
            for t, g in zip(leaves, grads):
                t.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _grad_leaves(model: torch.nn.Module, inputs: Any) -> List[torch.Tensor]:
    tensors = list(model.parameters()) + [
        t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf
    ]
    return list({id(t): t for t in tensors}.values())


def _clear_grads(model: torch.nn.Module, inputs: Any) -> None:
    for t in _grad_leaves(model, inputs):
        t.grad = None
