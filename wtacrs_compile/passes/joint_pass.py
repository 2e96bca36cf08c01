"""The joint-graph pass Inductor runs before partitioning (``joint_custom_post_pass``).

Its stages, each taking and returning plain data (``docs/architecture.md``)::

    sites    = _analyse(joint)                # match_matmuls.py, match_bmm.py -> [MatmulSite]
    resolved = _resolve(joint, sites)         # config rules, annotations     -> Resolved
    _live_rows(joint, resolved)               # live_rows.py: exact rewrite of enabled ops whose
                                              # G has provably zero rows -> Resolved.live
    baseline = _exact_baseline(joint)         # best exact partition          -> Baseline
                                              # (backward draws only: _partition_settings,
                                              # the compiled graphs tell)
    outcome  = _plan_and_rewrite(...)         # plan_memory.py on copies, then one rewrite of
                                              # the real graph (sample_*.py) -> Outcome
    final    = _pack_masks(...)               # opt-in, pack_masks.py
    report.ops = [_record(site, resolved, outcome) ...]

The pass object holds only what the compile gives it (config, parameters, report); the
traced-subgraph cache lives for one call.  Its ``uuid()`` hashes the package's source and the
config, so Inductor's FX graph cache never serves a graph compiled under other settings.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import torch.fx as fx

from ..annotate import site_context
from ..config import OpSettings, WTACRSConfig, warn_unmatched_rules
from ..estimator import DrawSpec
from ..graph_utils import (
    PartitionerSettings, SavedSet, copy_graph, fw_bw_flops, input_bytes, joint_flops, partition_saved, saved_value_bytes,
    traced_size, val,
)
from ..plan_cache import PlanCache, graph_key
from ..report import CompileReport, OpRecord
from ..torch_internals import CustomGraphPass, budget_solver_gives_up, stable_topological_sort
from . import plan_memory
from .hash_rng import hash_uniform_draws
from .keep_random import keep_random_ops
from .live_rows import LiveRows, find_live_rows, rewrite_with_live_rows
from .match_bmm import find_bmm_sites
from .match_matmuls import MatmulSite, find_weight_grad_matmuls
from .pack_masks import pack_saved_masks
from .padding_prior import PaddingMask, find_padding_masks
from .sample_bmm import draw_bmm_forward_sample, rewrite_bmm_with_forward_sample
from .row_ops import Feedback
from .sample_matmul import draw_forward_sample, rewrite_with_backward_sample, rewrite_with_forward_sample

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent

# Progress of long compiles (what is planned, how many trial partitions); quiet unless the
# application enables it, e.g. logging.getLogger("wtacrs_compile").setLevel(logging.INFO).
log = logging.getLogger(__name__)


@functools.lru_cache(None)
def source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class Resolved:
    """Stage 2's output: settings per site, the candidates, and why the others stay exact."""

    sites: List[MatmulSite]
    settings: Dict[str, OpSettings] = field(default_factory=dict)  # site node -> settings
    candidates: List[MatmulSite] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # site node -> reason left exact
    live: Dict[str, LiveRows] = field(default_factory=dict)  # site node -> rows it reads (exact)
    notes: Dict[str, str] = field(default_factory=dict)  # site node -> a fact for its record


@dataclass
class Baseline:
    """Stage 3's output: the best exact partition (None: left to the partition AOTAutograd
    runs next, see :meth:`WTACRSJointPass._partition_settings`), and the forward nodes
    Inductor's default partition saves (empty when the compile has no memory budget)."""

    saved: Optional[SavedSet]
    inductor_roots: Set[str] = field(default_factory=set)


@dataclass
class Outcome:
    """Stage 4's output: the planner's decisions, what the rewrite did, the partition of the
    rewritten graph, and the facts the records report."""

    decisions: Dict[str, plan_memory.Decision]
    applied: plan_memory.Applied
    final: Optional[SavedSet]  # None: not partitioned here (backward draws only)
    drawn_in_backward: Set[str]  # forward draws the partition runs in backward
    recomputed: Set[str]  # sites whose activation the budget recomputes exactly
    inductor_roots: Set[str] = field(default_factory=set)  # what Inductor's default partition saves


