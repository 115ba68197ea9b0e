"""Build the small demo dataset from photos bundled with scikit-image and scikit-learn.

    .venv/bin/python data/make_demo_dataset.py --out data/demo [--max-res 64] [--multiple 8] [--force]

Writes DIR/raw/*.parquet (seed schema, full-size crops with hand-written captions), then runs
create_phase into DIR/<max_res>/ and builds its bucket index there (DIR/<max_res>/bucket_index.safetensors).
The `tiny` preset trains on data/demo/64 and builds it itself on first use.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from sd3.data.demo import ensure_demo_dataset
from sd3.data.index import open_index
from sd3.data.schema import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="folder for raw/ and <max_res>/")
    parser.add_argument("--max-res", type=int, default=64, help="longest image side of the phase")
    parser.add_argument("--multiple", type=int, default=8, help="bucket sides are multiples of this")
    parser.add_argument("--force", action="store_true", help="delete and rebuild DIR/raw and DIR/<max_res>")
    args = parser.parse_args(argv)
    out = Path(args.out)
    dataset = out / str(args.max_res)
    if args.force:
        shutil.rmtree(out / "raw", ignore_errors=True)
        shutil.rmtree(dataset, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        ensure_demo_dataset(dataset, max_res=args.max_res, multiple=args.multiple)
        index = open_index(dataset / "bucket_index.safetensors", dataset)
    except DataError as e:
        print(f"make_demo_dataset: error: {e}", file=sys.stderr)
        return 2
    buckets = ", ".join(f"{b}: {int(n)}" for b, n in zip(index.bucket_names, index.counts))
    print(f"demo dataset {dataset}: {index.num_rows} rows in {len(index.shards)} shards ({buckets}); "
          f"raw shards in {out / 'raw'}; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
