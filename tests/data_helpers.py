"""Builders shared by the tests/test_data_*.py modules: everything is built in temporary folders from
real photos (scikit-image) or small synthetic images."""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sd3.data.buckets import format_bucket

SEED_SCHEMA = pa.schema([
    ("image", pa.binary()), ("recaption", pa.string()), ("recaption_short", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("aspect_ratio", pa.float64()),
    ("bucket_size", pa.string()), ("class", pa.string()), ("id", pa.string()),
])


@functools.cache
def _astronaut() -> Image.Image:
    """The astronaut photo (scikit-image); where scikit-image is not installed (a lent GPU machine runs
    the gpu-marked tests on its own stack), a smooth synthetic 512 px picture with edges, which JPEG
    encodes and decodes like a photo."""
    try:
        from skimage import data
    except ImportError:
        y, x = np.mgrid[0:512, 0:512] / 512.0
        rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(9 * x * y)], axis=-1)
        rgb[(x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.04] = (1.0, 0.6, -0.2)   # a disc: a sharp edge
        return Image.fromarray(((rgb + 1) * 127.5).clip(0, 255).astype(np.uint8))
    return Image.fromarray(data.astronaut())


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A crop of a real photo (the astronaut), resized to width x height, RGB."""
    rng = np.random.default_rng(seed)
    src = _astronaut()
    left, top = int(rng.integers(0, 128)), int(rng.integers(0, 128))
    return src.crop((left, top, left + 384, top + 384)).resize((width, height), Image.Resampling.BILINEAR)


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def seed_row(i: int, width: int, height: int, *, image: bytes | None = None, fmt: str = "JPEG",
             bucket: str | None = None, swapped: bool = False, long: str | None = None,
             short: str | None = None) -> dict:
    """One row in the seed schema. swapped=True writes height and width swapped, as the seed did."""
    data = encode(photo(width, height, seed=i), fmt) if image is None else image
    h_col, w_col = (width, height) if swapped else (height, width)
    return {"image": data, "recaption": f"a detailed caption of row {i}" if long is None else long,
            "recaption_short": f"row {i}" if short is None else short, "height": h_col, "width": w_col,
            "aspect_ratio": width / height, "bucket_size": bucket or format_bucket(width, height),
            "class": "astronaut", "id": f"row-{i}"}


def write_shard(path: Path, rows: list[dict], *, row_group_size: int | None = None,
                schema: pa.Schema = SEED_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size or max(1, len(rows)))
    return path


def bucketed_dataset(root: Path, sizes: list[tuple[int, int]], *, shards: int = 3, per_size: int = 12,
                     row_group_size: int = 5) -> Path:
    """A folder of seed-schema shards whose rows are already at their bucket size (JPEG), buckets
    interleaved and row groups mixing buckets (like the seed's files)."""
    rows = []
    for w, h in sizes:
        rows += [seed_row(len(rows) + j, w, h) for j in range(per_size)]
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    for s in range(shards):
        write_shard(root / f"part-{s:03d}.parquet", rows[s::shards], row_group_size=row_group_size)
    return root


@functools.cache
def demo_dataset() -> Path:
    """The demo dataset at 64 px / multiple 8, built once per test process (a few seconds) in a temporary
    folder removed at exit. Tests must not modify it (copy it first)."""
    from sd3.data.demo import ensure_demo_dataset

    root = Path(tempfile.mkdtemp(prefix="sd3-demo-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return ensure_demo_dataset(root / "64", max_res=64, multiple=8)
