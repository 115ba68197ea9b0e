"""Benchmark: index a seed-schema dataset end to end, against a bare pyarrow read of its bucket column.

    python tests/benchmarks/bench_index.py [--rows 1000000] [--shards 100] [--data /tmp/bench_index] [--keep]
                                           [--layout phase|seed] [--row-group-rows N] [--repeats 3]

1. Generates (or reuses, when --data holds one made with the same settings) a dataset in the seed
   schema with real encoded image bytes: a pool of JPEG crops of the scikit-image / scikit-learn
   photos at their 256 px buckets (several KB to tens of KB each) is encoded once and its bytes are
   reused across rows. The 1,000,000-row default is about 16 GiB; generating it is the slow part.
   --layout phase writes shards as data/create_phase.py does (single-bucket row groups of 64 rows);
   --layout seed writes them like the seed's files (buckets mixed in 100-row groups, the row-group
   size of Hugging Face image datasets, height and width swapped).
2. Times, --repeats times each: a bare in-process pyarrow read of the one `bucket_size` column of
   every shard (the reference), and the whole `python src/create_indices.py` process (wall clock,
   interpreter start and imports included: what a user waits for). Checks the index against the
   bare read.
3. Prints the figures; the last line is `index_rows_per_s: X` (median over the repeats).

For scale (measured once on the development machine, 1M rows): the seed's method (dataset cache conversion, then
whole-row reads) took about 64 s; a bare read of the bucket column about 0.2 s.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from sd3.data.buckets import format_bucket, snap_size  # noqa: E402  (after the path set-up)
from sd3.data.index import BucketIndex  # noqa: E402

# Measured once on the development machine: HF datasets cache conversion + whole-row reads, 1M rows.
SEED_METHOD_S_PER_MILLION = 64.0
ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3), (2, 1)]


def image_pool(size: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """(JPEG bytes, bucket) of `size` random crops of the bundled photos at their 256 px bucket."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in
              ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
               "retina")]
    photos += [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        photo = photos[rng.integers(len(photos))]
        aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
        W, H = photo.size
        cw = int(min(W, H * aw / ah) * rng.uniform(0.5, 1.0))
        ch = int(cw * ah / aw)
        left, top = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
        bw, bh = snap_size(cw, ch, max_res=256, multiple=16, upscale=True)
        crop = photo.crop((left, top, left + cw, top + ch)).resize((bw, bh), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.choice([85, 90, 95, 97])))
        pool.append((buf.getvalue(), format_bucket(bw, bh)))
    return pool


def write_shard(path: Path, n: int, pool: list[tuple[bytes, str]], *, seed: int, layout: str,
                row_group_rows: int) -> None:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(pool), n)
    buckets = np.array([pool[i][1] for i in pick])
    if layout == "phase":                                   # create_phase groups rows by bucket
        order = np.argsort(buckets, kind="stable")
        pick, buckets = pick[order], buckets[order]
    sizes = [tuple(map(int, b.split("x"))) for b in buckets]
    w = np.array([s[0] for s in sizes], np.int64)
    h = np.array([s[1] for s in sizes], np.int64)
    words = ["a", "photo", "of", "the", "red", "cat", "sitting", "on", "wooden", "table", "near",
             "window", "light"]
    captions = [" ".join(rng.choice(words, 40)) for _ in range(64)]
    table = pa.table({
        "image": pa.array([pool[i][0] for i in pick], pa.binary()),
        "recaption": pa.array([captions[i % 64] for i in range(n)]),
        "recaption_short": pa.array([captions[(i + 7) % 64][:80] for i in range(n)]),
        # the seed wrote height and width swapped
        "height": pa.array(w if layout == "seed" else h), "width": pa.array(h if layout == "seed" else w),
        "aspect_ratio": pa.array(w / h), "bucket_size": pa.array(buckets, pa.string()),
        "class": pa.array(["cc12m"] * n), "id": pa.array([f"{seed}-{i}" for i in range(n)]),
    })
    codecs = {c: "none" if c == "image" else "snappy" for c in table.column_names}
    tmp = path.with_name("." + path.name + ".tmp")
    with pq.ParquetWriter(tmp, table.schema, compression=codecs, use_dictionary=["bucket_size", "class"],
                          write_statistics=["bucket_size", "height", "width"]) as writer:
        if layout == "phase":                               # row groups never straddle a bucket
            starts = [*np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]]).tolist(), n]
            for a, b in itertools.pairwise(starts):
                writer.write_table(table.slice(a, b - a), row_group_size=row_group_rows)
        else:
            writer.write_table(table, row_group_size=row_group_rows)
    tmp.rename(path)