RECOMPUTED_NOTE = "; its activation is recomputed exactly in backward (memory_budget), not saved"


def complete_from_compiled(report: CompileReport, saved: SavedSet, flops: Dict[str, int]) -> None:
    """Fill the figures the joint pass left to the compiled graphs (``saved``, ``flops``: what
    the backward Inductor compiled takes from the forward).  With one op per backward draw
    only, the pass partitions nothing for its own figures (``_partition_settings``): the
    compiled partition is both the exact one under the budget (the forward is unchanged) and
    the rewritten graph's, and it tells which activations the budget recomputes."""
    report.compiled_saved_bytes = saved.activation_bytes
    if report.baseline_saved_bytes is None:
        report.baseline_saved_bytes = saved.activation_bytes
        report.baseline_saved_tensors = dict(saved.activations)
        # the exact backward does each sampled product in full
        sampled = sum(op.flops_before - op.flops_after for op in report.ops)
        report.flops["baseline"] = {"forward": flops.get("forward", 0), "backward": flops.get("backward", 0) + sampled}
        if report.inductor_saved_bytes is None:  # no budget, no rewrite before: the same partition
            report.inductor_saved_bytes = saved.activation_bytes
        if "inductor" not in report.flops and "joint" in report.flops:
            report.flops["inductor"] = dict(report.flops["joint"])
        roots = plan_memory.saved_roots(saved)
        for op in report.ops:
            if op.input_saved_by_inductor and op.input_node not in roots and op.decision != plan_memory.MEMORY:
                op.recomputed = True
                op.reason += RECOMPUTED_NOTE
    if report.wtacrs_saved_bytes is None:
        report.wtacrs_saved_bytes = saved.activation_bytes
        report.saved_tensors = dict(saved.activations)
        report.flops["wtacrs"] = dict(flops)


def _positions(x_root: fx.Node, rows: int) -> int:
    """Rows per example of a draw whose rows flatten a ``(B, ..., D)`` activation (``(B, S, D)``
    for a linear, ``(B, H, S, D)`` for attention): ``prod(...)``, or 0 where X has no such
    shape (the feedback cache then needs example ids)."""
    shape = getattr(val(x_root), "shape", ())
    if len(shape) < 3 or not all(isinstance(d, int) for d in shape):
        return 0
    return math.prod(shape[1:-1]) if math.prod(shape[:-1]) == rows else 0


def _padding_note(padding: Optional[Tuple[bool, str]]) -> str:
    """The report's word on a forward draw's padding prior ("" for other ops)."""
    if padding is None:
        return ""
    used, text = padding
    return f"rows {text} pads get p = 0 (checked in backward)" if used else f"none: {text}"


def _type_name(types) -> str:
    return types[0].__name__ if types else ""


