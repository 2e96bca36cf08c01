"""Configuration of the ``wtacrs`` backend.

A :class:`WTACRSConfig` is frozen and validated on construction, so a config that exists is a
config that is valid.  It is built either in Python or from the plain-data ``options`` dict
that ``torch.compile(model, backend="wtacrs", options={...})`` passes through::

    WTACRSConfig(ratio=0.3, rules=(Rule(match="classifier", enabled=False),))
    WTACRSConfig.from_options({"ratio": 0.3, "rules": [{"match": "classifier", "enabled": False}]})

Per-op settings come from :meth:`WTACRSConfig.resolve`, in this order, later ones overriding
earlier ones field by field:

1. the global settings (``ratio``, ``min_k``, ``mode``, ``deterministic``, ``sampling``), every op enabled
   except output heads and embeddings (``keep_heads_exact``);
2. every rule that selects the op, in order (:class:`Rule`): the last match wins;
3. the in-code annotation of the region the op was traced in
   (:func:`wtacrs_compile.annotate`, :func:`wtacrs_compile.annotate_module`), innermost wins.

``config.ops`` is a hard filter on top: no rule or annotation enables an op kind it leaves out.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

MODES = ("memory", "compute", "memory+compute", "all")
"""How a selected op may be sampled.

``memory``: sample in the forward pass only where the full activation then leaves the saved
set (measured on the partitioned graph); otherwise leave the op exact.
``compute``: sample in the backward pass with the exact gradient-row norms; saves FLOPs, not
memory.
``memory+compute``: ``memory`` where it pays, ``compute`` elsewhere.
``all``: sample every selected op in the forward pass, as the paper does (for comparison).
"""

OP_KINDS = ("linear", "bmm", "lora")

SAMPLINGS = ("systematic", "iid")
"""How a draw picks its non-winner rows (:mod:`wtacrs_compile.estimator`)."""

RNGS = ("auto", "hash", "philox")
"""How the compiled graphs draw Inductor's uniform noise (dropout masks): ``hash``, integer
arithmetic on the element index that Inductor vectorizes and backward recomputes cheaply
(:mod:`wtacrs_compile.passes.hash_rng`), ``philox``, Inductor's own draws, or ``auto``, the
hash for CPU draws and Philox for the others."""

SETTINGS = ("ratio", "min_k", "mode", "deterministic", "sampling", "enabled")
"""The per-op settings a rule or an annotation may give."""

DeterministicT = Union[str, float]


class WTACRSRuleWarning(UserWarning):
    """A rule of the config selects no op of a compiled graph (a typo, most likely)."""


def _fail(msg: str) -> None:
    raise ValueError(f"wtacrs config: {msg}")


def _check_ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(f"{where}ratio must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        _fail(f"{where}ratio must be in (0, 1] (the fraction of rows kept), got {value!r}")
    return float(value)


def _check_min_k(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(f"{where}min_k must be an integer >= 1, got {value!r}")
    return int(value)


def _check_deterministic(value: Any, where: str) -> DeterministicT:
    if value == "adaptive":
        return "adaptive"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(
            f"{where}deterministic must be 'adaptive' (the paper's winner count), a fraction "
            f"of k in [0, 1) for a fixed winner count, or 0 for plain CRS; got {value!r}"
        )
    if not 0.0 <= float(value) < 1.0:
        _fail(f"{where}deterministic fraction must be in [0, 1) (0 is plain CRS), got {value!r}")
    return float(value)


def _check_sampling(value: Any, where: str) -> str:
    if value not in SAMPLINGS:
        hint = _suggest(value.lower(), SAMPLINGS) if isinstance(value, str) else ""
        _fail(
            f"{where}sampling must be 'systematic' (evenly spaced draws, the default) or 'iid' "
            f"(the paper's draws with replacement); got {value!r}{hint}"
        )
    return value


def _check_mode(value: Any, where: str) -> str:
    if value not in MODES:
        hint = _suggest(value, MODES) if isinstance(value, str) else ""
        _fail(f"{where}mode must be one of {', '.join(map(repr, MODES))}; got {value!r}{hint}")
    return value


def _check_enabled(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(f"{where}enabled must be true or false, got {value!r}")
    return value


def check_settings(values: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Validate (and normalise) per-op settings given by a rule or an annotation."""
    for key in values:
        if key not in SETTINGS:
            _fail(f"{where}unknown setting {key!r}{_suggest(str(key), SETTINGS)}; valid: {', '.join(SETTINGS)}")
    checks = {
        "ratio": _check_ratio,
        "min_k": _check_min_k,
        "mode": _check_mode,
        "deterministic": _check_deterministic,
        "sampling": _check_sampling,
        "enabled": _check_enabled,
    }
    return {k: checks[k](v, where) for k, v in values.items() if v is not None}


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def module_scope(fqn: str) -> List[str]:
    """The FQNs of an op's module and of every module enclosing it, innermost first
    (``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``; the root module's ops: ``[""]``)."""
    parts = fqn.split(".") if fqn else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] or [""]


