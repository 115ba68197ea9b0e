"""Benchmark: how fast BucketDataset.load turns a step into a decoded batch, split into reading and
decoding, on an indexed dataset (e.g. the one bench_index.py keeps with --keep).

    python tests/benchmarks/bench_reader.py --data /tmp/bench_index [--batch-size 140] [--ranks 3] [--steps 5]

Reference, measured in the same run: decoding the same images from bytes already in memory (what a
batch costs with free I/O). Builds the dataset's index first when it has none.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from sd3.config import DataConfig  # noqa: E402  (after the path set-up)
from sd3.data import BucketDataset  # noqa: E402
from sd3.data.images import decode_rgb, fit_to_bucket  # noqa: E402
from sd3.data.index import build_index, default_index_path  # noqa: E402
from sd3.data.schema import READ_COLUMNS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=140)
    parser.add_argument("--ranks", type=int, default=3, help="model ranks one loader feeds")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-res", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--uint8", action="store_true", help="load(dtype=torch.uint8): no float conversion")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not default_index_path(args.data).is_file():
        print(build_index(args.data, progress=False).__str__().splitlines()[0])
    ds = BucketDataset(DataConfig(dataset=args.data, batch_size=args.batch_size), seed=0,
                       num_model_ranks=args.ranks, max_res=args.max_res, multiple=16)
    ds.load(10_000)                                          # warm up: file handles, caches
    read_s, load_s, decode_s, rows = 0.0, 0.0, 0.0, 0
    for step in range(args.steps):
        ids = ds.rows_of(step)
        t0 = time.perf_counter()
        got = ds.reader.read(ids, READ_COLUMNS)
        t1 = time.perf_counter()
        raw = ds.load(step, dtype=torch.uint8 if args.uint8 else torch.float32)
        t2 = time.perf_counter()
        for data in got.columns["image"]:                    # reference: decode from memory only
            fit_to_bucket(decode_rgb(data), raw.bucket)
        t3 = time.perf_counter()
        read_s, load_s, decode_s = read_s + t1 - t0, load_s + t2 - t1, decode_s + t3 - t2
        rows += len(ids)
        mb = sum(len(d) for d in got.columns["image"]) / 1e6
        print(f"step {step}: bucket {raw.bucket}, {len(ids)} rows ({mb:.1f} MB of images): "
              f"read {t1 - t0:.3f} s, "
              f"load (read + decode + caption) {t2 - t1:.3f} s, decode-only reference {t3 - t2:.3f} s")
    print(f"read_rows_per_s: {rows / read_s:,.0f}")
    print(f"decode_only_rows_per_s (reference): {rows / decode_s:,.0f}")
    print(f"load / decode-only: {load_s / decode_s:.2f}x")
    print(f"load_rows_per_s: {rows / load_s:,.0f}")


if __name__ == "__main__":
    main()
