"""Deterministic bucket sampler: (seed, step, model rank) -> row ids, a pure function.

One epoch, for a global batch of G = batch_size x model ranks rows:

1. every bucket's training rows are permuted by a generator seeded from (seed, epoch, bucket) and cut
   into consecutive global batches of G rows;
2. the epoch's batches are ordered by a seeded uniform permutation of the multiset of their bucket
   labels. Reading that order left to right draws each next bucket with probability (its batches
   left) / (all batches left): buckets are drawn in proportion to the rows they have left;
3. step s is batch `s mod steps_per_epoch` of epoch `s div steps_per_epoch`; model rank r gets slice
   r of its global batch. Every model rank therefore trains on the same bucket in a step, and a
   resume needs nothing but the step.

Rows that do not fill a whole global batch (a bucket smaller than G, or the tail of a larger one)
follow `small_buckets`: 'drop' leaves them out of this epoch (a bucket's tail is different rows
every epoch, since its permutation changes), 'fill' completes the batch with rows of the same bucket
drawn again, so every row is seen every epoch at the cost of a few repeats.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from sd3 import salts
from sd3.config.schema import SMALL_BUCKETS
from sd3.data.schema import DataError

# Salts keep the generators of different purposes apart for the same seed.
_MASK64 = (1 << 64) - 1


def generator(seed: int, *words: int) -> np.random.Generator:
    """A PCG64 generator seeded from (seed, *words); negative seeds are folded into 64 bits."""
    return np.random.default_rng([seed & _MASK64, *(w & _MASK64 for w in words)])


class BucketSampler:
    """Row ids for every (step, model rank), computed on demand with a small per-epoch cache.

    `bucket_rows[k]` are the global row ids of bucket k (any integer array, e.g. a memory-mapped slice
    of the index); `exclude` are row ids held out of training (validation rows). Thread-safe."""

    def __init__(self, bucket_rows: Sequence[np.ndarray], *, batch_size: int, num_model_ranks: int, seed: int,
                 small_buckets: str = "drop", exclude: np.ndarray | None = None,
                 names: Sequence[str] | None = None):
        if batch_size <= 0 or num_model_ranks <= 0:
            raise ValueError(f"batch_size={batch_size} and num_model_ranks={num_model_ranks} must be > 0")
        if small_buckets not in SMALL_BUCKETS:
            raise ValueError(f"small_buckets={small_buckets!r} is not 'drop' or 'fill'")
        self.bucket_rows = list(bucket_rows)
        self.batch_size, self.num_model_ranks, self.seed = batch_size, num_model_ranks, seed
        self.global_batch = batch_size * num_model_ranks
        self.small_buckets = small_buckets
        self.names = list(names) if names is not None else [str(k) for k in range(len(self.bucket_rows))]

        # Held-out rows -> their positions inside each bucket, so training positions can skip them.
        exclude = np.unique(np.asarray(exclude if exclude is not None else [], np.int64))
        self._held: list[np.ndarray] = []
        for rows in self.bucket_rows:                             # rows ascending (the index sorts them)
            pos = np.empty(0, np.int64)
            if len(rows) and len(exclude):
                pos = np.searchsorted(rows, exclude.astype(rows.dtype))  # same dtype: no copy of `rows`
                hit = pos < len(rows)
                pos, ex = pos[hit], exclude[hit]
                pos = pos[np.asarray(rows[pos], np.int64) == ex]
            # held[i] - i = training positions before the i-th held-out row: p -> p + #(held[i] - i <= p)
            self._held.append(pos.astype(np.int64) - np.arange(len(pos)))
        self.train_counts = np.array([len(r) - len(h) for r, h in zip(self.bucket_rows, self._held)],
                                     np.int64)

        G = self.global_batch
        if small_buckets == "drop":
            self.batches = self.train_counts // G
        else:
            self.batches = -(-self.train_counts // G)             # ceil
        self.steps_per_epoch = int(self.batches.sum())
        if self.steps_per_epoch == 0:
            raise DataError(
                f"no bucket has a full global batch of {G} rows (batch_size {batch_size} x {num_model_ranks} "
                f"model ranks; largest bucket: {int(self.train_counts.max(initial=0))} rows): lower "
                "data.batch_size, or set data.small_buckets=fill to repeat rows")
        self._labels = np.repeat(np.arange(len(self.batches), dtype=np.int32), self.batches)
        self._lock = threading.Lock()
        self._plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    # -- what a run logs once at start --------------------------------------------------------------
    def report(self) -> str:
        """One sentence on what happens to rows that do not fill a global batch."""
        G, counts = self.global_batch, self.train_counts
        small = [k for k in range(len(counts)) if 0 < counts[k] < G]
        tails = int(sum(c % G for c in counts if c >= G))
        small_rows = int(sum(counts[k] for k in small))
        names = ", ".join(self.names[k] for k in small[:8]) + (" ..." if len(small) > 8 else "")
        if self.small_buckets == "drop":
            return (f"{len(small)} bucket(s) smaller than one global batch of {G} rows dropped "
                    f"({small_rows:,} rows{': ' + names if small else ''}); {tails:,} rows per epoch from "
                    "partial last batches left out (different rows each epoch)")
        repeats = int(self.batches.sum()) * G - int(counts.sum())
        listed = f" ({names})" if small else ""
        return (f"{len(small)} bucket(s) smaller than one global batch of {G} rows{listed}"
                " and the partial last batch of every bucket filled by repeating rows of the same bucket "
                f"({repeats:,} repeats per epoch)")

    # -- the pure function ----------------------------------------------------------------------------
    def bucket_of(self, step: int) -> int:
        """The bucket (index into bucket_rows) every model rank trains on at this step."""
        order, _ = self._plan(self._check(step) // self.steps_per_epoch)
        return int(order[step % self.steps_per_epoch])

    def global_rows(self, step: int) -> np.ndarray:
        """(G,) int64 row ids of the global batch of this step; model rank r owns slice r."""
        epoch, i = divmod(self._check(step), self.steps_per_epoch)
        order, ordinal = self._plan(epoch)
        k, j = int(order[i]), int(ordinal[i])
        n = int(self.train_counts[k])
        slots = np.arange(j * self.global_batch, (j + 1) * self.global_batch, dtype=np.int64)
        if self.small_buckets == "fill":
            slots %= n                                            # the wrap-around repeats rows
        return self.train_rows(k, self._perm(epoch, k)[slots])

    def train_rows(self, k: int, positions: np.ndarray) -> np.ndarray:
        """Row ids of bucket k at training positions 0 .. train_counts[k] - 1 (held-out rows skipped)."""
        positions = np.asarray(positions, np.int64)
        held = self._held[k]
        bucket_pos = positions + np.searchsorted(held, positions, side="right") if len(held) else positions
        return np.asarray(self.bucket_rows[k][bucket_pos], np.int64)

    def rows(self, step: int, rank: int) -> np.ndarray:
        """(batch_size,) int64 row ids of model rank `rank` (0 .. num_model_ranks - 1) at this step."""
        if not 0 <= rank < self.num_model_ranks:
            raise ValueError(f"model rank {rank} is outside 0..{self.num_model_ranks - 1}")
        return self.global_rows(step)[rank * self.batch_size:(rank + 1) * self.batch_size]

    # -- per-epoch state, cached ----------------------------------------------------------------------
    def _check(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step {step} is negative")
        return int(step)

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each batch of the epoch, ordinal of that batch within its bucket)."""
        with self._lock:
            if epoch in self._plans:
                self._plans.move_to_end(epoch)
                return self._plans[epoch]
        order = generator(self.seed, salts.DATA_ORDER, epoch).permutation(self._labels)
        by_bucket = np.argsort(order, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.batches)[:-1]])
        ordinal = np.empty(len(order), np.int64)
        ordinal[by_bucket] = np.arange(len(order)) - starts[order[by_bucket]]
        with self._lock:
            self._plans[epoch] = (order, ordinal)
            while len(self._plans) > 2:                          # threads may straddle one epoch boundary
                self._plans.popitem(last=False)
        return order, ordinal

    def _perm(self, epoch: int, k: int) -> np.ndarray:
        """Permutation of bucket k's training positions in this epoch."""
        key = (epoch, k)
        with self._lock:
            if key in self._perms:
                self._perms.move_to_end(key)
                return self._perms[key]
        n = int(self.train_counts[k])
        perm = generator(self.seed, salts.DATA_PERMUTE, epoch, k).permutation(n)
        perm = perm.astype(np.uint32 if n < 2**32 else np.int64)
        with self._lock:
            self._perms[key] = perm
            while len(self._perms) > 2 * max(1, len(self.bucket_rows)):  # at most ~two epochs of buckets
                self._perms.popitem(last=False)
        return perm
