"""The backward draws' own random stream.

Backward draws (the default) take their noise from a generator this module owns, one per
device, never from torch's global generator.  Turning the backend on therefore leaves
torch's generator where plain ``torch.compile`` leaves it: a ``DataLoader``'s shuffling, any
initialisation and the dropout masks' seeds see the same random numbers with and without it
(the masks themselves too with ``rng="philox"``; the default ``"auto"`` hashes those seeds on
the CPU, :mod:`wtacrs_compile.passes.hash_rng`), so paired runs share everything but the
estimate and the mask function (the comparison the accuracy benchmarks make).

Seeding: the stream is seeded from ``torch.initial_seed()`` (mixed, so that it is not the
global stream's own sequence) the first time it draws, and again whenever
``torch.initial_seed()`` has changed since, so ``torch.manual_seed(s)`` makes the draws
reproducible as it does everything else.  :func:`manual_seed` restarts it explicitly (for
example between two runs in one process that both call ``torch.manual_seed(s)`` with the same
``s``); :func:`fork` saves and restores it around code that must leave it as it was (the
inspector's trial step).

In a graph the noise is one op, ``wtacrs::uniform``, tagged ``nondeterministic_seeded``: the
partitioner and FX's CSE/DCE treat it as random (never merged, never removed).  Backward draws
(``mode="compute"``, the default) use it.  Forward draws cannot: their noise must be replayed
in backward if the partitioner recomputes the draw there, and AOTAutograd's replay
(``functionalize_rng_ops``) restores torch's generators only, so they draw from torch's
generator (``torch_internals.replayable_uniform``) and a run with forward draws does advance it.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: the draws' seed is not the global seed itself

_streams: Dict[torch.device, torch.Generator] = {}
_seeded_from: Dict[torch.device, Tuple[int, int]] = {}  # device -> (seed, torch.initial_seed() then)
_explicit: Optional[Tuple[int, int]] = None  # (seed, torch.initial_seed() at the call)


def _device(device: torch.device) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    return device


def _seed() -> int:
    base = torch.initial_seed()
    if _explicit is not None and _explicit[1] == base:
        return _explicit[0]
    return (base * _MIX + 1) % (1 << 63)


def generator(device: torch.device) -> torch.Generator:
    """The draws' generator on ``device``, (re)seeded as the module docstring says."""
    device = _device(device)
    key = (_seed(), torch.initial_seed())
    gen = _streams.get(device)
    if gen is None or _seeded_from.get(device) != key:
        gen = torch.Generator(device=device)
        gen.manual_seed((key[0] + (device.index or 0)) % (1 << 63))
        _streams[device] = gen
        _seeded_from[device] = key
    return gen


def manual_seed(seed: int) -> None:
    """Restart the draws' stream on every device from ``seed`` (until the next
    ``torch.manual_seed``, which the stream follows again)."""
    global _explicit
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"wtacrs: manual_seed takes an int, got {type(seed).__name__}")
    _explicit = (seed % (1 << 63), torch.initial_seed())
    _streams.clear()
    _seeded_from.clear()


def get_state() -> Dict[str, object]:
    """A copy of the stream's state (generator states per device and how they were seeded)."""
    return {
        "explicit": _explicit,
        "streams": {dev: (gen.get_state(), _seeded_from[dev]) for dev, gen in _streams.items()},
    }


def set_state(state: Dict[str, object]) -> None:
    global _explicit
    _explicit = state["explicit"]  # type: ignore[assignment]
    _streams.clear()
    _seeded_from.clear()
    for dev, (gen_state, seeded_from) in state["streams"].items():  # type: ignore[union-attr]
        gen = torch.Generator(device=dev)
        gen.set_state(gen_state)
        _streams[dev] = gen
        _seeded_from[dev] = seeded_from


@contextlib.contextmanager
def fork() -> Iterator[None]:
    """Leave the draws' stream as it was on entry, whatever runs inside."""
    state = get_state()
    try:
        yield
    finally:
        set_state(state)


def noise_shape(like: torch.Tensor, per_row: bool) -> Tuple[int, ...]:
    """The shape of a draw's noise: ``like``'s, or one number per leading index (``per_row``)."""
    return (*like.shape[:-1], 1) if per_row else tuple(like.shape)


@torch.library.custom_op("wtacrs::uniform", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _uniform(like: torch.Tensor, per_row: bool) -> torch.Tensor:
    return torch.rand(noise_shape(like, per_row), generator=generator(like.device), device=like.device, dtype=torch.float32)


@_uniform.register_fake
def _(like, per_row):
    return like.new_empty(noise_shape(like, per_row), dtype=torch.float32)


def uniform(like: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Float32 noise, uniform on [0, 1) in steps of 2**-24, from the draws' stream, on
    ``like``'s device: ``like``'s shape, or one number per leading index with ``per_row``.
    Traced, it is one ``wtacrs::uniform`` node that reads ``like`` (so it runs where ``like``
    is computed: in backward for backward draws)."""
    return torch.ops.wtacrs.uniform(like.detach(), per_row)