def glob_matches(pattern: str, name: str) -> bool:
    """``fnmatch`` on the whole dotted ``name`` or on any dotted suffix of it: ``layer.0.*``
    matches ``bert.encoder.layer.0.output.dense`` (``*`` crosses dots), ``classifier`` matches
    ``classifier`` and ``model.classifier`` but not ``pre_classifier``."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


_GLOB_CHARS = re.compile(r"[*?\[\]]")


@dataclass(frozen=True)
class Rule:
    """Select ops and override their settings.

    A rule names modules and selects the ops traced inside them.  Selectors (every given one
    must hold; a rule with none selects every op):

    * ``match``: module FQN, as ``model.named_modules()`` of the compiled module names it (for
      ``BertForSequenceClassification``: ``bert.encoder.layer.0.attention.output.dense``,
      ``classifier``).  It holds when it matches the FQN of the op's module *or of any module
      enclosing it*, so ``bert.encoder.layer.3`` selects every op of that layer.

      - a glob (``fnmatch``: ``*``, ``?``, ``[0-5]``; ``*`` also crosses dots) matches the whole
        FQN or any dotted suffix of it, so names may be written relative to any submodule:
        ``classifier``, ``encoder.layer.[0-5].*`` and ``*.attention.output.*`` all select what
        they read as in a ``BertForSequenceClassification`` (``[0-5]`` is one character: layer
        ``10`` is not in it).  A suffix starts at a dot: ``classifier`` is not ``pre_classifier``.
      - ``re:<regex>``: ``re.fullmatch`` against the whole FQN, no suffix relaxation (write
        ``re:(.*\\.)?encoder\\.layer\\.([0-9]|1[01])\\..*`` for that).

    * ``module_type``: holds when the op's module or a module enclosing it is an instance of
      the class (subclasses included).  Given by name it matches the class or any base class
      named ``"Linear"``, ``"nn.Linear"``, ``"torch.nn.Linear"`` or its full dotted name
      (``"torch.nn.modules.linear.Linear"``, ``"transformers....BertSelfAttention"``).
    * ``op``: ``"linear"`` selects every linear layer's weight gradient, LoRA adapters
      included (a LoRA adapter is a linear layer); ``"lora"`` only the LoRA adapters' (modules
      named ``lora_*`` or of a ``*Lora*`` type); ``"bmm"`` the attention batched matmuls.

    Settings (``None`` keeps what the global config or earlier rules said): ``ratio``,
    ``min_k``, ``mode``, ``deterministic``, ``sampling``, ``enabled``.  Rules apply in order and each
    matching rule overrides only the settings it gives: last match wins, field by field.
    ``enabled=True`` re-enables an op the defaults keep exact (output heads, embeddings); it
    does not add op kinds that ``config.ops`` leaves out.  A rule must set at least one setting.
    In-code annotations (:func:`wtacrs_compile.annotate`) apply after all rules.
    """

    match: Optional[str] = None
    module_type: Optional[Union[str, type]] = None
    op: Optional[str] = None
    ratio: Optional[float] = None
    min_k: Optional[int] = None
    mode: Optional[str] = None
    deterministic: Optional[DeterministicT] = None
    sampling: Optional[str] = None
    enabled: Optional[bool] = None

    def __post_init__(self) -> None:
        where = f"rule {self.describe()}: "
        if self.match is not None:
            if not isinstance(self.match, str) or not self.match.strip():
                _fail(f"{where}match must be a non-empty FQN glob or 're:<regex>' string, got {self.match!r}")
            if self.match.startswith("re:"):
                try:
                    re.compile(self.match[3:])
                except re.error as e:
                    _fail(f"{where}invalid regex {self.match[3:]!r}: {e}")
        if self.module_type is not None and not (
            isinstance(self.module_type, type) or (isinstance(self.module_type, str) and self.module_type.strip())
        ):
            _fail(f"{where}module_type must be a class or a class name, got {self.module_type!r}")
        if self.op is not None and self.op not in OP_KINDS:
            hint = _suggest(self.op, OP_KINDS) if isinstance(self.op, str) else ""
            _fail(f"{where}op must be one of {', '.join(map(repr, OP_KINDS))}; got {self.op!r}{hint}")
        given = {name: getattr(self, name) for name in SETTINGS}
        for name, value in check_settings(given, where).items():
            object.__setattr__(self, name, value)
        if all(v is None for v in given.values()):
            _fail(f"{where}sets nothing: give at least one of {', '.join(SETTINGS)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Rule":
        if not isinstance(data, Mapping):
            _fail(f"each rule must be a dict, got {data!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                _fail(f"unknown rule key {key!r}{_suggest(str(key), valid)}; valid keys: {', '.join(valid)}")
        return cls(**dict(data))

    def describe(self) -> str:
        parts = [
            f"{f.name}={_type_label(v) if isinstance(v, type) else repr(v)}"
            for f in dataclasses.fields(self)
            for v in (getattr(self, f.name),)
            if v is not None
        ]
        return "Rule(" + ", ".join(parts) + ")"

    # --- selectors, one by one (the unmatched-rule warning says which one fails) ---

    def matches_fqn(self, fqn: str) -> bool:
        if self.match is None:
            return True
        if self.match.startswith("re:"):
            return any(re.fullmatch(self.match[3:], name) for name in module_scope(fqn))
        return any(glob_matches(self.match, name) for name in module_scope(fqn))

    def matches_type(self, module_types: Sequence[type]) -> bool:
        return self.module_type is None or any(_type_matches(self.module_type, t) for t in module_types)

    def matches_op(self, op: str) -> bool:
        return self.op is None or self.op == op or (self.op == "linear" and op == "lora")

    def matches(self, fqn: str, module_types: Sequence[type], op: str) -> bool:
        """Whether the rule selects an op of kind ``op`` in module ``fqn``; ``module_types``
        are the types of the op's module and of the modules enclosing it (any order)."""
        return self.matches_op(op) and self.matches_fqn(fqn) and self.matches_type(module_types)

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.module_type, type):
            d["module_type"] = f"{self.module_type.__module__}.{self.module_type.__qualname__}"
        return d