class WTACRSJointPass(CustomGraphPass):
    def __init__(
        self,
        config: WTACRSConfig,
        params: FrozenSet[str],
        static_input_indices: Tuple[int, ...],
        report: CompileReport,
        feedback=None,
        graph_tag: int = 0,
        partitioner: Optional[PartitionerSettings] = None,
        plans: Optional[PlanCache] = None,
        input_names: Tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.input_names = tuple(input_names)  # the Dynamo graph's inputs: primals_{i+1} is input i
        self.partitioner = partitioner  # the compile's memory budget; None: torch's settings
        self.feedback = feedback  # a feedback.GradNormCache when config.grad_norm_feedback
        self.graph_tag = graph_tag
        self.params = frozenset(params)
        self.static_input_indices = list(static_input_indices)
        self.report = report
        self.plans = plans  # measurements of earlier compiles of the same joint graph

    @classmethod
    def for_compile(
        cls, config: WTACRSConfig, static_input_indices: Tuple[int, ...], report: Optional[CompileReport] = None, **kw
    ) -> "WTACRSJointPass":
        """The pass for one compile of a Dynamo graph: its parameters are the static inputs
        (AOTAutograd names input i ``primals_{i+1}``), its partitions run under the config's
        memory budget; ``kw``: feedback, graph_tag, plans, input_names."""
        static = tuple(static_input_indices)
        params = frozenset(f"primals_{i + 1}" for i in static)
        report = report if report is not None else CompileReport(config=config.to_dict())
        return cls(config, params, static, report, partitioner=PartitionerSettings(config.memory_budget), **kw)

    def uuid(self) -> str:
        h = hashlib.sha256()
        h.update(source_hash().encode())
        h.update(self.config.fingerprint().encode())
        h.update(",".join(sorted(self.params)).encode())
        h.update(",".join(self.input_names).encode())  # the padding mask is found by name
        if self.feedback is not None:  # the cache's name and the graph's number are baked in
            h.update(f"{self.feedback.name}:{self.graph_tag}".encode())
        return h.hexdigest()

    # ----------------------------------------------------------------------------------

    def __call__(self, graph: fx.Graph) -> None:
        if not any(n.op == "placeholder" and n.target.startswith("tangents") for n in graph.nodes):
            # Inductor runs joint passes on inference graphs too (no_grad, inference_mode,
            # inputs that need no gradient): there is no backward to estimate, so the graph is
            # left exactly as plain torch.compile compiles it (no mask packing either).
            return
        start = time.perf_counter()
        try:
            self._run(graph)
        finally:
            self.report.compile_seconds["joint_pass"] = time.perf_counter() - start

    def _stage(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.report.compile_seconds[name] = self.report.compile_seconds.get(name, 0.0) + now - since
        return now

    def _run(self, graph: fx.Graph) -> None:
        """The stages, in order; each takes and returns plain data (see docs/architecture.md)."""
        report = self.report
        # Earlier joint passes may leave the graph out of order (Inductor sorts after all of
        # them); copies for the planner need definitions before uses.
        stable_topological_sort(graph)
        report.joint_graph_before = str(graph)
        # Before any partition (the planner's and the exact baseline's too): under a memory
        # budget torch's partitioner would otherwise redraw dropout in backward.
        report.random_ops_kept = keep_random_ops(graph)
        if self.config.rng != "philox":  # before any partition: every one sees the same draws
            report.uniform_draws = hash_uniform_draws(graph, cpu_only=self.config.rng == "auto")
        # the default partition's FLOPs, counted before any rewrite, where no partition of
        # this graph is measured for them (backward draws only, no budget)
        report.flops["joint"] = joint_flops(graph)
        cache: dict = {}  # traced replacement subgraphs, reused across the planner's copies
        sites = self._analyse(graph)
        resolved = self._resolve(graph, sites)
        t = time.perf_counter()
        inductor = self._live_rows(graph, resolved, cache)
        self._stage("live_rows", t)
        # forward draws and packed masks change what the forward saves: measured against the
        # exact partition; backward draws alone do not
        measured = self.config.pack_masks or any(resolved.settings[s.node].mode != "compute" for s in resolved.candidates)
        budget = self.partitioner is not None and self.partitioner.budget < 1.0
        log.info(
            "wtacrs: graph %d: %d matmul sites, %d candidates; %s",
            self.graph_tag, len(sites), len(resolved.candidates),
            ("exact baseline partitions (Inductor's, then under the memory budget)" if budget else "exact baseline partition")
            if measured else "Inductor's partition, for the budget's settings" if budget else "no partition of its own",
        )
        t = time.perf_counter()
        key = graph_key(graph, [self.static_input_indices, self.partitioner.key() if self.partitioner else None])
        if measured:
            baseline = self._cached(("exact_baseline", key), lambda: self._exact_baseline(graph))
        else:
            baseline = self._cached(("partition_settings", key), lambda: self._partition_settings(graph, inductor, resolved))
        self._stage("exact_baseline", t)
        outcome = self._plan_and_rewrite(graph, resolved, baseline, cache, key)
        final = outcome.final
        if self.config.pack_masks:
            if final is None:
                final = partition_saved(graph, self.static_input_indices)
            final = self._pack_masks(graph, final, cache)

        if baseline.saved is not None:
            report.inductor_saved_bytes = report.measurements.get("inductor", baseline.saved.activation_bytes)
            report.baseline_saved_bytes = baseline.saved.activation_bytes
            report.baseline_saved_tensors = dict(baseline.saved.activations)
            report.flops["baseline"] = fw_bw_flops(baseline.saved)
            report.flops.setdefault("inductor", report.flops["baseline"])  # no budget: the same partition
        else:  # read off the compiled graphs (complete_from_compiled)
            report.inductor_saved_bytes = report.measurements.get("inductor")
        if final is not None:
            report.wtacrs_saved_bytes = final.activation_bytes
            report.saved_tensors = dict(final.activations)
            report.flops["wtacrs"] = fw_bw_flops(final)
        # else: backward draws only; the backend fills these from the graphs Inductor
        # partitions and compiles (see backend.py), without a trial partition here
        report.joint_graph_after = str(graph)
        report.ops = [self._record(site, resolved, outcome) for site in sites]

    def _analyse(self, graph: fx.Graph) -> List[MatmulSite]:
        """Stage 1: the weight-gradient matmuls (and, with ``ops`` naming it, attention bmms)."""
        sites = find_weight_grad_matmuls(graph, self.params)
        if "bmm" in self.config.ops:  # attention products; fused SDPA comes back as exact sites
            sites += find_bmm_sites(graph, self.params)
        return sites

    def _live_rows(self, graph: fx.Graph, resolved: Resolved, cache: dict) -> Optional[SavedSet]:
        """Stage 2b: enabled ops whose output gradient has provably zero rows read only the
        others, exactly (``live_rows.py``); they leave the candidates.  Inductor's own
        partition is measured first, on the graph as it came: the report's "Inductor" figures
        stay plain torch.compile's.  Returns that partition (None when nothing was rewritten)."""
        if not self.config.live_rows:
            return None
        enabled = [s for s in resolved.sites if resolved.settings[s.node].enabled]
        found = find_live_rows(graph, enabled)
        for name, rows in found.items():
            if isinstance(rows, str):
                resolved.notes[name] = rows
            else:
                resolved.live[name] = rows
                resolved.skipped.pop(name, None)
        if not resolved.live:
            return None
        resolved.candidates = [s for s in resolved.candidates if s.node not in resolved.live]
        p = self.partitioner
        key = graph_key(graph, [self.static_input_indices, p.key() if p else None])

        def measure_inductor() -> SavedSet:  # before the rewrite: plain torch.compile's figures
            return self._inductor_partition(graph)

        inductor = self._cached(("inductor", key), measure_inductor)
        nodes = {n.name: n for n in graph.nodes}
        for site in resolved.sites:
            if site.node in resolved.live:
                rewrite_with_live_rows(graph, nodes[site.node], site, resolved.live[site.node], cache)
        graph.eliminate_dead_code()
        log.info("wtacrs: graph %d: %d ops read only their live rows", self.graph_tag, len(resolved.live))
        return inductor

    def _resolve(self, graph: fx.Graph, sites: List[MatmulSite]) -> Resolved:
        """Stage 2: each site's settings from the config's rules and in-code annotations;
        which sites are candidates and why the others stay exact."""
        resolved = Resolved(sites)
        # Rules see the types of the op's module and of its parents; annotations come from
        # torch.fx.traceback.annotate metadata (wtacrs_compile.annotate).
        context = site_context(graph, sites)
        for site in sites:
            types, annotation = context[site.node]
            s = self.config.resolve(site.fqn, types, site.kind, annotation)
            resolved.settings[site.node] = s
            k = s.k_for(site.n) if site.n > 0 else -1
            if not s.enabled:
                resolved.skipped[site.node] = s.reason
            elif site.skip_reason:
                resolved.skipped[site.node] = site.skip_reason
            elif s.ratio >= 1.0:
                resolved.skipped[site.node] = "ratio 1.0: exact"
            elif not site.dynamic_n and k >= site.n:
                resolved.skipped[site.node] = f"k = {k} >= N = {site.n}: nothing to sample"
            else:
                resolved.candidates.append(site)
        warn_unmatched_rules(
            self.config,
            [(site.fqn, context[site.node][0], site.kind) for site in sites],
            {i for s in resolved.settings.values() for i in s.rules},
        )
        return resolved

    def _cached(self, key: tuple, measure):
        """``measure()`` (a baseline or a plan), or what it gave for the same key in an earlier
        compile: with the report fields it filled and the partitioner settings it changed."""
        report, p = self.report, self.partitioner
        hit = self.plans.get(key) if self.plans is not None else None
        if hit is not None:
            value, measurements, flops, note, relaxed = hit
            report.measurements.update(measurements)
            report.flops.update(flops)
            report.partitioner_note = report.partitioner_note or note
            if relaxed and p is not None and not p.relaxed:
                p.relax_bans()  # AOTAutograd's own partition must run under the same settings
            report.reused.append(key[0])
            log.info("wtacrs: graph %d: %s reused from an earlier compile of the same graph", self.graph_tag, key[0])
            return value
        before_m, before_f = set(report.measurements), set(report.flops)
        value = measure()
        if self.plans is not None:
            self.plans.put(key, (
                value,
                {k: v for k, v in report.measurements.items() if k not in before_m},
                {k: v for k, v in report.flops.items() if k not in before_f},
                report.partitioner_note,
                bool(p is not None and p.relaxed),
            ))
        return value

    def _plan_and_rewrite(
        self, graph: fx.Graph, resolved: Resolved, baseline: Baseline, cache: dict, key: str = ""
    ) -> Outcome:
        """Stages 3-4: the planner decides on rewritten copies, then the real graph is
        rewritten once with its decisions."""
        by_name = {s.node: s for s in resolved.sites}
        settings = resolved.settings

        candidates = resolved.candidates
        # which padding mask each site that may draw in forward uses: once, not per trial
        forward = [s for s in candidates if settings[s.node].mode != plan_memory.COMPUTE]
        padding = find_padding_masks(graph, forward, self.input_names, self.config.padding_mask) if forward else {}

        def apply(g: fx.Graph, assign: Dict[str, str]) -> plan_memory.Applied:
            return self._apply(g, [by_name[n] for n in assign], assign, settings, cache, padding)

        if not candidates:
            if baseline.saved is not None:
                self.report.measurements["baseline"] = baseline.saved.activation_bytes
            return Outcome({}, plan_memory.Applied(), baseline.saved, set(), self._recomputed_inputs(resolved.sites, baseline), baseline.inductor_roots)
        log.info("wtacrs: graph %d: planning %d candidate sites (%s)", self.graph_tag, len(candidates),
                 ", ".join(f"{n} {m}" for m, n in collections.Counter(settings[s.node].mode for s in candidates).items()))
        t = time.perf_counter()
        modes = {s.node: settings[s.node].mode for s in candidates}
        # the plan depends on the graph, on each candidate's settings and module (its class),
        # and on the config's other settings (feedback changes the rewrite)
        feedback = (self.feedback.name, self.graph_tag) if self.feedback is not None else None
        plan_key = ("plan", key, self.config.fingerprint(), feedback,
                    tuple((s.node, s.fqn, repr(settings[s.node])) for s in candidates))
        min_gain = self.config.min_draw_gain

        def backward_draw_fails(site: MatmulSite) -> str:
            gain = plan_memory.backward_draw_gain(site, settings[site.node].ratio)
            if gain >= min_gain:
                return ""
            return (f"a backward draw saves {gain:.0f} weight-gradient FLOPs per element it reads "
                    f"(< min_draw_gain {min_gain:g}): it would cost more than it saves; exact")

        result = self._cached(plan_key, lambda: plan_memory.plan(
            graph, candidates, modes, apply, self.static_input_indices, baseline=baseline.saved,
            backward_draw_fails=backward_draw_fails,
        ))
        self.report.measurements.update(result.measurements)
        t = self._stage("plan", t)
        applied = apply(graph, plan_memory.decisions_to_assign(result.decisions))
        self._stage("rewrite", t)
        final = result.final  # partitioned from an identical rewrite of a copy
        # The partitioner need not save a forward draw's sample: it may recompute the whole
        # draw in backward from tensors it saves anyway (still unbiased: no forward op reads
        # the sample).  The planner turns such ops to compute or exact, except under mode
        # "all"; record where each remaining draw ran rather than assume it.
        saved_roots = plan_memory.saved_roots(final) if final is not None else set()
        drawn_in_backward = {site for site, name in applied.rows.items() if name not in saved_roots}
        return Outcome(result.decisions, applied, final, drawn_in_backward, self._recomputed_inputs(resolved.sites, baseline), baseline.inductor_roots)

    def _pack_masks(self, graph: fx.Graph, saved: SavedSet, cache: dict) -> SavedSet:
        """Stage 5 (opt-in): pack the boolean masks the partition saves; keep it only if the
        bytes drop."""
        trial = copy_graph(graph)
        if not pack_saved_masks(trial, saved.activations, cache):
            return saved
        packed = partition_saved(trial, self.static_input_indices)
        if packed.activation_bytes >= saved.activation_bytes:
            return saved
        self.report.packed_masks = pack_saved_masks(graph, saved.activations, cache)
        self.report.measurements["packed_masks"] = packed.activation_bytes
        return packed

    def _apply(
        self,
        graph: fx.Graph,
        sites: List[MatmulSite],
        assign: Dict[str, str],
        settings: Dict[str, OpSettings],
        cache: dict,
        padding: Dict[str, object],
    ) -> plan_memory.Applied:
        """Rewrite ``sites`` of ``graph`` per ``assign``: which draws are shared, which forward
        sample node each site reads, which draws read the gradient-norm cache.  ``padding``:
        :func:`find_padding_masks` of every site that may draw in forward (by node name, so it
        holds for the planner's copies too)."""
        nodes = {n.name: n for n in graph.nodes}
        draws: Dict[tuple, tuple] = {}
        applied = plan_memory.Applied()
        shared = applied.shared
        # Symbolic N: the rewrite computes k = s.k_for(N) as a SymInt from the traced shape.
        draw_of = {
            site.node: DrawSpec(s.k_for if site.dynamic_n else s.k_for(site.n), s.deterministic, s.sampling,
                                self.config.inline_draws, self.config.recompute_draw_inputs)
            for site in sites for s in [settings[site.node]]
        }
        # Sites reading each forward draw: with feedback, each writes its ||g_i^s|| and the
        # cache keeps sqrt(sum_s ||g_i^s||^2) for the draw (Q/K/V share their input's draw).
        readers = collections.Counter(
            (site.x_key, draw_of[site.node]) for site in sites if assign[site.node] == plan_memory.MEMORY
        )
        for site in sites:
            draw = draw_of[site.node]
            node = nodes[site.node]
            bmm = site.kind == "bmm"  # a 3-D x_key node is never a linear's: keys cannot clash
            if assign[site.node] == plan_memory.MEMORY:
                key = (site.x_key, draw)
                if key not in draws:
                    fb = None  # gradient-norm feedback, keyed by the draw's first site
                    if self.feedback is not None:  # the graph's number too: names repeat across pieces
                        fb = Feedback(self.feedback.key(f"{self.graph_tag}:{site.fqn}:{site.node}"),
                                      readers[key], _positions(nodes[site.x_root], site.batch * site.n))
                    if bmm:
                        draws[key] = (draw_bmm_forward_sample(graph, node, site, draw, cache, fb), site.node)
                    else:
                        mask = padding[site.node]
                        mask_node = nodes[mask.node] if isinstance(mask, PaddingMask) else None
                        draws[key] = (draw_forward_sample(graph, node, site, draw, cache, fb, mask_node), site.node)
                else:
                    shared[site.node] = draws[key][1]
                if not bmm:  # a shared draw's prior is its first reader's
                    owner = padding[draws[key][1]]
                    applied.padding[site.node] = (True, owner.input) if isinstance(owner, PaddingMask) else (False, owner)
                applied.rows[site.node] = draws[key][0].rows.name
                if draws[key][0].feedback is not None:
                    applied.feedback_sites.add(site.node)
                if bmm:
                    rewrite_bmm_with_forward_sample(graph, node, site, draws[key][0], cache)
                else:
                    rewrite_with_forward_sample(graph, node, site, draws[key][0], cache)
            else:
                rewrite_with_backward_sample(graph, node, site, draw, cache)
        graph.eliminate_dead_code()
        return applied

    def _exact_baseline(self, graph: fx.Graph) -> Baseline:
        """The best exact partition: under the compile's memory budget, with the partitioner's
        recomputation bans lifted where torch's budget solver returns its default partition
        (it does when the parameters outweigh the activations).  Recomputing exactly is the
        first tool for bytes; the planner measures sampling against this, not against
        Inductor's default."""
        p = self.partitioner
        if p is None or p.budget >= 1.0:
            return Baseline(partition_saved(graph, self.static_input_indices))
        inductor = self._inductor_partition(graph)
        inductor_roots = plan_memory.saved_roots(inductor)
        baseline = partition_saved(graph, self.static_input_indices)
        self.report.measurements["exact_budget"] = baseline.activation_bytes
        if baseline.activation_bytes >= inductor.activation_bytes and not p.relaxed:
            p.relax_bans()
            relaxed = partition_saved(graph, self.static_input_indices)
            self.report.measurements["exact_relaxed_bans"] = relaxed.activation_bytes
            if relaxed.activation_bytes < baseline.activation_bytes:
                self.report.partitioner_note = (
                    f"torch's activation_memory_budget={p.budget:g} returned the default partition "
                    f"(the parameters outweigh the activations); recomputation bans lifted instead"
                )
                return Baseline(relaxed, inductor_roots)
            p.restore_bans()
        return Baseline(baseline, inductor_roots)

    def _partition_settings(self, graph: fx.Graph, inductor: Optional[SavedSet], resolved: Resolved) -> Baseline:
        """Stage 3 when every candidate draws in backward.  One op per draw leaves the
        forward, and what it saves, as they are: the best exact partition is the one
        AOTAutograd runs next on this graph, and the backend reads its figures off the
        compiled graphs (:func:`complete_from_compiled`) instead of a trial partition here
        (two to four min-cuts of the whole graph: a third of the pass's time on 12-layer
        BERT-base).  Traced reads of X (``recompute_draw_inputs``, ``inline_draws``) let the
        partitioner recompute X instead: then the exact partition is measured (one min-cut).

        Left to decide first: the partitioner's settings.  Where torch's budget solver would
        return the default partition (the parameters outweigh the activations) the
        recomputation bans are lifted, as :meth:`_exact_baseline` does after measuring; here
        it is told from Inductor's default partition (``inductor``: measured before an exact
        live-rows rewrite, which only makes the last layer save less) by the solver's own rule
        (``torch_internals.budget_solver_gives_up``)."""
        p = self.partitioner
        measure = self.config.recompute_draw_inputs or self.config.inline_draws
        if p is None or p.budget >= 1.0:
            if not measure:
                return Baseline(None)
            return Baseline(partition_saved(graph, self.static_input_indices))
        if inductor is None:
            inductor = self._inductor_partition(graph)
        if not p.relaxed and budget_solver_gives_up(saved_value_bytes(inductor), input_bytes(graph)):
            p.relax_bans()
            self.report.partitioner_note = (
                f"torch's activation_memory_budget={p.budget:g} would return the default partition "
                f"(the parameters outweigh the activations); recomputation bans lifted instead"
            )
        roots = plan_memory.saved_roots(inductor)
        if resolved.live:  # partitioned before the live-rows rewrite: activations only live-rows
            # ops read leave the saved set by that rewrite, not by recomputation
            root = {s.node: s.x_root for s in resolved.sites}
            roots -= {root[n] for n in resolved.live} - {root[n] for n in root if n not in resolved.live}
        if not measure:
            return Baseline(None, roots)
        baseline = partition_saved(graph, self.static_input_indices)
        self.report.measurements["exact_relaxed_bans" if p.relaxed else "exact_budget"] = baseline.activation_bytes
        return Baseline(baseline, roots)

    def _inductor_partition(self, graph: fx.Graph) -> SavedSet:
        """Plain torch.compile's partition of ``graph``: the min-cut partitioner without the
        compile's memory budget.  Its bytes and FLOPs become the report's "Inductor" figures,
        unless an earlier call measured them on the graph before an exact live-rows rewrite
        (those are plain torch.compile's, the rewritten graph's are not)."""
        p = self.partitioner
        with p.unbudgeted() if p is not None else contextlib.nullcontext():
            saved = partition_saved(graph, self.static_input_indices)
        self.report.measurements.setdefault("inductor", saved.activation_bytes)
        self.report.flops.setdefault("inductor", fw_bw_flops(saved))
        return saved

    @staticmethod
    def _recomputed_inputs(sites, baseline: Baseline) -> Set[str]:
        """Sites whose activation Inductor's default partition saves and the exact budgeted
        partition recomputes instead (no sampling needed for those bytes)."""
        inductor = baseline.inductor_roots
        if not inductor or baseline.saved is None:  # None: complete_from_compiled tells
            return set()
        exact = plan_memory.saved_roots(baseline.saved)
        return {s.node for s in sites if s.x_root in inductor - exact}

    def _record(self, site: MatmulSite, resolved: Resolved, outcome: Outcome) -> OpRecord:
        """Stage 6: the site's report record."""
        s = resolved.settings[site.node]
        skipped, decisions, shared = resolved.skipped, outcome.decisions, outcome.applied.shared
        # Records are plain data: a symbolic N (dynamic shapes) is reported at its traced size
        # (the expression goes in the reason), never as a SymInt that outlives the compile.
        n = site.n if site.n > 0 else traced_size(site.x_shape[0]) if site.x_shape else -1
        k = s.k_for(n) if n > 0 else -1
        before = site.x_bytes(n)
        flops_before = site.weight_grad_flops(n)
        live = resolved.live.get(site.node)
        if live is not None:
            decision, measured = plan_memory.LIVE_ROWS, None
            reason = f"{live.describe()} (the graph scatters its gradient into zeros): reads those rows, exactly"
            k = live.count
        elif site.node in skipped:
            decision, reason, measured = "exact", skipped[site.node], None
        else:
            d = decisions[site.node]
            decision, reason, measured = d.decision, d.reason, d.measured_saving
        # Bytes after: with a planner measurement, the op's share of the bytes its class
        # removed from the partitioned graph; for forced forward sampling, the sample the
        # partitioner saved (nothing when it moved the draw into backward).
        after = before
        if decision == plan_memory.MEMORY:
            in_backward = site.node in outcome.drawn_in_backward
            if in_backward:
                reason += "; the partitioner runs this draw in backward from tensors it saves anyway"
            if measured is not None:
                after = max(0, before - measured)
            elif not in_backward:
                # per batch entry (bmm): k rows, k int64 indices, k float32 weights
                after = 0 if site.node in shared or k < 0 else site.x_bytes(k) + site.batch * k * (8 + 4)
        elif live is not None:  # X's live rows, a copy the partitioner saves unless X is kept anyway
            after = site.x_bytes(live.count)
        if site.node in resolved.notes:
            reason += f"; {resolved.notes[site.node]}"
        padding = _padding_note(outcome.applied.padding.get(site.node))
        if padding and decision == plan_memory.MEMORY:
            reason += f"; padding prior: {padding}"
        sampled = decision in (plan_memory.MEMORY, plan_memory.COMPUTE, plan_memory.LIVE_ROWS) and 0 < k < n
        flops_after = site.weight_grad_flops(k) if sampled and flops_before else flops_before
        recomputed = site.node in outcome.recomputed
        if recomputed and decision != plan_memory.MEMORY:
            reason += RECOMPUTED_NOTE
        if site.dynamic_n and decision != "exact":
            reason += (
                f"; N = {site.x_shape[0]} is symbolic (bytes and k at the traced N = {n}): "
                f"k = min(N, max(ceil(ratio * N), min_k)) follows it at run time"
            )
        return OpRecord(
            module=site.fqn,
            module_type=_type_name(site.module_types),
            op=site.kind,
            node=site.node,
            shapes={"x": [traced_size(d) for d in site.x_shape], "grad": [traced_size(d) for d in site.g_shape]},
            dtype=str(site.dtype).replace("torch.", ""),
            ratio=s.ratio,
            k=k,
            decision=decision,
            reason=reason,
            saved_bytes_before=before,
            saved_bytes_after=after,
            measured_saving=measured,
            rules=list(s.rules),
            annotation=dict(s.annotation),
            shared_draw_with=shared.get(site.node),
            grad_norm_feedback=site.node in outcome.applied.feedback_sites,
            padding_mask=padding,
            sample=outcome.applied.rows.get(site.node),
            recomputed=recomputed,
            input_node=site.x_root,
            input_saved_by_inductor=site.x_root in outcome.inductor_roots,
            flops_before=flops_before,
            flops_after=flops_after,
        )
