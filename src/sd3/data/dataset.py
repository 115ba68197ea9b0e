"""BucketDataset: what a loader rank asks for a step, and gets back as decoded images and captions.

    ds = BucketDataset(cfg.data, seed=cfg.train.seed, num_model_ranks=M, max_res=cfg.model.max_res,
                       multiple=cfg.pixel_multiple)
    print(ds.describe())
    raw = ds.load(step, model_ranks=[0, 1, 2])     # rows of those model ranks, in that order

Opening checks everything cheap before any heavy work: the index exists and matches the shards in
the folder, buckets fit this resolution and patch grid, there is at least one full global batch.
`load` is a pure function of (seed, step, model ranks), thread-safe, and never raises for bad rows:
an undecodable image, or a row of a shard that became unreadable, is counted and replaced by another
row of the same bucket chosen from (seed, step, slot), so a batch is always full.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sd3 import salts
from sd3.config import DataConfig
from sd3.data.buckets import bucket_problem, format_bucket
from sd3.data.images import (
    ImageError,
    decode_jpegs_on_device,
    decode_rgb,
    fit_to_bucket,
    gpu_decodable,
    to_model_range,
)
from sd3.data.index import BucketIndex, default_index_path, open_index
from sd3.data.reader import ShardReader
from sd3.data.sampler import BucketSampler, generator
from sd3.data.schema import READ_COLUMNS, DataError
from sd3.paths import resolve

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 4000
"""Longer captions are cut: the text encoders read 77 tokens (a few hundred characters), and a 100 KB
caption would only cost tokenizer time."""
REPLACE_ATTEMPTS = 16
"""Rows tried in turn to replace one bad row before the batch repeats one of its good samples."""
DEVICE_DECODE = ("cuda",)
"""Device types whose JPEGs `load` decodes on the device in one batched call (nvjpeg). Tests add 'cpu',
where torchvision's batched decode runs the same path."""


@dataclass
class RawBatch:
    """Decoded rows of one bucket: what a loader encodes next."""

    images: Tensor
    """(B, 3, H, W) float32 in [-1, 1] (uint8 0..255 when loaded with dtype=torch.uint8), on the device
    `load` was given (CPU by default)."""
    captions: list[str]
    """B captions (recaption or recaption_short, chosen per sample; '' when a row has neither)."""
    rows: np.ndarray
    """(B,) int64 global row ids, after replacement of bad rows."""
    step: int
    """The global micro-step (-1 for held-out validation batches)."""
    bucket: tuple[int, int]
    """(W, H) of every image in the batch."""
    stats: dict[str, int]
    """Counters for this batch: corrupt, unreadable, replaced, duplicated, resized, caption_fallback,
    empty_caption, caption_truncated, gpu_decoded."""

    @property
    def size(self) -> int:
        return len(self.captions)