def _type_label(t: type) -> str:
    return t.__name__


def _type_names(cls: type) -> set:
    names = {cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
    if cls.__module__.startswith("torch.nn"):
        names |= {f"nn.{cls.__name__}", f"torch.nn.{cls.__name__}"}
    return names


def _type_matches(selector: Union[str, type], module_type: type) -> bool:
    mro = getattr(module_type, "__mro__", (module_type,))
    if isinstance(selector, type):
        return selector in mro
    return any(selector in _type_names(cls) for cls in mro)


DEFAULT_EXACT_HEADS = ("classifier", "pre_classifier", "lm_head", "cls", "head", "score", "qa_outputs", "pooler")
"""Output heads stay exact unless a rule or an annotation enables them: their gradient is the
one the task signal enters through, and their input is small (one row per example for a
pooled classifier or a pooler: N is the batch, so a draw saves little, is noisy, and under
dynamic shapes adds a recompile at batch 3).  Names are matched like a rule's ``match`` (any
enclosing module)."""

DEFAULT_EXACT_EMBEDDINGS = ("*embed*",)
"""Embeddings stay exact too.  ``nn.Embedding``'s backward has no matmul to sample; this also
keeps linear layers inside embedding modules (patch or token projections, ELECTRA's
``embeddings_project``) exact."""

def default_exact_reason(fqn: str) -> str:
    """Why ``keep_heads_exact`` keeps an op of module ``fqn`` exact; empty if it does not."""
    scope = module_scope(fqn)
    if any(glob_matches(p, name) for p in DEFAULT_EXACT_HEADS for name in scope):
        return "output head: exact by default (keep_heads_exact=True)"
    if any(glob_matches(p, name) for p in DEFAULT_EXACT_EMBEDDINGS for name in scope):
        return "embedding: exact by default (keep_heads_exact=True)"
    return ""


@dataclass(frozen=True)
class OpSettings:
    """The settings one op resolved to."""

    enabled: bool
    ratio: float
    min_k: int
    mode: str
    deterministic: DeterministicT
    sampling: str
    rules: tuple  # indices into WTACRSConfig.rules of the rules that matched, in order
    reason: str = ""  # why disabled, when it is
    annotation: tuple = ()  # (setting, value) pairs of the in-code annotation that applied

    def k_for(self, n: int) -> int:
        """``k = min(N, max(ceil(ratio * N), min_k))``.  For a symbolic ``N`` (a SymInt under
        dynamic shapes) the same expression as a SymInt, built without guards."""
        if isinstance(n, int):
            return min(n, max(math.ceil(self.ratio * n - 1e-9), self.min_k))
        import torch

        return torch.sym_min(n, torch.sym_max(math.ceil(self.ratio * n - 1e-9), self.min_k))


@dataclass(frozen=True)
class WTACRSConfig:
    """Settings of the ``wtacrs`` backend.

    ratio: fraction of rows (tokens) kept for a weight gradient, in (0, 1]. At 1.0 nothing is
        sampled and gradients are exact (``live_rows`` still applies: exact too).
    min_k: the least number of rows kept, whatever the ratio.
    deterministic: ``"adaptive"`` (the paper: winner count minimising ``(1-P_C)/(k-c)``), a
        fixed fraction of k in [0, 1), or 0 for plain column-row sampling.
    sampling: how the non-winner rows are drawn: ``"systematic"`` (evenly spaced targets on
        their cumulative probability, one random offset: each row is drawn within one of its
        expected count) or ``"iid"`` (the paper's draws with replacement).  Both are unbiased
        with the same weights; systematic draws have lower variance (README, "Accuracy").
    mode: see :data:`MODES`.
    rules: per-op overrides, see :class:`Rule`; applied in order, last match wins.
    keep_heads_exact: ops of output heads (:data:`DEFAULT_EXACT_HEADS`) and embeddings
        (:data:`DEFAULT_EXACT_EMBEDDINGS`) stay exact unless a rule or annotation enables them.
    ops: which op kinds the backend matches at all.  Attention ``bmm`` products are opt-in
        (``ops=("linear", "bmm")``): their draws estimate activation gradients (dQ, dK, dV),
        whose error flows into every layer below; drawn in backward they still slowed the
        quickstart's learning (step-19 loss 0.23 against exact 0.10, linear only 0.15).
    pack_masks: store the boolean masks saved for backward (ReLU, dropout) as packed bits;
        lossless, 8x smaller.  Opt-in: Inductor fuses the packing into the kernel that makes
        the mask, and for dropout masks that kernel slowed down 2.7x (MiniLM 32x64 on CPU,
        compute mode without a budget: step time 1.50x Inductor's packed, 0.92x unpacked,
        results/profile-minilm.json; for 16 MiB of 274 saved; measured with neighbouring
        bits per word, before the bit-plane layout); under the default budget the masks are
        recomputed, not saved.
    grad_norm_feedback: forward draws of linear layers use ``p ∝ ||x_i|| * ||g_i||`` with
        ``||g_i||`` cached from the same example's previous step (ids given with
        ``backend.example_ids(ids)``); see :mod:`wtacrs_compile.feedback`.
    padding_mask: forward draws (``memory``/``all`` modes) of linear layers whose N rows are
        the ``(B, L)`` positions of this graph input (integer or boolean, e.g. Hugging Face's
        ``attention_mask``) give the rows it pads probability 0; backward checks that those
        rows of the gradient are zero and raises an error naming this option if not
        (:mod:`wtacrs_compile.passes.padding_prior`).  ``None`` turns the prior off.
        Backward draws (the default ``compute`` mode) never draw zero-gradient rows anyway.
    live_rows: where the joint graph proves rows of an op's output gradient zero (a head that
        reads one token: ``[CLS]`` pooling, the last position), the op's weight gradient reads
        only the other rows, exactly, and its activation is saved for those rows only
        (decision ``live_rows``; :mod:`wtacrs_compile.passes.live_rows`).  Exact, so on by
        default and at any ratio, for every enabled op (a disabled op is left as plain
        ``torch.compile`` compiles it); ``False`` leaves such ops to the other settings.
    memory_budget: exact recomputation first: the partitioner's
        ``activation_memory_budget`` for this compile, in (0, 1] (1.0: Inductor's default
        partition; ``None``: leave torch's setting alone).  A budget the user set in
        ``torch._functorch.config`` also applies: the smaller one wins.  The backend's
        budget is a promise on the counted bytes: where torch's solver returns a cut that
        saves more than ``memory_budget`` times Inductor's default partition (its knapsack
        works on an estimate; T5-base: 0.102x at 0.1), the joint graph is partitioned again
        under a lower ``activation_memory_budget``, up to three times
        (:mod:`wtacrs_compile.passes.meet_budget`; the report's ``tightened_budget`` and
        ``partitioner_note``).  A smaller budget set in torch's config keeps torch's meaning.  Where torch's
        budget solver gives up (the parameters outweigh the activations, as for BERT-base
        at a small batch) the backend lifts the partitioner's recomputation bans instead;
        see :mod:`wtacrs_compile.passes.plan_memory`.
    min_draw_gain: a backward draw reads X and G once (row norms) and gathers k rows of each;
        where the weight-gradient FLOPs it saves per element read
        (:func:`~wtacrs_compile.passes.plan_memory.backward_draw_gain`) fall below this, the
        op stays exact instead of ``compute``, with the figure in the report.  The default 32
        is a rough break-even on the 2-core CPU profile (``results/profile-minilm.md``: the
        matmuls run at ~280 GFLOP/s, the draws' reads cost roughly 0.07-0.13 ns per element,
        20-40 FLOPs' worth); it keeps rank-8 LoRA products and small per-head ``bmm``
        products exact and samples every linear of BERT-style models.  0 samples every op.
    inline_draws: each backward draw is one op, ``wtacrs::backward_estimate`` (norms, the
        draw, gathers and the smaller matmul as eager ATen calls), and each forward draw's
        top-k-to-indices part one op, ``wtacrs::draw``; ``True`` traces them into the graph
        for Inductor to generate code for: no per-draw dispatch at run time (fewer launches
        on a GPU, not measured yet) for longer compiles (``compile_seconds`` in the reports;
        ``results/compile_time-bert-base.json``).
    recompute_draw_inputs: an op's inputs are materialized in backward, so the partitioner
        keeps a backward draw's X (a GeLU or LayerNorm output) saved where an exact weight
        gradient would let it recompute X.  ``True`` traces X's norms and k rows where X is
        worth recomputing (:func:`~wtacrs_compile.graph_utils.recomputable`: not an input, a
        matmul's or a dropout's output), G's side one ``wtacrs::gradient_draw`` op: fewer
        saved bytes (MiniLM default 0.055x of Inductor's instead of 0.079x, at the same step
        time within the noise; T5-base 0.084x instead of 0.10x at ~8 % more step time) for
        about two more Inductor kernels per draw site to compile (docs/performance.md).
    rng: ``"auto"`` (the default) draws the dropout masks made on the CPU (every
        ``inductor_random`` uniform draw) with a counter-based integer hash that Inductor
        vectorizes and fuses into the kernel that applies the mask, so that backward
        recomputes a mask for about what reading it saved would cost, and leaves other
        devices' draws to Inductor's Philox; ``"hash"`` hashes every draw, ``"philox"`` none
        (the masks plain ``torch.compile`` draws under the same seed).  Either way forward and
        backward apply the same mask.  On the CPU the hash takes the step 12-21 % below
        Philox's (MiniLM, BERT-base, T5-base) at the same accuracy (MiniLM, 3 seeds) for
        30-39 % more first-step compile time (:mod:`wtacrs_compile.passes.hash_rng`; docs/performance.md, "Hashed dropout
        masks").

    The defaults are the plan chosen from the measurements (README, "Results"): recompute
    exactly under a budget of 0.1 and sample weight gradients in backward
    (``mode="compute"``) with the exact ``||x_i|| * ||g_i||``, which pays for the
    recomputation's FLOPs without most of the accuracy cost of forward draws.
    """

    ratio: float = 0.3
    min_k: int = 1
    deterministic: DeterministicT = "adaptive"
    sampling: str = "systematic"
    mode: str = "compute"
    rules: tuple = ()
    keep_heads_exact: bool = True
    ops: tuple = ("linear",)
    pack_masks: bool = False
    grad_norm_feedback: bool = False
    padding_mask: Optional[str] = "attention_mask"
    live_rows: bool = True
    memory_budget: Optional[float] = 0.1
    min_draw_gain: float = 32.0
    inline_draws: bool = False
    recompute_draw_inputs: bool = False
    rng: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _check_ratio(self.ratio, ""))
        _check_min_k(self.min_k, "")
        object.__setattr__(self, "deterministic", _check_deterministic(self.deterministic, ""))
        _check_sampling(self.sampling, "")
        _check_mode(self.mode, "")
        rules = self.rules
        if isinstance(rules, (Rule, Mapping)) or not isinstance(rules, (list, tuple)):
            _fail(f"rules must be a list of rules, got {rules!r}")
        parsed = []
        for i, r in enumerate(rules):
            try:
                parsed.append(r if isinstance(r, Rule) else Rule.from_dict(r))
            except ValueError as e:  # say which rule of the list
                raise ValueError(str(e).replace("wtacrs config: ", f"wtacrs config: rules[{i}]: ", 1)) from None
        object.__setattr__(self, "rules", tuple(parsed))
        for flag in ("keep_heads_exact", "pack_masks", "grad_norm_feedback", "live_rows", "inline_draws",
                     "recompute_draw_inputs"):
            if not isinstance(getattr(self, flag), bool):
                _fail(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.rng not in RNGS:
            hint = _suggest(self.rng, RNGS) if isinstance(self.rng, str) else ""
            _fail(f"rng must be one of {', '.join(map(repr, RNGS))}, got {self.rng!r}{hint}")
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        for op in ops:
            if op not in ("linear", "bmm"):
                _fail(f"ops entries must be 'linear' or 'bmm', got {op!r}")
        object.__setattr__(self, "ops", ops)
        if self.memory_budget is not None:
            b = self.memory_budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < float(b) <= 1.0:
                _fail(
                    f"memory_budget must be a number in (0, 1] (the partitioner's "
                    f"activation_memory_budget; 1.0 = Inductor's default partition) or None, got {b!r}"
                )
            object.__setattr__(self, "memory_budget", float(b))
        m = self.padding_mask
        if m is not None and (not isinstance(m, str) or not m.isidentifier()):
            _fail(
                f"padding_mask must be the name of the graph input that marks padding (e.g. "
                f"'attention_mask') or None to draw without it, got {m!r}"
            )
        g = self.min_draw_gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            _fail(
                f"min_draw_gain must be a number >= 0 (weight-gradient FLOPs a backward draw must "
                f"save per element it reads; 0 samples every op), got {g!r}"
            )
        object.__setattr__(self, "min_draw_gain", float(g))

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]]) -> "WTACRSConfig":
        """Build a config from ``torch.compile(..., options=...)``; unknown keys raise."""
        if options is None:
            return cls()
        if isinstance(options, WTACRSConfig):
            return options
        if not isinstance(options, Mapping):
            _fail(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                _fail(
                    f"unknown option {key!r}{_suggest(str(key), valid)}; valid options: "
                    f"{', '.join(valid)}"
                )
        return cls(**dict(options))

    def replace(self, **changes: Any) -> "WTACRSConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rules"] = [r.key() for r in self.rules]
        d["ops"] = list(self.ops)
        return d

    def fingerprint(self) -> str:
        """A stable hash of every setting: part of the pass's ``uuid()``."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()

    def resolve(
        self,
        fqn: str,
        module_types: Sequence[type],
        op: str,
        annotation: Optional[Mapping[str, Any]] = None,
    ) -> OpSettings:
        """The settings of an op of kind ``op`` in module ``fqn``.

        ``module_types``: the types of the op's module and of the modules enclosing it.
        ``annotation``: settings from :func:`wtacrs_compile.annotate` on the op's region
        (``{"ratio": 0.5}``); they apply after the rules.
        """
        settings: Dict[str, Any] = {
            "ratio": self.ratio,
            "min_k": self.min_k,
            "mode": self.mode,
            "deterministic": self.deterministic,
            "sampling": self.sampling,
        }
        enabled: Optional[bool] = None  # None: nobody said; the defaults decide
        enabled_by = ""
        matched = []
        for i, rule in enumerate(self.rules):
            if not rule.matches(fqn, module_types, op):
                continue
            matched.append(i)
            for name in settings:
                value = getattr(rule, name)
                if value is not None:
                    settings[name] = value
            if rule.enabled is not None:
                enabled, enabled_by = rule.enabled, f"rule {i}: {rule.describe()}"
        annotated = check_settings(dict(annotation or {}), "annotation: ")
        for name, value in annotated.items():
            if name == "enabled":
                enabled, enabled_by = value, f"annotation {_describe_annotation(annotated)}"
            else:
                settings[name] = value

        reason = ""
        if op not in self.ops and not (op == "lora" and "linear" in self.ops):
            enabled, reason = False, f"op kind {op!r} not in config.ops {list(self.ops)}"
        elif enabled is None:
            reason = default_exact_reason(fqn) if self.keep_heads_exact else ""
            enabled = not reason
        elif not enabled:
            reason = f"disabled by {enabled_by}"
        return OpSettings(
            enabled=enabled,
            rules=tuple(matched),
            reason=reason,
            annotation=tuple(sorted(annotated.items())),
            **settings,
        )


def _describe_annotation(values: Mapping[str, Any]) -> str:
    return "annotate(" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"


# --------------------------------------------------------------------------------------
# Rules that select nothing: warn once, with the closest names.

_RULES_SEEN: Dict[str, set] = {}  # config fingerprint -> indices of rules matched or warned about


def reset_rule_warnings() -> None:
    """Forget which rules were warned about (each unmatched rule warns once per process)."""
    _RULES_SEEN.clear()


OpScope = Tuple[str, Sequence[type], str]  # (module FQN, types of the module and its parents, op kind)


def warn_unmatched_rules(config: WTACRSConfig, ops: Sequence[OpScope], matched: Iterable[int]) -> List[int]:
    """Warn (:class:`WTACRSRuleWarning`) about each rule of ``config`` that selects none of
    ``ops`` (the matched ops of one compiled graph; ``matched``: the rules that selected one).

    A rule warns at most once per process and config, and not after it matched an op of an
    earlier graph compiled with the same config (graph breaks split a model into several
    graphs).  A graph without matched ops (an inference or graph-break fragment) warns nothing.
    Returns the indices of the rules warned about now.
    """
    if not config.rules or not ops:
        return []
    if len(_RULES_SEEN) > 1024:
        _RULES_SEEN.clear()
    seen = _RULES_SEEN.setdefault(config.fingerprint(), set())
    seen.update(matched)
    warned = []
    for i, rule in enumerate(config.rules):
        if i in seen:
            continue
        seen.add(i)
        warned.append(i)
        warnings.warn(WTACRSRuleWarning(unmatched_rule_message(i, rule, ops)), stacklevel=2)
    return warned


def unmatched_rule_message(index: int, rule: Rule, ops: Sequence[OpScope]) -> str:
    """Why ``rule`` selects none of ``ops``, with the closest names the graph has."""
    msg = f"wtacrs: rule {index} {rule.describe()} matches no op of the compiled graph ({len(ops)} ops)"
    hints = []
    by_fqn = [o for o in ops if rule.matches_fqn(o[0])]
    by_type = [o for o in ops if rule.matches_type(o[1])]
    by_op = [o for o in ops if rule.matches_op(o[2])]
    if not by_fqn:
        fix = _fixed_pattern(rule.match, ops)
        if fix:
            hints.append(f"did you mean match={fix!r}?")
        names = sorted({n for o in ops for n in module_scope(o[0]) if n})
        close = _closest(rule.match[3:] if rule.match.startswith("re:") else rule.match, names)
        hints.append("closest module names: " + ", ".join(close))
    if not by_type:
        types = sorted({t.__name__ for o in ops for t in o[1]} - {"Module", "object"})
        selector = rule.module_type if isinstance(rule.module_type, str) else rule.module_type.__name__
        close = difflib.get_close_matches(selector.rsplit(".", 1)[-1], types, n=3, cutoff=0.0)
        hints.append(f"module_type {selector!r} is not in the graph; closest types: " + ", ".join(close))
    if not by_op:
        hints.append(f"op {rule.op!r}: the graph has only {sorted({o[2] for o in ops})}")
    if not hints:
        hints.append("each selector matches some op, but no op matches all of them")
    return msg + "; " + "; ".join(hints)


def _fixed_pattern(pattern: str, ops: Sequence[OpScope]) -> Optional[str]:
    """The glob with each literal component that no module has replaced by the closest one,
    if that selects an op (``encoder.layers.[0-5].*`` -> ``encoder.layer.[0-5].*``)."""
    if pattern.startswith("re:"):
        return None
    known = sorted({c for o in ops for c in o[0].split(".") if c})
    parts = pattern.split(".")
    fixed = []
    for part in parts:
        if part in known or _GLOB_CHARS.search(part):
            fixed.append(part)
            continue
        close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
        fixed.append(close[0] if close else part)
    candidate = ".".join(fixed)
    if candidate == pattern:
        return None
    if any(glob_matches(candidate, n) for o in ops for n in module_scope(o[0])):
        return candidate
    return None


def _closest(pattern: str, names: Sequence[str], n: int = 3) -> List[str]:
    """The ``n`` names most like ``pattern``, comparing it with every dotted suffix of each."""

    def score(name: str) -> float:
        parts = name.split(".")
        return max(
            difflib.SequenceMatcher(None, pattern, ".".join(parts[i:])).ratio() for i in range(len(parts))
        )

    scored = sorted(((score(name), name) for name in names), key=lambda t: (-t[0], len(t[1]), t[1]))
    close = [name for s, name in scored[:n] if s >= 0.6]
    return close or [name for _, name in scored[:1]]
