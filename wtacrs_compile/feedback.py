"""Gradient-norm feedback (opt-in): the paper's probabilities ``p_i ∝ ||x_i|| * ||g_i||`` for
the forward draw, with ``||g_i||`` cached from the previous step of the same example.

Design
------
In the forward pass ``g`` is unknown; the paper reuses the gradient-row norms the same
training example had the last time it was seen.  The compiled graphs cannot take new inputs
from a joint-graph pass, so the cache is reached through two opaque custom ops:

* ``wtacrs::gnorm_read(scores, key, positions)`` in the forward draw: the cached ``||g_i||``
  of the rows of the current batch, float32, shape ``(N,)``;
* ``wtacrs::gnorm_write(g_norms, key, readers, positions)`` in backward, next to each
  estimate that reads the draw: stores ``||g_i||`` for the same rows.  Its output, one zero
  the compiler cannot fold, is added to the estimate so that the call is never dead code.

``key`` names a :class:`GradNormCache` (kept by its backend, found through a weak registry)
and the sampled site.  Rows map to examples by the ids the user gives for the batch::

    b = wtacrs_compile.backend(ratio=0.3, grad_norm_feedback=True)
    model = torch.compile(model, backend=b)
    with b.example_ids(batch["idx"]):          # one id per example (first dim of the batch)
        loss = model(**batch).loss
    loss.backward()

A site's ``N`` rows are ``B`` examples times ``S`` positions (``N = B * S``): row ``r`` is
position ``r % S`` of example ``ids[r // S]``.  An attention ``bmm`` draw's rows are its
``(batch x head, n)`` rows flattened: ``S = heads * n`` per example.  The cache holds one
float16 per (example, position, draw): 2 bytes, grown on demand.

A draw several sites read (Q, K and V share their input's draw) serves several products
``G_s^T X`` at once; the draw that minimises their summed variance has
``p_i ∝ ||x_i|| * sqrt(sum_s ||g_i^s||^2)``.  Each reader writes its own ``||g_i^s||``
(``readers`` of them per backward): the cache adds the squares and stores the root once the
last reader has written.

Without example ids the cache still learns: it keeps a running per-position estimate (the
mean of ``||g_i||`` over the batch's examples at each of the ``S`` positions, averaged over
steps with weight ``POSITION_DECAY`` on the past), so a draw sees from the second step on
which positions carry gradient (``[CLS]``, the short sentences' tokens) and which mostly do
not (the padded tail).  ``S`` comes from the site's shape (``positions``); a site whose rows
do not split into positions (``positions=0``) reads ones: the plain ``||x_i||`` draw.

Correctness never rests on the cache.  Any ``p`` with ``p_i > 0`` where ``x_i g_i^T != 0`` is
unbiased, so every cached norm gets a tenth of the batch's mean added (a defensive mixture:
a row whose gradient was ~0 last step and is not now keeps a fair chance, and its weight
stays bounded), rows never seen take the mean, and before anything is cached (or when ``N``
does not split into the ids or the positions) the read returns ones: the plain ``||x_i||``
draw.  A wrong or stale cache costs variance, never bias.  Writes pair with the ids of the
forward pass that read the cache (a FIFO per site, so gradient accumulation's
forward-forward-backward-backward orders work).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import weakref
from typing import Deque, Dict, Optional, Tuple

import torch

DEFENSIVE = 0.1  # p ∝ ||x_i|| (ĝ_i + DEFENSIVE * mean ĝ): p_i > 0, weights at most ~1/DEFENSIVE x the plain draw's
POSITION_DECAY = 0.9  # without ids: the per-position estimate's weight on the steps before
_QUEUE = 64  # pending forward reads per site without a backward (eval with grad on): capped

_CACHES: "weakref.WeakValueDictionary[str, GradNormCache]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


class GradNormCache:
    """Per-example (or, without ids, per-position) gradient-row norms of every sampled site
    of one backend."""

    def __init__(self) -> None:
        self.name = f"c{next(_IDS)}"
        _CACHES[self.name] = self
        self._ids: Optional[torch.Tensor] = None
        self._norms: Dict[str, torch.Tensor] = {}  # site -> (num_ids, S) float16, NaN = unseen
        self._positions: Dict[str, torch.Tensor] = {}  # site -> (S,) float32, without ids
        self._pending: Dict[str, Deque[Optional[torch.Tensor]]] = {}
        self._partial: Dict[str, Tuple[int, torch.Tensor]] = {}  # site -> (writes, sum of squares)

    def key(self, site: str) -> str:
        return f"{self.name}|{site}"

    @contextlib.contextmanager
    def example_ids(self, ids):
        """Set the example ids of the batch the next forward passes run on."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"wtacrs: example_ids must be a 1-D integer tensor, one id per example; got "
                f"shape {tuple(ids.shape)} {ids.dtype}"
            )
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("wtacrs: example_ids must be non-negative")
        before, self._ids = self._ids, ids.detach().to("cpu", torch.int64)
        try:
            yield self
        finally:
            self._ids = before

    def _rows(self, n: int, ids: Optional[torch.Tensor]):
        if ids is None or ids.numel() == 0 or n % ids.numel():
            return None
        return n // ids.numel()

    def read(self, site: str, n: int, device, positions: int = 0) -> torch.Tensor:
        """Scores ``(n,)`` to multiply ``||x_i||`` by: cached norms plus the defensive share,
        or ones where nothing applies."""
        ids = self._ids
        queue = self._pending.setdefault(site, collections.deque(maxlen=_QUEUE))
        queue.append(ids)
        ones = torch.ones(n, dtype=torch.float32, device=device)
        if ids is None:
            table = self._positions.get(site)
            if table is None or positions <= 0 or n % positions or table.numel() != positions:
                return ones
            mean = table.mean().clamp_min(torch.finfo(torch.float32).tiny)
            return (table + DEFENSIVE * mean).repeat(n // positions).to(device)
        s = self._rows(n, ids)
        table = self._norms.get(site)
        if s is None or table is None:
            return ones
        vals = torch.full((ids.numel(), s), float("nan"))
        known = ids < table.shape[0]
        width = min(s, table.shape[1])
        vals[known, :width] = table[ids[known], :width].float()
        seen = ~torch.isnan(vals)
        if not bool(seen.any()):
            return ones
        mean = vals[seen].mean().clamp_min(torch.finfo(torch.float32).tiny)
        vals = torch.where(seen, vals, mean) + DEFENSIVE * mean
        return vals.reshape(n).to(device)

    def write(self, site: str, gnorms: torch.Tensor, readers: int = 1, positions: int = 0) -> None:
        """Store this step's ``||g_i||`` of a draw's rows; a draw ``readers`` sites read
        stores ``sqrt(sum_s ||g_i^s||^2)`` once the last of them has written."""
        gnorms = gnorms.detach().float().cpu()
        if readers > 1:
            count, squares = self._partial.pop(site, (0, torch.zeros_like(gnorms)))
            count, squares = count + 1, squares + gnorms**2
            if count < readers:
                self._partial[site] = (count, squares)
                return
            gnorms = squares.sqrt()
        queue = self._pending.get(site)
        ids = queue.popleft() if queue else None
        if ids is None:
            self._write_positions(site, gnorms, positions)
            return
        s = self._rows(gnorms.numel(), ids)
        if s is None:
            return
        table = self._norms.get(site)
        need_rows, need_cols = int(ids.max()) + 1, s
        if table is None or table.shape[0] < need_rows or table.shape[1] < need_cols:
            rows = max(need_rows, 0 if table is None else table.shape[0])
            cols = max(need_cols, 0 if table is None else table.shape[1])
            grown = torch.full((rows, cols), float("nan"), dtype=torch.float16)
            if table is not None:
                grown[: table.shape[0], : table.shape[1]] = table
            table = self._norms[site] = grown
        table[ids, :s] = gnorms.reshape(-1, s).clamp_max(6e4).half()

    def _write_positions(self, site: str, gnorms: torch.Tensor, positions: int) -> None:
        if positions <= 0 or gnorms.numel() % positions:
            return
        step = gnorms.reshape(-1, positions).mean(0)
        before = self._positions.get(site)
        if before is None or before.numel() != positions:
            self._positions[site] = step
        else:
            self._positions[site] = POSITION_DECAY * before + (1 - POSITION_DECAY) * step

    def nbytes(self) -> int:
        tables = list(self._norms.values()) + list(self._positions.values())
        return sum(t.numel() * t.element_size() for t in tables)


def _lookup(key: str):
    name, site = key.split("|", 1)
    return _CACHES.get(name), site


@torch.library.custom_op("wtacrs::gnorm_read", mutates_args=())
def gnorm_read(scores: torch.Tensor, key: str, positions: int) -> torch.Tensor:
    """The cached factors for a draw's N rows, given its flat ``||x_i||`` scores (only their
    length and device are read; ``positions``: rows per example, 0 unknown)."""
    cache, site = _lookup(key)
    if cache is None:
        return torch.ones(scores.shape[0], dtype=torch.float32, device=scores.device)
    return cache.read(site, scores.shape[0], scores.device, positions)


@gnorm_read.register_fake
def _(scores, key, positions):
    return scores.new_empty((scores.shape[0],), dtype=torch.float32)


@torch.library.custom_op("wtacrs::gnorm_write", mutates_args=())
def gnorm_write(gnorms: torch.Tensor, key: str, readers: int, positions: int) -> torch.Tensor:
    """Store one reader's ``||g_i||`` (``readers``: sites sharing the draw)."""
    cache, site = _lookup(key)
    if cache is not None:
        cache.write(site, gnorms, readers, positions)
    return gnorms.new_zeros((1,))


@gnorm_write.register_fake
def _(gnorms, key, readers, positions):
    return gnorms.new_empty((1,))
