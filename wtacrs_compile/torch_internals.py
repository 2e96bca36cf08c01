"""Every private or unstable torch API the backend relies on, and nothing else.

This is what breaks first on a new torch release: the rest of the package reaches torch's
compiler only through the names below, and ``tests/test_torch_internals.py`` checks each one
resolves and behaves as used, on whichever torch runs the tests (2.14.1 pinned; the GPU
machines' 2.11).

- Inductor: ``compile_fx`` / ``compile_fx_inner`` (``compiled_graphs.py`` wraps the inner
  compile to read the forward and backward graphs), ``CustomGraphPass`` (the joint pass's base,
  with ``uuid()`` for the FX graph cache), ``stable_topological_sort``, the decomposition table
  replacement subgraphs are traced with, its config (``fx_graph_cache``), and the dtype
  propagation handler its code generator rebuilds per op (``dtype_rules_built_once``).
- AOTAutograd: the min-cut partitioner (the planner partitions copies of the joint graph) and
  ``torch._functorch.config`` (``activation_memory_budget``, the recomputation bans,
  ``enable_autograd_cache``); Inductor's ``custom_partitioner_fn`` hook and its
  ``CustomPartitionerFn`` base (``passes/meet_budget.py`` partitions through it).
- FX conventions: fake tensors in ``meta["val"]`` (``detect_fake_mode``), the activation
  checkpointing tag ``meta["recompute"]`` that makes AOTAutograd replay a random op in backward,
  size hints of symbolic shapes, ``make_fx``.
- Dynamo: ``reset``, the ``_orig_mod`` of a compiled module, the static-input marker of lifted
  parameters.
- Op names of fused attention backward kernels (no ``bmm`` to sample).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._guards import detect_fake_mode
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

from .rng import noise_shape

__all__ = [
    "CustomGraphPass",
    "CustomPartitionerFn",
    "checkpoint_tag",
    "FUSED_ATTENTION_BACKWARD",
    "compile_fx",
    "compile_fx_inner",
    "decompositions",
    "detect_fake_mode",
    "dtype_rules_built_once",
    "fresh_compiles",
    "functorch_config",
    "inductor_lowers_rand_like",
    "inductor_config_fingerprint",
    "is_static_input",
    "make_fx_graph",
    "min_cut_partition",
    "never_recompute",
    "original_module",
    "partition_joint",
    "real_tensors",
    "budget_solver_gives_up",
    "replay_in_backward",
    "replayable_uniform",
    "reset_dynamo",
    "size_hint",
    "stable_topological_sort",
    "tree_leaves",
]

aten = torch.ops.aten

tree_leaves = pytree.tree_leaves


def size_hint(n: Any) -> int:
    """A symbolic size's value at trace time, without adding a guard."""
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint as hint
    except ImportError:  # torch < 2.12 (the GPU machines' 2.11)
        from torch.fx.experimental.symbolic_shapes import hint_int as hint
    return int(hint(n))


@functools.lru_cache(None)
def inductor_lowers_rand_like() -> bool:
    """Whether Inductor lowers ``aten.rand_like`` as a call of eager's generator (torch >= 2.12).
    Older Inductors (2.11) decompose it into ``aten.rand`` and lower that only through their own
    seed pass, which runs before the joint pass (an ``aten.rand`` the pass inserts fails to
    lower there)."""
    from torch._inductor.lowering import lowerings

    return aten.rand_like.default in lowerings


def replayable_uniform(like: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Float32 noise, uniform on [0, 1) in steps of 2**-24, of ``like``'s shape (one number per
    leading index with ``per_row``), from torch's global generator, for forward draws: tagged
    with :func:`replay_in_backward`, AOTAutograd replays it from the RNG state saved in forward,
    which works for torch's generators only (backward draws use the backend's own stream,
    ``rng.uniform``).  The op is one every supported Inductor lowers as a call of eager's
    generator: ``rand_like`` where it can (:func:`inductor_lowers_rand_like`), else ``randint``
    scaled."""
    shape = noise_shape(like, per_row)
    if inductor_lowers_rand_like():
        return torch.rand_like(torch.zeros(shape, dtype=torch.float32, device=like.device))
    return torch.randint(0, 1 << 24, shape, device=like.device).to(torch.float32) * (1.0 / (1 << 24))


@functools.lru_cache(None)
def decompositions() -> Dict[Any, Callable]:
    """Inductor's decomposition table, with ``rand_like`` kept whole where Inductor lowers it
    (torch >= 2.12: a fallback to eager's generator; elsewhere forward draws use ``randint``, see
    :func:`replayable_uniform`).  The noise op is random to the partitioner (never recomputed in
    backward unless tagged, see :func:`replay_in_backward`)."""
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    if inductor_lowers_rand_like():
        for op in list(table):
            if getattr(op, "overloadpacket", None) is aten.rand_like:
                del table[op]
    return table



def make_fx_graph(fn: Callable, example_vals: Sequence[Any], fake_mode) -> fx.GraphModule:
    """Trace ``fn`` over fake values into an ATen graph with :func:`decompositions`."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with fake_mode:
        return make_fx(fn, decomposition_table=decompositions(), tracing_mode="real")(*example_vals)


def partition_joint(
    gm: fx.GraphModule, num_fwd_outputs: int, static_input_indices: Optional[List[int]]
) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """AOTAutograd's min-cut partition of a joint graph module, as Inductor runs it."""
    return min_cut_partition(
        gm, None, compiler="inductor", num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_input_indices
    )


