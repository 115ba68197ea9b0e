"""The data path: bucketed parquet shards -> bucket index -> deterministic sampler -> decoded batches.

    from sd3.data import BucketDataset, RawBatch
    ds = BucketDataset(cfg.data, seed=cfg.train.seed, num_model_ranks=M, max_res=cfg.model.max_res,
                       multiple=cfg.pixel_multiple)
    raw = ds.load(step, model_ranks=[0, 1, 2])

Names are imported on first use, so `src/create_indices.py` (which needs only `sd3.data.index`) starts
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BucketDataset": "sd3.data.dataset",
    "RawBatch": "sd3.data.dataset",
    "BucketSampler": "sd3.data.sampler",
    "BucketIndex": "sd3.data.index",
    "build_index": "sd3.data.index",
    "open_index": "sd3.data.index",
    "default_index_path": "sd3.data.index",
    "ShardReader": "sd3.data.reader",
    "DataError": "sd3.data.schema",
    "ImageError": "sd3.data.images",
    "decode_rgb": "sd3.data.images",
    "snap_size": "sd3.data.buckets",
    "parse_bucket": "sd3.data.buckets",
    "format_bucket": "sd3.data.buckets",
    "create_phase": "sd3.data.phase",
    "ensure_demo_dataset": "sd3.data.demo",
}

__all__ = [  # noqa: RUF022  (grouped like _EXPORTS)
    "BucketDataset",
    "RawBatch",
    "BucketSampler",
    "BucketIndex",
    "build_index",
    "open_index",
    "default_index_path",
    "ShardReader",
    "DataError",
    "ImageError",
    "decode_rgb",
    "snap_size",
    "parse_bucket",
    "format_bucket",
    "create_phase",
    "ensure_demo_dataset",
]

if TYPE_CHECKING:
    from sd3.data.buckets import format_bucket, parse_bucket, snap_size
    from sd3.data.dataset import BucketDataset, RawBatch
    from sd3.data.demo import ensure_demo_dataset
    from sd3.data.images import ImageError, decode_rgb
    from sd3.data.index import BucketIndex, build_index, default_index_path, open_index
    from sd3.data.phase import create_phase
    from sd3.data.reader import ShardReader
    from sd3.data.sampler import BucketSampler
    from sd3.data.schema import DataError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sd3.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
