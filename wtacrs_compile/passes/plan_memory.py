"""Decide, per matched op, whether WTA-CRS sampling pays -- measured, not guessed.

In a compiled graph the partitioner saves one tensor and recomputes cheap work from it.
Sampling an activation ``X`` in forward lowers memory only when nothing else in backward needs
the full ``X``, nor a tensor ``X`` is recomputed from: Q/K/V and FFN-up inputs are recomputed
from the LayerNorm input, which LayerNorm's backward keeps anyway; FFN-down's from the GeLU
input.  Sampling those costs accuracy and saves nothing.

The planner therefore asks the partitioner itself.  Sites that read the same activation form
one *unit* (one shared draw).  Units of the same structural *class* (module path with layer
indices folded, op kind, shapes) behave alike, so one measurement per class serves a whole
stack of layers:

1. partition with every candidate unit sampled in forward: ``B_all`` saved bytes;
2. for each class, partition with that class left exact: ``B_-c``;
3. the class pays when ``B_-c - B_all > 0``; its units are sampled in forward (``memory``).
   Classes that do not pay get ``compute`` (backward sampling, FLOPs only) when the mode
   allows it, else stay ``exact``, each with the reason.
4. a final partition of the chosen plan is compared with the unsampled baseline; a plan that
   does not lower the saved bytes is dropped whole.

That is ``2 + #classes`` partitioner runs, whatever the depth of the model; none when only
backward draws (``compute``) are asked for: they change no decision by bytes, and the
partition Inductor runs after the pass is the one the report reads.

A backward draw pays in FLOPs, not bytes, and only where the weight-gradient matmul is large
next to what the draw reads (:func:`backward_draw_gain`): a LoRA adapter's rank-8 product or a
small per-head ``bmm`` stays exact in ``compute`` mode, with the figure in the report.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx

from ..graph_utils import SavedSet, copy_graph, partition_saved, strip_views
from .match_matmuls import MatmulSite

MEMORY, COMPUTE, EXACT = "memory", "compute", "exact"
LIVE_ROWS = "live_rows"  # exact over the rows of G that can be non-zero (live_rows.py)

log = logging.getLogger(__name__)


@dataclass
class Decision:
    decision: str
    reason: str
    measured_saving: Optional[int] = None  # bytes the op's class saved, per op, when measured


@dataclass
class Applied:
    """What one rewrite did: draws shared between sites, and the forward sample node each
    forward-sampled site reads (to check whether the partition saves it)."""

    shared: Dict[str, str] = field(default_factory=dict)  # site -> site whose draw it reuses
    rows: Dict[str, str] = field(default_factory=dict)  # site -> forward sample node name
    feedback_sites: Set[str] = field(default_factory=set)  # draws reading cached ||g_i||
    # forward-drawn linear sites -> (True, the padding mask input their draw uses) or
    # (False, why it uses none)
    padding: Dict[str, Tuple[bool, str]] = field(default_factory=dict)


def saved_roots(saved: SavedSet) -> Set[str]:
    """Names of the forward nodes a partition saves, seen through views."""
    return {strip_views(n).name for n in saved.fw.graph.nodes if n.name in saved.activations}


@dataclass
class PlanResult:
    decisions: Dict[str, Decision]  # site node name -> decision
    baseline: Optional[SavedSet]  # None: backward draws only, not partitioned here
    # the partition of the chosen plan (baseline if none); None when only backward draws were
    # planned: nothing was measured, the compiled graphs tell
    final: Optional[SavedSet] = None
    measurements: Dict[str, int] = field(default_factory=dict)  # trial name -> saved bytes


def backward_draw_gain(site: MatmulSite, ratio: float) -> float:
    """Weight-gradient FLOPs a backward draw saves per tensor element it reads.

    The draw reads every row of X (``N x D_in``) and G (``N x D_out``) for the row norms and
    gathers ``k = ratio N`` of each; the matmul ``G^T X`` it shrinks does ``2 N D_in D_out``
    FLOPs, of which ``1 - ratio`` are saved:
    ``2 D_in D_out (1 - ratio) / ((1 + ratio) (D_in + D_out))``, independent of N.
    MiniLM's linears at ratio 0.3: 207 (384 x 384) and 331 (384 x 1536); a rank-8 LoRA
    adapter on them: 8.
    """
    per_row = site.weight_grad_flops(1) / site.batch  # 2 D_in D_out (0 where a size is unknown)
    d_out = per_row / (2 * site.d) if per_row else 0  # G's columns at their traced size
    return per_row * (1.0 - ratio) / ((1.0 + ratio) * (site.d + d_out)) if per_row else 0.0


def site_class(site: MatmulSite) -> str:
    """Structural class of a site: the FQN with layer indices folded, the op computing its
    activation, kind and shapes."""
    folded = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", site.fqn)
    return f"{folded}|{site.x_producer}|{site.kind}|{site.x_shape}|{site.g_shape}|{site.dtype}"


def plan(
    graph: fx.Graph,
    candidates: Sequence[MatmulSite],
    modes: Dict[str, str],
    apply: Callable[[fx.Graph, Dict[str, str]], Applied],
    static_input_indices: Optional[List[int]] = None,
    baseline: Optional[SavedSet] = None,
    backward_draw_fails: Optional[Callable[[MatmulSite], str]] = None,
) -> PlanResult:
    """Plan ``candidates`` (enabled, rewritable sites) given each site's configured mode.

    ``apply(graph, {site: "memory"|"compute"})`` rewrites a graph copy; the planner never
    touches ``graph`` itself.  ``baseline``: the exact partition to measure against (the
    best exact one: under the compile's memory budget); partitioned here when not given and a
    forward draw is to be measured against it.
    ``backward_draw_fails(site)``: why a backward draw cannot pay for itself at that site
    (``""`` when it can); such a site stays exact where it would be sampled in backward.
    """
    fails = backward_draw_fails or (lambda site: "")

    def in_backward(s: MatmulSite, why: str, measured: Optional[int] = None) -> Decision:
        """``compute`` for a site whose forward draw does not pay, if a backward one does."""
        reason = fails(s)
        if reason:
            return Decision(EXACT, f"{why}; {reason}" if why else reason, measured)
        return Decision(COMPUTE, f"{why}; sampled in backward for FLOPs" if why else "mode 'compute': sampled in backward", measured)

    rows: Dict[str, str] = {}

    trials = 0

    def measure(assign: Dict[str, str]) -> SavedSet:
        nonlocal trials
        g = copy_graph(graph)
        rows.clear()
        rows.update(apply(g, assign).rows)
        trials += 1
        saved = partition_saved(g, static_input_indices)
        log.debug("wtacrs: trial partition %d (%d sites rewritten): %d B saved", trials, len(assign), saved.activation_bytes)
        return saved

    result = PlanResult({}, baseline)
    if baseline is not None:
        result.measurements["baseline"] = baseline.activation_bytes
    decisions = result.decisions

    forced = {s.node: MEMORY for s in candidates if modes[s.node] == "all"}
    for name in forced:
        decisions[name] = Decision(MEMORY, "mode 'all': sampled in forward without a memory test")
    for s in candidates:
        if modes[s.node] == "compute":
            decisions[s.node] = in_backward(s, "")
    tested = [s for s in candidates if modes[s.node] in ("memory", "memory+compute")]
    if not tested:
        # Backward draws decide nothing by bytes: with no forward draw to locate, the rewritten
        # graph's partition is left to the one Inductor runs anyway (the report reads it off
        # the compiled graphs) instead of paying a trial partition for the report.
        result.final = measure(decisions_to_assign(decisions)) if forced else None
        return result
    if baseline is None:
        baseline = result.baseline = partition_saved(graph, static_input_indices)
        result.measurements["baseline"] = baseline.activation_bytes

    # Sites reading one activation share a draw (one unit); units alike form a class.
    units: Dict[str, List[MatmulSite]] = {}
    for s in tested:
        units.setdefault(s.x_key, []).append(s)
    classes: Dict[str, List[MatmulSite]] = {}
    for members in units.values():
        key = " + ".join(sorted(site_class(s) for s in members))
        classes.setdefault(key, []).extend(members)

    log.info("wtacrs: %d forward-draw classes to measure: %d trial partitions (one more if a draw is not saved)",
             len(classes), len(classes) + 2)
    everything = dict(forced)
    everything.update({s.node: MEMORY for s in tested})
    b_all = measure(everything).activation_bytes
    result.measurements["all_candidates"] = b_all

    for cls, members in classes.items():
        without = {k: v for k, v in everything.items() if k not in {m.node for m in members}}
        b_without = measure(without).activation_bytes
        result.measurements[f"without:{cls}"] = b_without
        gain = b_without - b_all
        per_op = gain // len(members)
        for s in members:
            if gain > 0:
                decisions[s.node] = Decision(
                    MEMORY,
                    f"sampling in forward removes the full activation from the saved set "
                    f"(measured: {gain} B for {len(members)} op(s) of this class)",
                    per_op,
                )
            else:
                why = (
                    "sampling in forward saves no bytes: the full activation, or the tensor it is "
                    "recomputed from, stays saved for another backward op"
                    + (f" (measured: {gain:+d} B)" if gain else "")
                )
                if modes[s.node] == "memory+compute":
                    decisions[s.node] = in_backward(s, why, per_op)
                else:
                    decisions[s.node] = Decision(EXACT, why, per_op)

    chosen = decisions_to_assign(decisions)
    final = measure(chosen) if chosen else baseline
    result.measurements["plan"] = final.activation_bytes
    if not forced and chosen and final.activation_bytes >= baseline.activation_bytes:
        for s in tested:
            if decisions[s.node].decision == MEMORY:
                decisions[s.node] = Decision(
                    EXACT,
                    f"the combined plan saved no bytes ({final.activation_bytes} B vs "
                    f"{baseline.activation_bytes} B unsampled); left exact",
                )
        chosen = decisions_to_assign(decisions)
        final = measure(chosen) if chosen else baseline
    # A forward draw the partition does not save runs in backward from tensors it keeps
    # anyway: its bytes came from the partitioner recomputing what it was drawn from, which
    # the exact partition can do without sampling.  Such an op draws in backward with the
    # exact gradient norms (memory+compute) or stays exact (memory).
    kept = saved_roots(final)
    unsaved = [
        s for s in tested if decisions[s.node].decision == MEMORY and rows.get(s.node) not in kept
    ]
    if unsaved:
        why = (
            "its forward draw would run in backward from tensors the partition saves anyway: "
            "the bytes come from recomputation, which the exact partition gets without sampling"
        )
        for s in unsaved:
            if modes[s.node] == "memory+compute":
                decisions[s.node] = in_backward(s, why)
            else:
                decisions[s.node] = Decision(EXACT, why)
        chosen = decisions_to_assign(decisions)
        final = measure(chosen) if chosen else baseline
        result.measurements["plan_without_unsaved_draws"] = final.activation_bytes
    result.final = final
    return result


def decisions_to_assign(decisions: Dict[str, Decision]) -> Dict[str, str]:
    return {k: d.decision for k, d in decisions.items() if d.decision in (MEMORY, COMPUTE)}