def ensure_dataset(root: Path, rows: int, shards: int, layout: str, row_group_rows: int) -> bool:
    """Generate the dataset unless root already holds it. Returns True when generated here."""
    manifest = {"rows": rows, "shards": shards, "layout": layout, "row_group_rows": row_group_rows,
                "version": 1}
    marker = root / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        print(f"reusing {root} ({rows:,} rows, {shards} shards, layout {layout})")
        return False
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    pool = image_pool(512)
    sizes = [len(b) for b, _ in pool]
    print(f"image pool: {len(pool)} JPEGs, {min(sizes) / 1e3:.1f} to {max(sizes) / 1e3:.1f} KB "
          f"(mean {np.mean(sizes) / 1e3:.1f} KB), {len({b for _, b in pool})} buckets")
    per = [rows // shards + (s < rows % shards) for s in range(shards)]
    done = 0
    with ThreadPoolExecutor(2) as ex:                       # pyarrow writes release the GIL
        futures = [ex.submit(write_shard, root / f"shard-{s:05d}.parquet", per[s], pool, seed=s,
                             layout=layout, row_group_rows=row_group_rows) for s in range(shards)]
        for s, f in enumerate(futures):
            f.result()
            done += per[s]
            if (s + 1) % max(1, shards // 10) == 0 or s + 1 == shards:
                print(f"generating: {s + 1}/{shards} shards, {done:,} rows, {time.perf_counter() - t0:.0f} s",
                      flush=True)
    marker.write_text(json.dumps(manifest))
    size = sum(p.stat().st_size for p in root.glob("*.parquet"))
    print(f"generated {rows:,} rows in {shards} shards, {size / 2**30:.2f} GiB, "
          f"in {time.perf_counter() - t0:.0f} s")
    return True


def bare_read(root: Path) -> tuple[float, dict[str, int]]:
    """Seconds to read the bucket column of every shard with pyarrow, and the bucket counts."""
    t0 = time.perf_counter()
    tables = [pq.read_table(p, columns=["bucket_size"]) for p in sorted(root.glob("*.parquet"))]
    seconds = time.perf_counter() - t0
    counts = pa.concat_tables(tables).column(0).value_counts().to_pylist()
    return seconds, {c["values"]: c["counts"] for c in counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "bench_index"),
                        help="dataset folder (reused when it holds a dataset made with the same settings)")
    parser.add_argument("--keep", action="store_true", help="keep a dataset generated by this run")
    parser.add_argument("--layout", choices=("phase", "seed"), default="phase")
    parser.add_argument("--row-group-rows", type=int, default=None, help="default: 64 (phase), 100 (seed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="passed to create_indices")
    args = parser.parse_args()
    root = Path(args.data)
    group = args.row_group_rows or (64 if args.layout == "phase" else 100)
    generated = ensure_dataset(root, args.rows, args.shards, args.layout, group)
    out = Path(tempfile.mkdtemp(prefix="bench-index-")) / "index.safetensors"
    cmd = [sys.executable, str(REPO / "src" / "create_indices.py"), "--data", str(root), "--out", str(out),
           "--quiet"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    bare_s, index_s = [], []
    try:
        for r in range(args.repeats):
            seconds, truth = bare_read(root)
            bare_s.append(seconds)
            t0 = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            index_s.append(time.perf_counter() - t0)
            if result.returncode:
                raise SystemExit(f"create_indices failed:\n{result.stderr}")
            index = BucketIndex(out)
            got = {name: int(n) for name, n in zip(index.bucket_names, index.counts)}
            assert got == truth and index.num_rows == args.rows, "index does not match the bucket column"
            print(f"repeat {r + 1}: bare pyarrow read of bucket_size {bare_s[-1]:.3f} s; "
                  f"create_indices process {index_s[-1]:.3f} s ({result.stdout.strip()})")
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
        if generated and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    bare, idx = statistics.median(bare_s), statistics.median(index_s)
    seed_ref = SEED_METHOD_S_PER_MILLION * args.rows / 1e6
    print(f"rows: {args.rows:,} in {args.shards} shards, layout {args.layout}, {group} rows per row group")
    print(f"bare_read_s (median of {args.repeats}): {bare:.3f}   (first: {bare_s[0]:.3f})")
    print(f"create_indices_s (median of {args.repeats}, whole process): {idx:.3f}   "
          f"(first: {index_s[0]:.3f})")
    print(f"create_indices / bare read: {idx / bare:.2f}x")
    print(f"seed method, its one-off reference scaled to these rows: {seed_ref:.1f} s -> "
          f"{seed_ref / idx:.0f}x faster")
    print(f"index_rows_per_s: {args.rows / idx:,.0f}")


if __name__ == "__main__":
    main()
