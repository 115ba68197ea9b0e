"""Benchmark: import a folder of JPEGs with .txt captions into raw shards (data/import_images.py's work).

    python tests/benchmarks/bench_import.py [--images 1000] [--side 512] [--workers 1 2] [--data DIR] [--keep]

1. Writes (or reuses, when --data holds one made with the same settings) a folder of --images JPEG crops
   of the scikit-image photos, long side --side, each with a one-line .txt caption; one in 50 is a
   truncated JPEG, so the skip path is timed too.
2. Imports it once per --workers value into a fresh output folder (wall clock, worker start-up included:
   every image is read and decoded once to check it and to read its true size).
3. Prints rows/s and MB/s per setting; the last line is `import_rows_per_s: X` (the best setting).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from sd3.data.importer import ImportOptions, import_images  # noqa: E402  (after the path set-up)

ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16)]


def make_folder(root: Path, images: int, side: int) -> int:
    """The benchmark folder; returns its total image bytes."""
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee", "rocket")]
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(images):
        photo = photos[i % len(photos)]
        aw, ah = ASPECTS[i % len(ASPECTS)]
        W, H = photo.size
        cw = min(W, int(H * aw / ah))
        crop = photo.crop((0, 0, cw, int(cw * ah / aw)))
        scale = side / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        jpeg = buf.getvalue()
        if i % 50 == 49:
            jpeg = jpeg[: len(jpeg) // 2]                         # truncated: skipped and counted
        (root / f"{i:07d}.jpg").write_bytes(jpeg)
        (root / f"{i:07d}.txt").write_text(f"Photo number {i}. A crop of a bundled test image.")
        total += len(jpeg)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", default=None, help="folder for the generated images (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder")
    args = parser.parse_args()

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench_import_"))
    src = root / "photos"
    settings = {"images": args.images, "side": args.side}
    stamp = root / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        total = sum(p.stat().st_size for p in src.glob("*.jpg"))
    else:
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        total = make_folder(src, args.images, args.side)
        stamp.write_text(json.dumps(settings))
        print(f"wrote {args.images} images ({total / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    best = 0.0
    try:
        for workers in args.workers:
            out = root / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            report = import_images(src, out, ImportOptions(workers=workers), progress=False)
            seconds = time.perf_counter() - t
            rate = report.stats.rows_in / seconds
            best = max(best, rate)
            print(f"workers {workers}: {report.stats.rows_in} rows in, {report.stats.rows_written} written, "
                  f"skipped {report.stats.skipped}, {seconds:.2f} s, {rate:.0f} rows/s, "
                  f"{total / 1e6 / seconds:.1f} MB/s")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not args.data:
            shutil.rmtree(root, ignore_errors=True)
    print(f"import_rows_per_s: {best:.0f}")


if __name__ == "__main__":
    main()
