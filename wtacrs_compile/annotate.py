"""In-code per-op settings: mark a region or a module instead of writing a rule.

    with wtacrs_compile.annotate(ratio=0.5):          # inside a forward: the ops traced here
        h = self.block(h)

    @wtacrs_compile.annotate(enabled=False)           # a function or method: its ops
    def attention_output(self, h): ...

    wtacrs_compile.annotate_module(model.bert.encoder.layer[0], ratio=0.5)   # no source edit
    wtacrs_compile.annotate_module(model.classifier, enabled=False)

Built on ``torch.fx.traceback.annotate``, which Dynamo runs while tracing (no graph break):
every node traced in the region carries ``meta["custom"]["wtacrs.<setting>"]``, and
AOTAutograd copies it to the backward nodes of the joint graph, so the joint pass reads it
from the weight-gradient matmul itself (or, on a torch that does not copy it, from the
forward node of the same autograd op: same ``seq_nr``).

Nested regions merge setting by setting, the innermost winning.  Annotations apply after the
config's rules (see :mod:`wtacrs_compile.config`): an annotation is the most specific thing
a user can say about an op.  Annotating a module is equivalent to the rule
``{"match": "<its FQN>", ...}``: both select the ops traced inside the module.  Each op's
:class:`~wtacrs_compile.report.OpRecord` lists the annotation that applied (``annotation``).

Outside ``torch.compile`` an annotation does nothing but validate its values.
"""

from __future__ import annotations

import ast
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .config import SETTINGS, DeterministicT, _fail, check_settings

PREFIX = "wtacrs."
"""Key prefix in ``node.meta["custom"]``: one key per setting, so nested regions merge.
Values are stored as their ``repr``: Dynamo keeps strings constant, whereas a float or int
module attribute that changes between compiles becomes symbolic (automatic dynamic) and can
no longer be passed to ``torch.fx.traceback.annotate``."""


def _custom(settings: Dict[str, Any], where: str) -> Dict[str, str]:
    checked = check_settings(settings, where)
    if not checked:
        _fail(f"{where}sets nothing: give at least one of {', '.join(SETTINGS)}")
    return {PREFIX + name: repr(value) for name, value in checked.items()}


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _fx_annotate():
    fn = getattr(getattr(fx, "traceback", None), "annotate", None)
    if fn is None:  # pragma: no cover - torch without fx.traceback.annotate
        raise RuntimeError(
            f"wtacrs_compile.annotate needs torch.fx.traceback.annotate, which torch "
            f"{torch.__version__} lacks: use a config rule instead"
        )
    return fn


def annotate(
    *,
    ratio: Optional[float] = None,
    min_k: Optional[int] = None,
    mode: Optional[str] = None,
    deterministic: Optional[DeterministicT] = None,
    sampling: Optional[str] = None,
    enabled: Optional[bool] = None,
):
    """Per-op settings for the ops traced inside a region: a context manager and a decorator.

    Takes the settings a :class:`~wtacrs_compile.config.Rule` takes (``ratio``, ``min_k``,
    ``mode``, ``deterministic``, ``sampling``, ``enabled``); an invalid value raises naming the valid range.
    """
    settings = {
        "ratio": ratio,
        "min_k": min_k,
        "mode": mode,
        "deterministic": deterministic,
        "sampling": sampling,
        "enabled": enabled,
    }
    return _fx_annotate()(_custom(settings, "annotate: "))


def _annotated_forward(self, *args: Any, **kwargs: Any) -> Any:
    inner = self._wtacrs_inner_forward
    with _fx_annotate()(self._wtacrs_annotation):
        if inner is None:
            return type(self).forward(self, *args, **kwargs)
        return inner(*args, **kwargs)


def annotate_module(module: torch.nn.Module, **settings: Any) -> torch.nn.Module:
    """Apply :func:`annotate` to every op traced in ``module``'s forward, its submodules
    included, without editing the model's source.  Returns ``module``.

    Only this instance is touched (its ``forward`` attribute, a method bound to it, so
    ``copy.deepcopy`` keeps working); the class is not.  Calling it again replaces the
    settings; :func:`unannotate_module` removes them.  Recompilation follows: Dynamo guards
    on the annotation.
    """
    if not isinstance(module, torch.nn.Module):
        _fail(f"annotate_module: expected an nn.Module, got {type(module).__name__}")
    custom = _custom(settings, f"annotate_module({type(module).__name__}): ")
    if "_wtacrs_annotation" not in module.__dict__:
        module.__dict__["_wtacrs_inner_forward"] = module.__dict__.get("forward")
    module.__dict__["_wtacrs_annotation"] = custom
    module.__dict__["forward"] = types.MethodType(_annotated_forward, module)
    return module


def unannotate_module(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`annotate_module`."""
    if "_wtacrs_annotation" in module.__dict__:
        inner = module.__dict__.pop("_wtacrs_inner_forward")
        del module.__dict__["_wtacrs_annotation"]
        if inner is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = inner
    return module


# --------------------------------------------------------------------------------------
# The joint-graph side.


def node_annotation(node: fx.Node) -> Dict[str, Any]:
    """The wtacrs settings in a node's ``meta["custom"]`` (empty if none)."""
    custom = node.meta.get("custom") or {}
    return {k[len(PREFIX):]: _decode(v) for k, v in custom.items() if isinstance(k, str) and k.startswith(PREFIX)}


def site_context(graph: fx.Graph, sites: Sequence[Any]) -> Dict[str, Tuple[Tuple[type, ...], Dict[str, Any]]]:
    """For each matched site (a :class:`~wtacrs_compile.passes.match_matmuls.MatmulSite`), by
    its node name: the types of its module and of the modules enclosing it (innermost first),
    and its annotation.  Both are read from the backward matmul, or, where it lacks them, from
    the forward nodes of the same autograd op (same ``seq_nr``)."""
    from .graph_utils import module_stack, tangent_dependent

    nodes = {n.name: n for n in graph.nodes}
    backward = tangent_dependent(graph) if sites else set()
    forward_by_seq: Dict[Any, List[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node not in backward and node.meta.get("seq_nr") is not None:
            forward_by_seq.setdefault(node.meta["seq_nr"], []).append(node)

    out = {}
    for site in sites:
        node = nodes.get(site.node)
        if node is None:
            out[site.node] = (tuple(site.module_types), {})
            continue
        forward = forward_by_seq.get(node.meta.get("seq_nr"), [])
        annotation = node_annotation(node)
        if not annotation:
            annotation = next((a for a in map(node_annotation, forward) if a), {})
        stack = module_stack(node) or next((s for s in map(module_stack, forward) if s), [])
        types_ = tuple(t for _, t in reversed(stack))
        innermost = tuple(site.module_types)
        if not types_:
            types_ = innermost
        elif innermost and innermost[0] not in types_:
            types_ = innermost + types_
        out[site.node] = (types_, annotation)
    return out
