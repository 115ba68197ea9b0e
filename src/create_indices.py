"""Build the bucket index of a folder of parquet shards (reads only the bucket column, never images).

    .venv/bin/python src/create_indices.py --data data/cc12m_imagenet21k_256 [--out FILE] [--workers N]

The index (default `<data>/bucket_index.safetensors`) lists, per bucket, the global ids of its rows,
plus every shard's name, row count and size, so a training run opened on a changed folder stops
with an error instead of silently reading the wrong rows. See sd3/data/index.py for the format.
"""

from __future__ import annotations

import argparse
import sys

from sd3.data.index import build_index, default_index_path
from sd3.data.schema import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of .parquet shards (searched recursively)")
    parser.add_argument("--out", default=None,
                        help=f"index file to write (default: <data>/{default_index_path('').name})")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads reading shard footers (default: min(8, CPUs))")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no bucket table")
    args = parser.parse_args(argv)
    try:
        summary = build_index(args.data, args.out, workers=args.workers, progress=not args.quiet)
    except DataError as e:
        print(f"create_indices: error: {e}", file=sys.stderr)
        return 2
    print(summary if not args.quiet else str(summary).splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
