"""Bucket sizes: snap an image size to the patch grid under a maximum resolution; 'WxH' strings.

A bucket side is a multiple of `multiple` = latent factor x patch (16 for the FLUX VAE /8 with patch 2,
8 for the tiny preset's pixel autoencoder /4 with patch 2), so every image of a bucket becomes the same
whole number of tokens. `bucket_size` is written as 'WxH', width first.
"""

from __future__ import annotations

import re

_BUCKET = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def snap_size(width: int, height: int, *, max_res: int, multiple: int,
              upscale: bool = False) -> tuple[int, int]:
    """(width, height) of an image -> (W, H) of its bucket.

    The original system's rule (its create_phase step): when the long side exceeds `max_res`, scale it down to
    `max_res` keeping the aspect ratio; then snap both sides to the nearest multiple of `multiple`
    (at least one multiple, at most the largest multiple <= max_res). Smaller images are not scaled up
    unless `upscale`, in which case the long side is scaled to `max_res` too.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} has a side <= 0")
    cap = max_res // multiple * multiple
    if multiple <= 0 or cap < multiple:
        raise ValueError(f"max_res={max_res} must be at least one multiple of {multiple} (multiple > 0)")
    long_side = max(width, height)
    scale = max_res / long_side if (long_side > max_res or upscale) else 1.0

    def snap(side: float) -> int:
        return min(cap, max(multiple, int(side / multiple + 0.5) * multiple))

    return snap(width * scale), snap(height * scale)


def parse_bucket(text: str) -> tuple[int, int]:
    """'256x192' -> (256, 192), width first. Raises ValueError naming the bad value."""
    match = _BUCKET.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"bucket_size {text!r} is not of the form 'WxH' (e.g. '256x192')")
    w, h = int(match.group(1)), int(match.group(2))
    if w <= 0 or h <= 0:
        raise ValueError(f"bucket_size {text!r} has a side <= 0")
    return w, h


def format_bucket(width: int, height: int) -> str:
    """(256, 192) -> '256x192'."""
    return f"{int(width)}x{int(height)}"


def bucket_problem(size: tuple[int, int], *, max_res: int, multiple: int) -> str | None:
    """Why a bucket cannot be trained at this resolution and patch grid, or None when it can."""
    w, h = size
    if max(w, h) > max_res:
        return f"a side exceeds max_res={max_res}"
    if w % multiple or h % multiple:
        return f"a side is not a multiple of {multiple}"
    return None
