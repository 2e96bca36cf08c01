"""Configuration of the ``wtacrs`` backend.

A :class:`WTACRSConfig` is frozen and validated on construction, so a config that exists is a
config that is valid.  It is built either in Python or from the plain-data ``options`` dict
that ``torch.compile(model, backend="wtacrs", options={...})`` passes through::

    WTACRSConfig(ratio=0.3, rules=(Rule(match="classifier", enabled=False),))
    WTACRSConfig.from_options({"ratio": 0.3, "rules": [{"match": "classifier", "enabled": False}]})

Per-op settings come from :meth:`WTACRSConfig.resolve`: the global settings, then every rule
that selects the op, in order, the last match winning field by field.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

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

DeterministicT = Union[str, float]


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


def _check_mode(value: Any, where: str) -> str:
    if value not in MODES:
        _fail(f"{where}mode must be one of {', '.join(map(repr, MODES))}; got {value!r}")
    return value


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Rule:
    """Select ops and override their settings.

    Selectors (all given ones must match; a rule with none matches every op):
      * ``match``: module FQN glob (``encoder.layer.[0-5].*``) or regex with a ``re:`` prefix;
      * ``module_type``: a module class, or its name (``"Linear"``, ``"nn.Linear"``,
        ``"torch.nn.Linear"``); subclasses match;
      * ``op``: one of ``linear``, ``bmm``, ``lora``.
    Settings (``None`` keeps what earlier rules or the global config said): ``ratio``,
    ``min_k``, ``mode``, ``deterministic``, ``enabled``.
    """

    match: Optional[str] = None
    module_type: Optional[Union[str, type]] = None
    op: Optional[str] = None
    ratio: Optional[float] = None
    min_k: Optional[int] = None
    mode: Optional[str] = None
    deterministic: Optional[DeterministicT] = None
    enabled: Optional[bool] = None

    def __post_init__(self) -> None:
        where = f"rule {self.describe()}: "
        if self.match is not None:
            if not isinstance(self.match, str) or not self.match:
                _fail(f"{where}match must be a non-empty FQN glob or 're:<regex>' string")
            if self.match.startswith("re:"):
                try:
                    re.compile(self.match[3:])
                except re.error as e:
                    _fail(f"{where}invalid regex {self.match[3:]!r}: {e}")
        if self.module_type is not None and not isinstance(self.module_type, (str, type)):
            _fail(f"{where}module_type must be a class or a class name, got {self.module_type!r}")
        if self.op is not None and self.op not in OP_KINDS:
            _fail(f"{where}op must be one of {', '.join(map(repr, OP_KINDS))}; got {self.op!r}")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _check_ratio(self.ratio, where))
        if self.min_k is not None:
            _check_min_k(self.min_k, where)
        if self.mode is not None:
            _check_mode(self.mode, where)
        if self.deterministic is not None:
            object.__setattr__(self, "deterministic", _check_deterministic(self.deterministic, where))
        if self.enabled is not None and not isinstance(self.enabled, bool):
            _fail(f"{where}enabled must be true or false, got {self.enabled!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Rule":
        if not isinstance(data, Mapping):
            _fail(f"each rule must be a dict, got {data!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                _fail(f"unknown rule key {key!r}{_suggest(key, valid)}; valid keys: {', '.join(valid)}")
        return cls(**dict(data))

    def describe(self) -> str:
        parts = [
            f"{k}={v.__name__ if isinstance(v, type) else v!r}"
            for k, v in dataclasses.asdict(self).items()
            if v is not None
        ]
        return "Rule(" + ", ".join(parts) + ")"

    def matches(self, fqn: str, module_types: Sequence[type], op: str) -> bool:
        if self.op is not None and self.op != op and not (self.op == "linear" and op == "lora"):
            return False
        if self.match is not None:
            if self.match.startswith("re:"):
                if re.fullmatch(self.match[3:], fqn) is None:
                    return False
            elif not fnmatch.fnmatchcase(fqn, self.match):
                return False
        if self.module_type is not None and not any(
            _type_matches(self.module_type, t) for t in module_types
        ):
            return False
        return True

    def has_selector(self) -> bool:
        return any(v is not None for v in (self.match, self.module_type, self.op))

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.module_type, type):
            d["module_type"] = f"{self.module_type.__module__}.{self.module_type.__qualname__}"
        return d


def _type_matches(selector: Union[str, type], module_type: type) -> bool:
    mro = getattr(module_type, "__mro__", (module_type,))
    if isinstance(selector, type):
        return selector in mro
    for cls in mro:
        names = {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
        if cls.__module__.startswith("torch.nn"):
            names |= {f"nn.{cls.__name__}", f"torch.nn.{cls.__name__}"}
        if selector in names:
            return True
    return False


DEFAULT_EXACT_MODULES = ("classifier", "*.classifier", "lm_head", "*.lm_head", "head", "*.head",
                         "score", "*.score", "qa_outputs", "*.qa_outputs")
"""Output heads stay exact unless a rule enables them: their gradient is the one the task
signal enters through, and their input is small.  Embeddings need no rule: an embedding's
backward has no matmul to sample."""


@dataclass(frozen=True)
class OpSettings:
    """The settings one op resolved to."""

    enabled: bool
    ratio: float
    min_k: int
    mode: str
    deterministic: DeterministicT
    rules: tuple  # indices into WTACRSConfig.rules of the rules that matched, in order
    reason: str = ""  # why disabled, when it is

    def k_for(self, n: int) -> int:
        """``k = min(N, max(ceil(ratio * N), min_k))``."""
        return min(n, max(math.ceil(self.ratio * n - 1e-9), self.min_k))


@dataclass(frozen=True)
class WTACRSConfig:
    """Settings of the ``wtacrs`` backend.

    ratio: fraction of rows (tokens) kept for a weight gradient, in (0, 1]. At 1.0 the pass
        rewrites nothing and gradients equal plain ``torch.compile``'s.
    min_k: the least number of rows kept, whatever the ratio.
    deterministic: ``"adaptive"`` (the paper: winner count minimising ``(1-P_C)/(k-c)``), a
        fixed fraction of k in [0, 1), or 0 for plain column-row sampling.
    mode: see :data:`MODES`.
    rules: per-op overrides, see :class:`Rule`; applied in order, last match wins.
    keep_heads_exact: ops of modules named like an output head (:data:`DEFAULT_EXACT_MODULES`)
        stay exact unless a rule enables them.
    ops: which op kinds the backend matches at all.
    pack_masks: store the boolean masks saved for backward (ReLU, dropout) as packed bits;
        lossless, 8x smaller.
    """

    ratio: float = 0.3
    min_k: int = 1
    deterministic: DeterministicT = "adaptive"
    mode: str = "memory"
    rules: tuple = ()
    keep_heads_exact: bool = True
    ops: tuple = ("linear", "bmm")
    pack_masks: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _check_ratio(self.ratio, ""))
        _check_min_k(self.min_k, "")
        object.__setattr__(self, "deterministic", _check_deterministic(self.deterministic, ""))
        _check_mode(self.mode, "")
        rules = self.rules
        if isinstance(rules, (Rule, Mapping)) or not isinstance(rules, (list, tuple)):
            _fail(f"rules must be a list of rules, got {rules!r}")
        object.__setattr__(
            self, "rules", tuple(r if isinstance(r, Rule) else Rule.from_dict(r) for r in rules)
        )
        for flag in ("keep_heads_exact", "pack_masks"):
            if not isinstance(getattr(self, flag), bool):
                _fail(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        for op in ops:
            if op not in ("linear", "bmm"):
                _fail(f"ops entries must be 'linear' or 'bmm', got {op!r}")
        object.__setattr__(self, "ops", ops)

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

    def resolve(self, fqn: str, module_types: Sequence[type], op: str) -> OpSettings:
        settings = {
            "enabled": True,
            "ratio": self.ratio,
            "min_k": self.min_k,
            "mode": self.mode,
            "deterministic": self.deterministic,
        }
        reason = ""
        if op not in self.ops and not (op == "lora" and "linear" in self.ops):
            settings["enabled"] = False
            reason = f"op kind {op!r} not in config.ops"
        elif self.keep_heads_exact and any(fnmatch.fnmatchcase(fqn, p) for p in DEFAULT_EXACT_MODULES):
            settings["enabled"] = False
            reason = "output head: exact by default (keep_heads_exact=True)"
        matched = []
        for i, rule in enumerate(self.rules):
            if not rule.matches(fqn, module_types, op):
                continue
            matched.append(i)
            for name in settings:
                value = getattr(rule, name)
                if value is not None:
                    settings[name] = value
            if rule.enabled is False:
                reason = f"disabled by rule {i}: {rule.describe()}"
            elif rule.enabled is True:
                reason = ""
        if settings["enabled"]:
            reason = ""
        return OpSettings(rules=tuple(matched), reason=reason, **settings)
