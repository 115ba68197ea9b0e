"""The demo dataset: real photos bundled with scikit-image and scikit-learn, hand-written captions,
several crops per photo in square, landscape and portrait aspect ratios, in the seed's schema.

    ensure_demo_dataset("data/demo/64", max_res=64, multiple=8)

writes `data/demo/raw/*.parquet` (full-size crops, as a user's raw shards would be; some stored grey,
CMYK or RGBA so create_phase's conversions run on real files), then `data/demo/64/*.parquet`
(create_phase) and its bucket index. It takes a few seconds, does nothing when the dataset is there,
and is safe when several processes race: each builds in a private temporary folder and renames it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sd3.atomic import build_atomically
from sd3.config.presets import DEMO_CAPTIONS
from sd3.data.index import build_index, default_index_path
from sd3.data.phase import create_phase
from sd3.data.schema import DataError
from sd3.paths import command


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data  # imported on use: only the demo needs scikit-image

        return getattr(data, name)()
    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    return load


# name -> (loader, stored mode). Photos: scikit-image `data` (public domain / CC0, see its docs) and
# scikit-learn's sample images (china.jpg, flower.jpg); their captions are DEMO_CAPTIONS.
_PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "astronaut": (_skimage("astronaut"), "RGB"),
    "cat": (_skimage("chelsea"), "RGBA"),
    "coffee": (_skimage("coffee"), "CMYK"),
    "rocket": (_skimage("rocket"), "RGB"),
    "tissue": (_skimage("immunohistochemistry"), "RGB"),
    "galaxies": (_skimage("hubble_deep_field"), "RGB"),
    "retina": (_skimage("retina"), "RGB"),
    "cameraman": (_skimage("camera"), "L"),
    "pagoda": (_sklearn("china.jpg"), "RGB"),
    "dahlia": (_sklearn("flower.jpg"), "RGB"),
}
assert _PHOTOS.keys() == DEMO_CAPTIONS.keys(), "every demo photo has its captions"

# (width : height, crops) per photo; each crop is also stored mirrored left-right (no caption says left
# or right). At 64 px and multiple 8 these become the buckets 64x64, 64x48, 48x64, 64x40 and 40x64.
_ASPECTS = ((1, 1, 3), (4, 3, 2), (3, 4, 2), (8, 5, 1), (5, 8, 1))
_SHARDS = 4


def demo_rows(seed: int = 0) -> list[dict]:
    """The raw rows (seed schema without bucket_size): crops of every photo, encoded."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (load, mode) in _PHOTOS.items():
        long, short = DEMO_CAPTIONS[name]
        photo = Image.fromarray(load()).convert("RGB")
        W, H = photo.size
        for aw, ah, n in _ASPECTS:
            for c in range(n):
                scale = (1.0, 0.85, 0.7)[c]              # the largest crop of that aspect, then smaller
                cw = int(min(W, H * aw / ah) * scale)
                ch = int(cw * ah / aw)
                left = int(rng.integers(0, W - cw + 1))
                top = int(rng.integers(0, H - ch + 1))
                crop = photo.crop((left, top, left + cw, top + ch))
                for flip in (False, True):
                    img = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
                    rows.append({
                        "image": _encode(img, mode), "recaption": long, "recaption_short": short,
                        "height": ch, "width": cw, "aspect_ratio": cw / ch, "class": name,
                        "id": f"{name}-{aw}x{ah}-{c}{'-flip' if flip else ''}",
                    })
    order = rng.permutation(len(rows))                               # mix photos across shards
    return [rows[i] for i in order]


def _encode(img: Image.Image, mode: str) -> bytes:
    buf = io.BytesIO()
    if mode == "L":
        img.convert("L").save(buf, "PNG")
    elif mode == "RGBA":
        img.convert("RGBA").save(buf, "PNG")
    else:
        img.convert(mode).save(buf, "JPEG", quality=92)               # RGB or CMYK
    return buf.getvalue()


def write_demo_raw(out_dir: str | Path) -> Path:
    """Write the raw shards (`demo-XX.parquet`) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = demo_rows()
    schema = pa.schema([("image", pa.binary()), ("recaption", pa.string()), ("recaption_short", pa.string()),
                        ("height", pa.int64()), ("width", pa.int64()), ("aspect_ratio", pa.float64()),
                        ("class", pa.string()), ("id", pa.string())])
    for s in range(_SHARDS):
        part = rows[s::_SHARDS]
        table = pa.Table.from_pylist(part, schema=schema)
        codecs = {n: "none" if n == "image" else "snappy" for n in schema.names}
        pq.write_table(table, out_dir / f"demo-{s:02d}.parquet", compression=codecs)
    return out_dir


def ensure_demo_dataset(dataset_dir: str | Path = "data/demo/64", max_res: int = 64,
                        multiple: int = 8) -> Path:
    """Build the demo dataset at dataset_dir (raw shards beside it in `<parent>/raw`) unless it is
    already there. Returns dataset_dir."""
    out = Path(dataset_dir)
    if default_index_path(out).is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists but has no bucket index: index it with {command('src/create_indices.py')} "
                        f"--data {out}, or remove the folder to rebuild the demo")
    raw = out.parent / "raw"
    if not raw.is_dir():
        build_atomically(raw, write_demo_raw, folder=True, replace=False)

    def build(tmp: Path) -> None:
        report = create_phase(raw, tmp, max_res=max_res, multiple=multiple, workers=1, progress=False)
        if report.failed:
            raise DataError(f"demo dataset: create_phase failed:\n{report}")
        build_index(tmp, progress=False)

    build_atomically(out, build, folder=True, replace=False)  # a process that got there first wins
    return out
