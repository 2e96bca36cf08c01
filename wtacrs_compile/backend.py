"""The ``wtacrs`` torch.compile backend: Inductor plus the WTA-CRS joint-graph pass.

``torch.compile(model, backend="wtacrs", options={...})`` reaches :func:`wtacrs` through the
``torch_dynamo_backends`` entry point; :func:`backend` builds the same thing from Python with
a :class:`~wtacrs_compile.config.WTACRSConfig` and keeps the per-graph reports on it.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence

import torch

from .compiled_graphs import BACKWARD, INFERENCE, CompiledGraphs, recording_compile_fx
from .config import WTACRSConfig
from .feedback import GradNormCache
from .passes.joint_pass import WTACRSJointPass, complete_from_compiled
from .passes.meet_budget import BudgetedPartitioner
from .plan_cache import PlanCache, compile_key
from .report import CompileReport, _log
from .torch_internals import inductor_config_fingerprint, is_static_input


class WTACRSBackend:
    """A Dynamo backend: ``torch.compile(model, backend=WTACRSBackend(config))``.

    Every graph it compiles appends a :class:`CompileReport` to :attr:`reports`.
    """

    def __init__(self, config: Optional[WTACRSConfig] = None, **overrides: Any) -> None:
        if config is None:
            config = WTACRSConfig.from_options(overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, WTACRSConfig):
            raise TypeError(f"wtacrs: config must be a WTACRSConfig, got {type(config).__name__}")
        self.config = config
        self.reports: List[CompileReport] = []
        self.feedback = GradNormCache()  # used when config.grad_norm_feedback
        # the pass's partitions of each joint graph, for recompiles of the same graph
        self.plans = PlanCache()
        # compiled functions (and their reports) by compile_key, for recompiles of the same
        # Dynamo graph under the same settings
        self.compiled = PlanCache()

    def example_ids(self, ids):
        """``with backend.example_ids(batch_ids): loss = model(batch)``: the ids of the batch's
        examples (first dimension), for ``grad_norm_feedback``; see :mod:`.feedback`."""
        return self.feedback.example_ids(ids)

    def __repr__(self) -> str:
        return f"WTACRSBackend({self.config!r})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
        options = kwargs.pop("options", None)
        mode = kwargs.pop("mode", None)
        if kwargs:
            raise TypeError(f"wtacrs backend: unexpected arguments {sorted(kwargs)}")
        if mode not in (None, "default"):
            raise ValueError(
                f"wtacrs backend: mode={mode!r} is not supported; pass the backend's settings "
                f"with options={{...}} (valid keys: ratio, min_k, deterministic, mode, rules, ...)"
            )
        config = self.config if options is None else _merge(self.config, options)

        report = CompileReport(config=config.to_dict())
        # AOTAutograd inputs are the Dynamo graph's inputs in order: primals_1..n.  Dynamo
        # inlines nn.Modules and lifts their parameters and buffers to inputs, marked static.
        static = tuple(i for i, t in enumerate(example_inputs) if is_static_input(t))
        joint_pass = WTACRSJointPass.for_compile(
            config, static, report, feedback=self.feedback if config.grad_norm_feedback else None,
            graph_tag=len(self.reports), plans=self.plans,
            input_names=tuple(n.name for n in gm.graph.nodes if n.op == "placeholder"),
        )
        # The partitioner's settings (memory budget) hold for the whole compile: the planner's
        # trial partitions and AOTAutograd's real one run under the same ones.
        partitioner = joint_pass.partitioner

        # A recompile of the same graph under the same settings (a guard on Python state
        # failed, the graph did not change) gets the function compiled before.  Not with
        # gradient-norm feedback: its ops hold the backend's own cache.
        key = None if config.grad_norm_feedback else compile_key(
            gm, example_inputs, [joint_pass.uuid(), partitioner.key(), inductor_config_fingerprint()])
        hit = self.compiled.get(key) if key is not None else None
        if hit is not None:
            fn, earlier = hit
            report = earlier.served_again()
            self.reports.append(report)
            _log(report)
            return fn
        self.reports.append(report)
        _log(report)

        compiled = CompiledGraphs(seconds=report.compile_seconds)

        def on_graph(kind: str, graphs: CompiledGraphs) -> None:
            if kind == INFERENCE:
                return
            module = graphs.modules[kind]
            setattr(report, f"{kind}_graph", str(module.graph))
            report.graph_modules[kind] = module
            report.flops.setdefault("compiled", {})[kind] = graphs.flops[kind]
            if kind == BACKWARD and graphs.saved is not None:
                # what the pass left to this compile instead of a trial partition (backward
                # draws only) is read off the compiled graphs
                complete_from_compiled(report, graphs.saved, report.flops["compiled"])

        # The AOTAutograd cache would skip the joint pass on a hit and leave no report (the
        # settings turn it off); the FX graph cache (forward and backward code) stays on and is
        # keyed by the pass's uuid().
        patches = {"joint_custom_post_pass": joint_pass}
        if partitioner.target is not None:  # memory_budget holds for the counted bytes
            patches["custom_partitioner_fn"] = BudgetedPartitioner(partitioner, report)
        start = time.perf_counter()
        try:
            with partitioner.active():
                fn = recording_compile_fx(gm, example_inputs, compiled, on_graph, config_patches=patches)
            if key is not None:
                self.compiled.put(key, (fn, report))
            return fn
        finally:
            # The backward may compile later (lazily, on the first backward call): its
            # Inductor time is added to compile_seconds then, not to "backend".
            report.compile_seconds["backend"] = time.perf_counter() - start


def _merge(config: WTACRSConfig, options: Any) -> WTACRSConfig:
    if isinstance(options, WTACRSConfig):
        return options
    WTACRSConfig.from_options(options)  # validates keys and values with the full message
    return config.replace(**dict(options))


def backend(config: Optional[WTACRSConfig] = None, **overrides: Any) -> WTACRSBackend:
    """``torch.compile(model, backend=wtacrs_compile.backend(ratio=0.3))``."""
    return WTACRSBackend(config, **overrides)


def compile_module(module: torch.nn.Module, config: Optional[WTACRSConfig] = None, **options: Any) -> WTACRSBackend:
    """Compile ``module`` in place (``module.compile(backend=...)``) and return the backend,
    whose ``reports`` fill as graphs compile.

    The way in for code that owns the training loop and takes the module as it is, such as
    Hugging Face's ``Trainer``::

        backend = wtacrs_compile.compile_module(model, ratio=0.3)
        Trainer(model=model, args=TrainingArguments(...)).train()   # no torch_compile=True
        backend.reports[0].ops

    (``TrainingArguments(torch_compile_backend="wtacrs")`` cannot work: accelerate accepts only
    the names of its own ``DynamoBackend`` list; a ``torch.compile``-d wrapper passed as the
    model hides the forward signature the Trainer reads to keep dataset columns.)
    """
    b = WTACRSBackend(config, **options)
    module.compile(backend=b)
    return b


_SHARED_PLANS = PlanCache()
"""The plan cache of ``backend="wtacrs"`` given by name: each compile gets a fresh backend, and
a recompile of the same graph (keyed by its structure, the settings and the config) reuses
the pass's partitions."""

_SHARED_COMPILED = PlanCache()
"""The same for whole compiled functions (``WTACRSBackend.compiled``)."""


def wtacrs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """Entry point of ``backend="wtacrs"``: a fresh backend per compile, options from kwargs."""
    b = WTACRSBackend()
    b.plans, b.compiled = _SHARED_PLANS, _SHARED_COMPILED
    return b(gm, example_inputs, **kwargs)