def min_cut_partition(gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """What Inductor's ``partition_fn`` calls when no ``custom_partitioner_fn`` is set, with
    the keyword arguments it passes one (``compiler``, ``num_fwd_outputs``,
    ``static_lifetime_input_indices``, ...)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)


def budget_solver_gives_up(saved_value_bytes: int, input_bytes: int) -> bool:
    """Whether torch's memory-budget solver returns the default partition of a joint graph,
    told from that partition instead of running the solver: ``choose_saved_values_set``
    (torch/_functorch/partitioners.py, 2.11 to 2.14) returns the default min-cut whenever what
    it saves (``saved_value_bytes``: every tensor the backward takes from the forward,
    parameters and views included) weighs no more than the joint graph's inputs
    (``input_bytes``: every primal, parameters included); it does when the parameters
    outweigh the activations.  The relaxed-bans test (``tests/test_default_plan.py``) checks
    this against the solver itself."""
    return saved_value_bytes <= input_bytes


def real_tensors():
    """A context in which tensor factories make real tensors, even inside a compile (whose
    fake mode is otherwise ambient): for analyses that compute on small concrete values."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def replay_in_backward(node: fx.Node) -> None:
    """Tag a random op so that, if the partitioner recomputes it in backward, AOTAutograd
    replays it under the RNG state saved in forward (``functionalize_rng_ops``) instead of
    drawing again."""
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


def checkpoint_tag(node: fx.Node) -> Optional[CheckpointPolicy]:
    """The activation-checkpointing policy a node is tagged with (``meta["recompute"]``), if any."""
    return node.meta.get("recompute")


def never_recompute(node: fx.Node) -> None:
    """Tag a node so that the partitioner never recomputes it in backward (the activation
    checkpointing policy ``MUST_SAVE``; in the min-cut partitioner a ban, not a forced save)."""
    node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def inductor_config_fingerprint() -> str:
    """Inductor's current settings as one string (its portable config: what a compile of the
    same graph reads), for keying compiled functions; empty where torch has no such dump."""
    save = getattr(inductor_config, "save_config_portable", None)
    return repr(sorted(save().items(), key=lambda kv: kv[0])) if save is not None else ""


def is_static_input(t: Any) -> bool:
    """Parameters and buffers Dynamo lifted to graph inputs: what the partitioner treats as
    free to save."""
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None


def original_module(model: Any) -> Any:
    """The module a ``torch.compile``-d wrapper holds (itself if not compiled)."""
    return getattr(model, "_orig_mod", model)


def reset_dynamo() -> None:
    torch._dynamo.reset()


@contextlib.contextmanager
def fresh_compiles() -> Iterator[None]:
    """Really compile: no Dynamo, AOTAutograd or FX graph cache may serve a graph (a hit would
    skip the joint pass and the hooks that record what was compiled)."""
    reset_dynamo()
    try:
        with functorch_config.patch(enable_autograd_cache=False), inductor_config.patch(fx_graph_cache=False):
            yield
    finally:
        reset_dynamo()


_codegen_patch_lock = threading.Lock()
_codegen_patch_depth = 0
_torch_dtype_rules_init: Optional[Callable[..., None]] = None  # torch's, while patched


@contextlib.contextmanager
def dtype_rules_built_once() -> Iterator[None]:
    """While Inductor compiles, build its dtype propagation rules once instead of per op.

    ``DtypePropagationOpsHandler`` is meant to be a singleton (``__new__`` returns one
    instance), but Python runs ``__init__`` on every construction, and Inductor's code
    generator constructs one for every op it emits: each rebuilds a rule per op name and
    checks coverage against ``dir(self)``, about a millisecond per emitted op on a 2-core CPU.
    Graphs of many pointwise ops (``passes/hash_rng.py``'s first hashed dropout masks: ~50 ops
    per mask, emitted in every kernel and kernel variant that reads the mask) spent a third of
    their compile time there.  pytorch/pytorch#192820 skips the rebuild when the registry it is built
    from (``op_dtype_propagation_rules``, the one that grows) is unchanged; this does the same
    for the duration of the ``with`` block, then restores torch's ``__init__``.  The rules
    built are torch's own, so what is compiled is unchanged (``tests/test_torch_internals.py``).
    """
    global _codegen_patch_depth, _torch_dtype_rules_init
    from torch._inductor import utils as inductor_utils
    from torch._inductor.dtype_propagation import DtypePropagationOpsHandler as handler

    with _codegen_patch_lock:
        if _codegen_patch_depth == 0:
            original = _torch_dtype_rules_init = handler.__init__

            def __init__(self) -> None:
                key = tuple(inductor_utils.op_dtype_propagation_rules.items())
                if self.__dict__.get("_wtacrs_rules_key") != key:
                    original(self)
                    self._wtacrs_rules_key = key

            handler.__init__ = __init__
        _codegen_patch_depth += 1
    try:
        yield
    finally:
        with _codegen_patch_lock:
            _codegen_patch_depth -= 1
            if _codegen_patch_depth == 0:
                handler.__init__ = _torch_dtype_rules_init
                _torch_dtype_rules_init = None


FUSED_ATTENTION_BACKWARD = frozenset(
    {
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
        "_scaled_dot_product_fused_attention_overrideable_backward",
        "_flash_attention_backward",
        "_efficient_attention_backward",
        "flex_attention_backward",
    }
)
"""Backward ops of fused attention kernels: attention products with no bmm to sample."""
