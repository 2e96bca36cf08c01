"""Draw Inductor's uniform noise (dropout masks) with a counter-based integer hash.

After Inductor's ``replace_random``, each uniform draw of the joint graph (dropout's noise,
``rand_like``) is ``prims.inductor_random(size, seed, "rand")`` of a seed looked up from the
graph's one ``inductor_seeds`` call.  Inductor generates it as Philox4x32-10 per element, in a
loop its CPU code generator does not vectorize: ~7.3 ns per element on the 2-core CPU, and
under a memory budget backward draws every dropout mask a second time from its seed instead
of saving it (``benchmarks/mask_cost.py``: 20 masks, 19.7 M elements, ~144 ms of a 1.18 s
MiniLM 32x64 step, each way).  This pass writes the same draw as integer arithmetic on an
index, which Inductor fuses into the kernel that applies the mask and vectorizes::

    before                                            after
    %seed = inductor_lookup_seed(%seeds, 3)           %seed = inductor_lookup_seed(%seeds, 3)
    %rand = inductor_random([32,64,384], %seed,       %keys = wtacrs.hash_keys(%seed)
                            "rand")                   %i    = iota(786432, int64)
                                                      %h    = mix((%i * %keys[0]) & M32 ^ %keys[1])
                                                      %rand = view((%h >> 8) * 2**-24, [32,64,384])
    %gt   = gt(%rand, 0.1)                            %gt   = gt(%rand, 0.1)

``mix`` is a 32-bit integer finaliser (xor-shift, multiply, xor-shift, multiply, xor-shift;
multipliers below 2**31 so every product fits an ``int64`` without overflow).  The keys are
two hashes of the whole seed: an odd multiplier below 2**31 and an xor key.  Multiplying the
index by a per-seed odd number (a bijection modulo 2**32) makes each seed's inputs to ``mix``
a different lattice, so two seeds are neither shifted windows of one sequence (the seed added
to the index) nor permutations of one set of numbers (the seed xor-ed into it, alone).  The
top 24 bits give a uniform on ``[0, 1)`` with the resolution of ``torch.rand``'s float32
draws.  Every output bit flips with probability 0.5 +- 0.003 when any bit of the index or of
the xor key flips (the sampling noise of the check); ``tests/test_hash_rng.py`` bounds the
mean, each bit's balance, the keep rate of a dropout mask, and the correlation of
neighbouring elements and of seeds.

Each element costs 16 ops: about half of what two keyed ``mix`` rounds cost
(commits before 2026-12-03), and Inductor's CPU code generator spends its compile time per op
emitted, in every kernel and kernel variant that reads the draw (a 2-layer probe's first step:
6.3 s against 12.6 s with two rounds, Philox 4.2 s).

``%keys`` is one opaque op, ``wtacrs::hash_keys``, so that the seed's scalar arithmetic runs
once per draw instead of being inlined into every kernel that reads the draw.

The draw is a pure function of the keys, so the partitioner saves them (16 bytes) and
recomputes the draw in backward for the cost of the hash (the mask forward applied, bit for
bit: a test), saving neither the noise nor the mask.  What changes is which numbers a given seed gives: a compiled model's dropout
masks differ from plain ``torch.compile``'s under the same ``torch.manual_seed`` (as
``torch.compile``'s already differ from eager's), and stay reproducible under it.
``rng="auto"`` (the default) hashes the draws made on the CPU, ``rng="hash"`` every draw,
``rng="philox"`` none.  Left as they are, and counted in the report: normal draws
(``"randn"``), draws of 2**32 elements or more (the index would not fit the hash's 32 bits),
draws with a symbolic size, and under ``"auto"`` draws on another device than the CPU (the
measured gain is the CPU's: Inductor's Triton Philox is vectorized, and the hash's 64-bit
integer products are not cheap on a GPU; no GPU measurement backs either choice yet).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.fx as fx

from ..graph_utils import fake_mode_of, insert_graph, is_call, trace, val

_M32 = 0xFFFFFFFF
_MULTIPLIERS = (0x2C1B3C6D, 0x297A2D39)  # odd, < 2**31: x * m < 2**63 for x < 2**32
_SHIFTS = (16, 12, 15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> _SHIFTS[0])
    x = (x * _MULTIPLIERS[0]) & _M32
    x = x ^ (x >> _SHIFTS[1])
    x = (x * _MULTIPLIERS[1]) & _M32
    return x ^ (x >> _SHIFTS[2])


@torch.library.custom_op("wtacrs::hash_keys", mutates_args=())
def hash_keys(seed: torch.Tensor) -> torch.Tensor:
    """The two 32-bit keys :func:`hash_uniform` draws with, ``(mul, xor)`` as an int64 ``(2,)``
    tensor: an odd multiplier below 2**31 and an xor key, both hashes of the whole seed.

    One opaque op on purpose: written as traced ops, this scalar arithmetic (~40 ops with
    its constants) would be inlined by Inductor into every kernel that reads the draw, and
    its CPU code generator spends about a millisecond per op per kernel variant (twice the
    compile time of a 2-layer MiniLM).  As an op it runs once per draw and each kernel loads
    two numbers."""
    seed = seed.to(torch.int64)
    lo = seed & _M32
    a = _mix(lo)
    b = _mix(((seed >> 32) & _M32) ^ a)  # depends on the whole seed
    # odd and below 2**31: idx * mul < 2**63 for idx < 2**32, and idx -> idx * mul is a
    # bijection modulo 2**32
    mul = (b >> 1) | 1
    return torch.stack([mul, _mix(b ^ lo)]).reshape(2)


@hash_keys.register_fake
def _(seed):
    return seed.new_empty((2,), dtype=torch.int64)


def hash_uniform(shape: Tuple[int, ...], seed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers on [0, 1) of ``shape``, a pure function of the int64 ``seed`` and of
    each element's flat index (see the module docstring)."""
    numel = math.prod(shape)
    idx = torch.arange(numel, dtype=torch.int64, device=seed.device)
    keys = hash_keys(seed)
    h = _mix(((idx * keys[0]) & _M32) ^ keys[1])
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).to(dtype).reshape(shape)


