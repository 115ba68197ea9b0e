"""How much a sample of a demo caption looks like its own photo rather than the other demo photos.

    crops = photo_crops(dataset, res=64)                        # name -> (n, 3, 64, 64) square crops in [0, 1]
    scores = score_samples(samples, own=names, crops=crops)     # one SampleScore per sample
    accuracy = nearest_photo_accuracy(samples, names, crops)    # the share of `nearest == own`

A sample (3, H, W) in [0, 1] is compared with every square crop of every photo the demo dataset holds at
its size (each photo has several crops, mirrored too, so a sample need not match one framing). Distances
are pixel MSE after average-pooling both to `compare` x `compare`: at the demo's scale the colours and
the layout are what a model learns first, and the pooled comparison measures them without punishing
texture the model draws differently. The PSNR is taken at full size, to the own photo's closest crop.
Shared by `tests/test_learning.py` and `tests/benchmarks/demo_quality.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from sd3.data.images import decode_rgb


def photo_crops(dataset: str | Path, *, res: int) -> dict[str, Tensor]:
    """Every square `res` x `res` crop of each photo in a demo dataset folder, (n, 3, res, res) in [0, 1],
    by photo name (the `class` column)."""
    crops: dict[str, list[Tensor]] = {}
    for shard in sorted(Path(dataset).glob("*.parquet")):
        for row in pq.read_table(shard, columns=["image", "class", "bucket_size"]).to_pylist():
            if row["bucket_size"] == f"{res}x{res}":
                crops.setdefault(row["class"], []).append(decode_rgb(row["image"]).float() / 255)
    if not crops:
        raise ValueError(f"{dataset} holds no {res}x{res} rows: give the demo dataset built at {res} px")
    return {name: torch.stack(c) for name, c in sorted(crops.items())}


def _distances(small: Tensor, crops: dict[str, Tensor], compare: int) -> dict[str, float]:
    """MSE of one pooled sample (3, c, c) to the closest pooled crop of each photo."""
    return {n: float((F.adaptive_avg_pool2d(c, compare) - small).pow(2).mean(dim=(1, 2, 3)).min())
            for n, c in crops.items()}


def nearest_photo_accuracy(samples: Tensor, own: list[str], crops: dict[str, Tensor], *, compare: int = 8) -> float:
    """Share of samples (B, 3, H, W) in [0, 1] whose nearest photo (pixel MSE to its closest crop, both pooled
    to `compare` x `compare`) is their own."""
    return sum(s.nearest == s.own for s in score_samples(samples, own=own, crops=crops, compare=compare)) / len(own)


@dataclass
class SampleScore:
    own: str
    """The photo the sample's caption describes."""
    nearest: str
    """The photo with the closest crop (pooled MSE)."""
    own_mse: float
    """Pooled MSE to the own photo's closest crop."""
    other_mse: float
    """Pooled MSE to the closest crop of any other photo."""
    psnr_db: float
    """PSNR at full size to the own photo's closest crop (full-size MSE), peak 1."""

    @property
    def margin(self) -> float:
        """other_mse - own_mse: positive when the sample is closer to its own photo than to any other."""
        return self.other_mse - self.own_mse


def score_samples(samples: Tensor, *, own: list[str], crops: dict[str, Tensor], compare: int = 16) -> list[SampleScore]:
    """One SampleScore per sample (B, 3, H, W) in [0, 1]; `own[i]` names sample i's photo, a key of `crops`
    (whose crops have the samples' size)."""
    if samples.shape[0] != len(own):
        raise ValueError(f"{samples.shape[0]} samples but {len(own)} photo names")
    missing = sorted(set(own) - set(crops))
    if missing:
        raise ValueError(f"no crops of {', '.join(missing)}: the dataset does not hold these photos")
    small = F.adaptive_avg_pool2d(samples.float(), compare)
    scores = []
    for x, x_small, name in zip(samples.float(), small, own):
        dist = _distances(x_small, crops, compare)
        other = min(d for n, d in dist.items() if n != name)
        full = float((crops[name] - x).pow(2).mean(dim=(1, 2, 3)).min())
        scores.append(SampleScore(own=name, nearest=min(dist, key=dist.get), own_mse=dist[name], other_mse=other,
                                  psnr_db=10 * math.log10(1 / max(full, 1e-10))))
    return scores