class BucketDataset:
    def __init__(self, cfg: DataConfig, *, seed: int, num_model_ranks: int, max_res: int, multiple: int):
        self.cfg, self.seed, self.num_model_ranks = cfg, seed, num_model_ranks
        self.max_res, self.multiple = max_res, multiple
        self.data_dir = resolve(cfg.dataset)
        index_path = resolve(cfg.index) if cfg.index else default_index_path(self.data_dir)
        if not self.data_dir.is_dir():
            raise DataError(f"data.dataset={cfg.dataset!r} is not a folder ({self.data_dir}): make it with "
                            "data/import_images.py and data/create_phase.py (the demo photos: "
                            "--data.create_demo=true builds them under data/demo/)")
        self.index: BucketIndex = open_index(index_path, self.data_dir)
        if self.index.num_rows == 0:
            raise DataError(f"data.dataset={cfg.dataset!r} is empty: its index lists 0 rows in "
                            f"{len(self.index.shards)} shard(s); fill it with data/create_phase.py, then rerun "
                            "src/create_indices.py")

        # Buckets this resolution and patch grid can train on; the rest are reported, not used.
        self.kept: list[int] = []
        self.excluded: dict[str, str] = {}
        for k, size in enumerate(self.index.buckets):
            problem = bucket_problem(size, max_res=max_res, multiple=multiple)
            if problem is None and self.index.counts[k] > 0:
                self.kept.append(k)
            elif problem is not None:
                self.excluded[self.index.bucket_names[k]] = problem
        if not self.kept:
            raise DataError(f"{self.data_dir}: no bucket fits max_res={max_res} with sides a multiple of "
                            f"{multiple} (buckets: {', '.join(self.index.bucket_names) or 'none'}); run "
                            f"data/create_phase.py --max-res {max_res} --patch {multiple} on the raw shards")
        self.holdout = self._choose_holdout(cfg.val_rows)
        self.sampler = BucketSampler(
            [self.index.bucket_rows(k) for k in self.kept], batch_size=cfg.batch_size,
            num_model_ranks=num_model_ranks, seed=seed, small_buckets=cfg.small_buckets, exclude=self.holdout,
            names=[self.index.bucket_names[k] for k in self.kept])
        self.reader = ShardReader(self.data_dir, self.index)
        self._lock = threading.Lock()
        self._totals: Counter = Counter()
        self._warned: set[str] = set()

    # -- what the loader asks ----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Global micro-steps in one epoch."""
        return self.sampler.steps_per_epoch

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def bucket_of(self, step: int) -> tuple[int, int]:
        """(W, H) of the bucket every model rank trains on at this step."""
        return self.index.buckets[self.kept[self.sampler.bucket_of(step)]]

    def rows_of(self, step: int, model_ranks: Sequence[int] | None = None) -> np.ndarray:
        """(B,) int64 row ids the sampler gives these model ranks at this step (before any replacement)."""
        return self.sampler.global_rows(step)[self._slots(model_ranks)]

    def load(self, step: int, model_ranks: Sequence[int] | None = None, *,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> RawBatch:
        """Decoded rows of these model ranks (default: all) at this step, concatenated in that order.

        With a CUDA `device` (and data.gpu_decode), JPEGs are decoded there in one batched call and the
        images come back on that device. dtype=torch.uint8 skips the conversion to [-1, 1] (4x less to
        move to a GPU; convert there with `sd3.data.images.to_model_range`)."""
        slots = self._slots(model_ranks)
        k = self.sampler.bucket_of(step)
        rows = self.sampler.global_rows(step)[slots]
        u = generator(self.seed, salts.CAPTION_CHOICE, step).random(self.sampler.global_batch)[slots]
        return self._decode(rows, u, step=step, k=k, replace_keys=slots, device=device, dtype=dtype)

    def holdout_batches(self, batch_size: int, *, device: torch.device | str | None = None,
                        rows: np.ndarray | None = None, dtype: torch.dtype = torch.float32) -> list[RawBatch]:
        """The held-out rows (data.val_rows), decoded, in batches of at most batch_size rows that each lie
        within one bucket; always the same batches for the same seed. Undecodable held-out rows are left
        out (counted in stats), so a batch may be smaller. `rows` keeps only these held-out rows (each with
        the caption it has in the full set); dtype=torch.uint8 skips the conversion to [-1, 1]."""
        if len(self.holdout) == 0:
            return []
        u_all = generator(self.seed, salts.HOLDOUT_CAPTIONS).random(len(self.holdout))
        pick = np.ones(len(self.holdout), bool) if rows is None else np.isin(self.holdout, rows)
        return self._bucket_batches(self.holdout[pick], u_all[pick], batch_size, device=device, dtype=dtype)

    def usable_rows(self) -> np.ndarray:
        """Every row id of the buckets this run trains on (training and held-out rows), sorted."""
        return np.sort(np.concatenate([np.asarray(self.index.bucket_rows(k), np.int64) for k in self.kept]))

    def row_batches(self, rows: np.ndarray, batch_size: int, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> list[RawBatch]:
        """Any of `usable_rows()`, decoded as the held-out rows are (`holdout_batches`): grouped by bucket,
        undecodable rows left out; each row's caption is chosen from (seed, row id)."""
        rows = np.unique(np.asarray(rows, np.int64))
        u = np.array([generator(self.seed, salts.ROW_CAPTION, int(r)).random() for r in rows])
        return self._bucket_batches(rows, u, batch_size, device=device, dtype=dtype)

    def totals(self) -> dict[str, int]:
        """Counters summed over every batch loaded so far (all threads)."""
        with self._lock:
            return dict(self._totals)

    def describe(self) -> str:
        """One paragraph for the start-of-run log."""
        idx, s = self.index, self.sampler
        kept_rows = int(sum(idx.counts[k] for k in self.kept))
        buckets = ", ".join(f"{idx.bucket_names[k]}: {int(idx.counts[k]):,}"
                            for k in sorted(self.kept, key=lambda k: -idx.counts[k]))
        text = (f"dataset {self.data_dir} (index {idx.path}): {kept_rows:,} rows in {len(self.kept)} "
                f"buckets [{buckets}] from {len(idx.shards)} shards. Global batch {s.global_batch} = "
                f"{self.cfg.batch_size} per model rank x {self.num_model_ranks} model ranks, "
                f"{s.steps_per_epoch:,} steps per epoch, every model rank on the same bucket each step. "
                f"Small buckets ({self.cfg.small_buckets}): {s.report()}.")
        if self.excluded:
            n = int(sum(idx.counts[idx.bucket_names.index(b)] for b in self.excluded))
            why = ", ".join(f"{b} ({reason})" for b, reason in self.excluded.items())
            text += (f" Excluded {n:,} rows in {len(self.excluded)} buckets that do not fit "
                     f"max_res={self.max_res} / multiple {self.multiple}: {why}.")
        if idx.skipped_rows:
            text += f" {idx.skipped_rows:,} rows had no valid bucket_size when indexed and are not used."
        if len(self.holdout):
            text += f" {len(self.holdout):,} rows held out for validation."
        return text

    # -- internals ------------------------------------------------------------------------------------------
    def _slots(self, model_ranks: Sequence[int] | None) -> np.ndarray:
        """Positions in the global batch of these model ranks' samples."""
        ranks = range(self.num_model_ranks) if model_ranks is None else list(model_ranks)
        bs = self.cfg.batch_size
        for r in ranks:
            if not 0 <= r < self.num_model_ranks:
                raise ValueError(f"model rank index {r} is outside 0..{self.num_model_ranks - 1}")
        return np.concatenate([np.arange(r * bs, (r + 1) * bs) for r in ranks]).astype(np.int64)

    def _bucket_batches(self, rows: np.ndarray, u: np.ndarray, batch_size: int, *,
                        device: torch.device | str | None, dtype: torch.dtype) -> list[RawBatch]:
        """Sorted `rows` (with their caption draws `u`) decoded in batches of one bucket each, bucket by
        bucket; rows outside the usable buckets are ignored."""
        batches = []
        for k_kept, k in enumerate(self.kept):
            mine = np.flatnonzero(np.isin(rows, self.index.bucket_rows(k)))
            for start in range(0, len(mine), batch_size):
                part = mine[start:start + batch_size]
                batches.append(self._decode(rows[part], u[part], step=-1, k=k_kept, replace_keys=None,
                                            device=device, dtype=dtype))
        return [b for b in batches if b.size]

    def _choose_holdout(self, n: int) -> np.ndarray:
        """n row ids drawn uniformly from the usable buckets with the run's seed (sorted)."""
        if n <= 0:
            return np.empty(0, np.int64)
        counts = np.array([self.index.counts[k] for k in self.kept], np.int64)
        total = int(counts.sum())
        if n >= total:
            raise DataError(f"data.val_rows={n} leaves no training rows (the usable buckets hold {total:,}); "
                            "lower data.val_rows")
        flat = np.sort(generator(self.seed, salts.HOLDOUT_ROWS).choice(total, size=n, replace=False))
        starts = np.concatenate([[0], np.cumsum(counts)])
        which = np.searchsorted(starts, flat, side="right") - 1
        rows = [np.asarray(self.index.bucket_rows(self.kept[b])[flat[which == b] - starts[b]], np.int64)
                for b in np.unique(which)]
        return np.sort(np.concatenate(rows))

    def _decode(self, rows: np.ndarray, u: np.ndarray, *, step: int, k: int, replace_keys: np.ndarray | None,
                device: torch.device | str | None, dtype: torch.dtype = torch.float32) -> RawBatch:
        """Read, decode and caption these rows of bucket k (kept index). replace_keys: one stable key per
        sample that seeds its replacement; None means bad rows are dropped instead of replaced."""
        bucket = self.index.buckets[self.kept[k]]
        stats: Counter = Counter()
        got = self.reader.read(rows, READ_COLUMNS)
        self._warn_shards(got.errors)
        stats["unreadable"] += int(got.failed.sum())
        datas = got.columns["image"]
        use_gpu = device is not None and torch.device(device).type in DEVICE_DECODE and self.cfg.gpu_decode
        images: list[Tensor | None] = [None] * len(rows)
        if use_gpu:
            on_gpu = [i for i, d in enumerate(datas) if gpu_decodable(d)]
            for i, img in zip(on_gpu, decode_jpegs_on_device([datas[i] for i in on_gpu], device)):
                images[i] = img
                stats["gpu_decoded"] += img is not None
        out_rows = rows.copy()
        longs, shorts = got.columns["recaption"], got.columns["recaption_short"]
        keep = np.ones(len(rows), bool)
        for i in range(len(rows)):
            if images[i] is None and not got.failed[i]:
                images[i] = self._try_decode(datas[i], stats)
            if images[i] is None:
                replacement = (None if replace_keys is None
                               else self._replace(k, step, int(replace_keys[i]), stats))
                if replacement is None:
                    keep[i] = False
                    continue
                out_rows[i], images[i], longs[i], shorts[i] = replacement
                stats["replaced"] += 1
        if replace_keys is not None and not keep.all():
            good = np.flatnonzero(keep)
            if len(good) == 0:
                raise DataError(f"step {step}: no row of bucket {format_bucket(*bucket)} could be decoded, "
                                f"even after {REPLACE_ATTEMPTS} replacements per row; check its shards (e.g. "
                                f"{', '.join(list(got.errors)[:3]) or 'see the warnings above'})")
            for i in np.flatnonzero(~keep):                  # last resort: repeat a good sample of this batch
                j = int(good[i % len(good)])
                out_rows[i], images[i], longs[i], shorts[i] = out_rows[j], images[j], longs[j], shorts[j]
                stats["duplicated"] += 1
            keep[:] = True
        captions = []
        target = torch.device(device) if device is not None else torch.device("cpu")
        fitted = []
        for i in np.flatnonzero(keep):
            img, resized = fit_to_bucket(images[i], bucket)
            stats["resized"] += resized
            fitted.append(img.to(target, non_blocking=True))
            captions.append(self._caption(longs[i], shorts[i], float(u[i]), stats))
        W, H = bucket
        stacked = torch.stack(fitted) if fitted else torch.empty(0, 3, H, W, dtype=torch.uint8, device=target)
        stats = {name: int(n) for name, n in stats.items() if n}
        with self._lock:
            self._totals.update(stats)
        images = stacked if dtype == torch.uint8 else to_model_range(stacked)
        return RawBatch(images=images, captions=captions, rows=out_rows[keep], step=step,
                        bucket=bucket, stats=stats)

    def _try_decode(self, data: bytes | None, stats: Counter) -> Tensor | None:
        try:
            return decode_rgb(data)                          # (3, h, w) uint8
        except ImageError:
            stats["corrupt"] += 1
            return None

    def _replace(self, k: int, step: int, key: int, stats: Counter) -> tuple[int, Tensor, str, str] | None:
        """Another training row of bucket k that decodes, drawn from (seed, step, key)."""
        rng = generator(self.seed, salts.ROW_REPLACE, step, key)
        n = int(self.sampler.train_counts[k])
        for _ in range(REPLACE_ATTEMPTS):
            row = int(self.sampler.train_rows(k, rng.integers(0, n, size=1))[0])
            got = self.reader.read(np.array([row]), READ_COLUMNS)
            self._warn_shards(got.errors)
            if got.failed[0]:
                stats["unreadable"] += 1
                continue
            img = self._try_decode(got.columns["image"][0], stats)
            if img is not None:
                return row, img, got.columns["recaption"][0], got.columns["recaption_short"][0]
        return None

    def _caption(self, long: str | None, short: str | None, u: float, stats: Counter) -> str:
        """recaption_short with probability short_caption_prob, else recaption; the other when empty."""
        first, second = (short, long) if u < self.cfg.short_caption_prob else (long, short)
        if first and first.strip():
            text = first
        elif second and second.strip():
            text = second
            stats["caption_fallback"] += 1
        else:
            stats["empty_caption"] += 1
            return ""
        if len(text) > MAX_CAPTION_CHARS:
            stats["caption_truncated"] += 1
            text = text[:MAX_CAPTION_CHARS]
        return text.strip()

    def _warn_shards(self, errors: dict[str, str]) -> None:
        for shard, reason in errors.items():
            with self._lock:
                if shard in self._warned:
                    continue
                self._warned.add(shard)
            log.warning("data: shard %s could not be read (%s); its rows are replaced by other rows of the "
                        "same bucket. Rebuild the shard and rerun src/create_indices.py.", shard, reason)
