"""What Inductor compiles for one Dynamo graph, recorded from its ``inner_compile`` hook.

``compile_fx`` calls ``inner_compile`` once for the forward (or inference) graph and, for a
training graph, once for the backward, possibly much later (on the first backward call).
:class:`CompiledGraphs` keeps both graph modules, their matmul FLOPs, the activations the
backward reads from the forward and the seconds Inductor spent on each; a callback sees each
graph as it arrives.  The backend fills its :class:`~wtacrs_compile.report.CompileReport`
from it, and the inspector's plain-Inductor baseline (also the benchmarks') is the same
recorder around plain ``compile_fx``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch.fx as fx

from .graph_utils import SavedSet, graph_flops, saved_set
from .torch_internals import compile_fx, compile_fx_inner, dtype_rules_built_once

FORWARD, BACKWARD, INFERENCE = "forward", "backward", "inference"


@dataclass
class CompiledGraphs:
    modules: Dict[str, fx.GraphModule] = field(default_factory=dict, repr=False)  # by kind
    flops: Dict[str, int] = field(default_factory=dict)  # FORWARD / BACKWARD: matmul-class FLOPs
    saved: Optional[SavedSet] = None  # what the backward reads from the forward, once it compiled
    # Inductor's seconds per graph ("inductor_forward", "inductor_backward"); give a dict to
    # accumulate into (the report's compile_seconds)
    seconds: Dict[str, float] = field(default_factory=dict)

    def inner_compile(self, on_graph: Optional[Callable[[str, "CompiledGraphs"], None]] = None):
        """An ``inner_compile`` for ``compile_fx`` that records each graph, calls
        ``on_graph(kind, self)`` and compiles it with Inductor's ``compile_fx_inner``."""

        def inner(graph_module: fx.GraphModule, inputs: Any, **kw: Any):
            kind = BACKWARD if kw.get("is_backward") else INFERENCE if kw.get("is_inference") else FORWARD
            stage = "inductor_backward" if kind == BACKWARD else "inductor_forward"
            start = time.perf_counter()
            try:
                self.modules[kind] = graph_module
                if kind != INFERENCE:
                    self.flops[kind] = graph_flops(graph_module)
                if kind == BACKWARD and FORWARD in self.modules:
                    self.saved = saved_set(self.modules[FORWARD], graph_module)
                if on_graph is not None:
                    on_graph(kind, self)
                with dtype_rules_built_once():  # a torch compile-time fix, see there
                    return compile_fx_inner(graph_module, inputs, **kw)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        return inner


def recording_compile_fx(gm: fx.GraphModule, example_inputs: Any, record: CompiledGraphs,
                         on_graph: Optional[Callable[[str, CompiledGraphs], None]] = None, **kwargs: Any):
    """``compile_fx`` (plain Inductor, or with ``config_patches``) recording into ``record``."""
    return compile_fx(gm, example_inputs, inner_compile=record.inner_compile(on_graph), **kwargs)
