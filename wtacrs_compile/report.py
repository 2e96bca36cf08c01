"""What the ``wtacrs`` pass did to one compiled graph: per-op records and saved-byte totals.

A :class:`CompileReport` is produced for every graph the backend compiles and is kept on the
backend object (``WTACRSBackend.reports``) and in a short per-process log readable with
:func:`recent_reports` (for ``backend="wtacrs"`` given by name).  Nothing is printed.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional


@dataclass
class OpRecord:
    module: str  # module FQN, e.g. "encoder.layer.0.attention.self.query"
    module_type: str
    op: str  # "linear" | "lora" | "bmm"
    node: str  # the backward matmul in the joint graph
    shapes: Dict[str, List[int]]  # "x": the sampled activation (N x D), "grad": G (N x D_out)
    dtype: str
    ratio: float
    k: int
    decision: str  # "memory" | "compute" | "exact"
    reason: str
    saved_bytes_before: int  # bytes of the full activation this op's weight gradient reads
    saved_bytes_after: int  # what it reads after the rewrite (sampled rows + indices + weights)
    measured_saving: Optional[int] = None  # planner's measurement for this op's class, per op
    rules: List[int] = field(default_factory=list)  # indices of the config rules that matched
    annotation: Dict[str, Any] = field(default_factory=dict)  # wtacrs_compile.annotate settings (applied after rules)
    shared_draw_with: Optional[str] = None  # sibling op whose forward draw this op reuses
    grad_norm_feedback: bool = False  # its draw reads cached ||g_i|| (config.grad_norm_feedback)
    # forward-drawn linears: the padding prior of the draw (config.padding_mask), or why none
    padding_mask: str = ""
    # Inductor's default partition saves this op's activation and the exact partition under
    # the memory budget recomputes it in backward instead (no sampling involved)
    recomputed: bool = False
    input_node: str = ""  # the forward node this op's activation comes from (through views)
    input_saved_by_inductor: bool = False  # Inductor's default partition saves it (under a budget)
    sample: Optional[str] = None  # forward-drawn ops: the joint-graph node of the k sampled rows
    # FLOPs of this op's weight-gradient matmul, exact (2 N D_in D_out per product) and as
    # rewritten (2 k D_in D_out when sampled); the draw's own elementwise work is not in it
    flops_before: int = 0
    flops_after: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompileReport:
    config: Dict[str, Any]
    ops: List[OpRecord] = field(default_factory=list)
    inductor_saved_bytes: Optional[int] = None  # Inductor's default partition (no budget, no rewrite)
    baseline_saved_bytes: Optional[int] = None  # exact partition under the memory budget, no rewrite
    wtacrs_saved_bytes: Optional[int] = None  # partitioned joint graph after the rewrite
    compiled_saved_bytes: Optional[int] = None  # read off the backward graph Inductor compiled
    measurements: Dict[str, int] = field(default_factory=dict)
    joint_graph_before: str = ""
    joint_graph_after: str = ""
    forward_graph: str = ""
    backward_graph: str = ""
    saved_tensors: Dict[str, int] = field(default_factory=dict)  # name -> bytes, after rewrite
    baseline_saved_tensors: Dict[str, int] = field(default_factory=dict)
    packed_masks: List[str] = field(default_factory=list)  # boolean masks stored as bits
    partitioner_note: str = ""  # how the exact partition was obtained, when not plainly
    # the activation_memory_budget the compiled partition ran under, where torch's cut at the
    # compile's budget saved more than memory_budget promised (passes/meet_budget.py)
    tightened_budget: Optional[float] = None
    random_ops_kept: int = 0  # random nodes (dropout) banned from recomputation (passes/keep_random.py)
    # uniform draws (dropout masks) made with the hash (passes/hash_rng.py): "hashed", their
    # "elements", and a count per reason a draw kept Inductor's Philox
    uniform_draws: Dict[str, int] = field(default_factory=dict)
    # Wall seconds of this graph's compile by stage (see backend.py): "exact_baseline",
    # "plan" (the planner's trial partitions), "rewrite", "joint_pass" (all of the pass),
    # "inductor_forward" / "inductor_backward" (code generation), "partition" (AOTAutograd's
    # partition where memory_budget is in force: passes/meet_budget.py) and "backend" (the whole
    # backend call: AOTAutograd's tracing and partition, the pass, Inductor).
    compile_seconds: Dict[str, float] = field(default_factory=dict)
    # FLOPs of matmul-class ops (torch.utils.flop_counter's formulas) per partition, each
    # {"forward": f, "backward": b}: "joint" (the joint graph before the rewrite, split into
    # its forward and backward parts: the default partition's figures, counted without one),
    # "inductor" (default partition, no rewrite), "baseline"
    # (the exact partition under the memory budget: its backward includes what it
    # recomputes), "wtacrs" (the pass's partition of the rewritten graph) and "compiled" (the
    # graphs Inductor compiled; "backward" appears when the backward compiles).
    flops: Dict[str, Dict[str, int]] = field(default_factory=dict)
    # measurements taken from an earlier compile of the same joint graph instead of partitioning
    # again ("exact_baseline", "plan"; see plan_cache.py), or "compiled": the whole compiled
    # function of an earlier compile of the same Dynamo graph, served again (this report is a
    # copy of that compile's, with no compile time of its own)
    reused: List[str] = field(default_factory=list)
    # The fx.GraphModules Inductor compiled ("forward", "backward"); not serialised.
    graph_modules: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def served_again(self) -> "CompileReport":
        """The report of a recompile served this compile's function: the same plan and bytes
        (as known now: a backward that has not compiled yet fills only this report), marked
        ``reused=["compiled"]``, without compile seconds."""
        return dataclasses.replace(self, compile_seconds={}, reused=["compiled"])

    def count(self, decision: Optional[str] = None, op: Optional[str] = None) -> int:
        return sum(
            1
            for r in self.ops
            if (decision is None or r.decision == decision) and (op is None or r.op == op)
        )

    def to_dict(self, graphs: bool = False) -> Dict[str, Any]:
        base, after = self.baseline_saved_bytes, self.wtacrs_saved_bytes
        d = {
            "config": self.config,
            "ops": [op.to_dict() for op in self.ops],
            "totals": {
                "inductor_saved_bytes": self.inductor_saved_bytes,
                "baseline_saved_bytes": base,
                "wtacrs_saved_bytes": after,
                "ratio": (after / base) if base and after is not None else None,
                "compiled_saved_bytes": self.compiled_saved_bytes,
            },
            "measurements": dict(self.measurements),
            "saved_tensors": dict(self.saved_tensors),
            "baseline_saved_tensors": dict(self.baseline_saved_tensors),
            "packed_masks": list(self.packed_masks),
            "partitioner_note": self.partitioner_note,
            "tightened_budget": self.tightened_budget,
            "random_ops_kept": self.random_ops_kept,
            "uniform_draws": dict(self.uniform_draws),
            "compile_seconds": dict(self.compile_seconds),
            "flops": {k: dict(v) for k, v in self.flops.items()},
            "reused": list(self.reused),
        }
        if graphs:
            d["graphs"] = {
                "joint_before": self.joint_graph_before,
                "joint_after": self.joint_graph_after,
            }
        return d


_RECENT: Deque[CompileReport] = collections.deque(maxlen=32)


def _log(report: CompileReport) -> None:
    _RECENT.append(report)


def recent_reports() -> List[CompileReport]:
    """Reports of the graphs compiled by ``backend="wtacrs"`` in this process, oldest first
    (the last 32)."""
    return list(_RECENT)


def clear_reports() -> None:
    _RECENT.clear()