def _bail_out(node: fx.Node, cpu_only: bool) -> str:
    """Why a uniform draw is left to Inductor's Philox ("" when it is hashed)."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode")
    if mode != "rand":
        return f"{mode} draws (only uniform ones are hashed)"
    if cpu_only and val(node).device.type != "cpu":
        return f"{val(node).device.type} draws (rng='auto' hashes CPU draws; rng='hash' hashes all)"
    shape = val(node).shape
    if not all(isinstance(d, int) for d in shape):
        return "symbolic size"
    if math.prod(shape) >= 1 << 32:
        return "2**32 elements or more"
    return ""


def hash_uniform_draws(graph: fx.Graph, cpu_only: bool = False) -> Dict[str, int]:
    """Replace each ``inductor_random(size, seed, "rand")`` of ``graph`` (made on the CPU, with
    ``cpu_only``) by :func:`hash_uniform` of its seed.  Returns counts: ``hashed`` draws and
    their ``elements``, and one entry per reason a draw was left as it was."""
    counts: Dict[str, int] = {"hashed": 0, "elements": 0}
    target = torch.ops.prims.inductor_random.default
    nodes = [n for n in graph.nodes if is_call(n, target)]
    if not nodes:
        return counts
    fake = fake_mode_of(graph)
    cache: dict = {}
    for node in nodes:
        reason = _bail_out(node, cpu_only)
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            continue
        shape, dtype = tuple(val(node).shape), val(node).dtype
        seed = node.args[1]
        sub = trace(lambda s: hash_uniform(shape, s, dtype), [val(seed)], fake, cache, ("hash_uniform", shape, dtype))
        meta = {k: node.meta[k] for k in ("nn_module_stack", "stack_trace", "seq_nr") if k in node.meta}
        out = insert_graph(graph, sub, [seed], before=node, meta=meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        counts["hashed"] += 1
        counts["elements"] += math.prod(shape)
    return counts
