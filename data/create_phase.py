"""Resize a folder of raw parquet shards to one training resolution and bucket every row.

    .venv/bin/python data/create_phase.py --input data/raw --output data/cc12m_imagenet21k_256 --max-res 256 \\
        [--patch 16] [--workers N] [--format jpeg|png|webp] [--quality 95] [--upscale] [--row-group-rows 64]

--patch is the bucket grid: latent factor x patch size (16 for the FLUX VAE /8 with patch 2; 8 for the
tiny preset's pixel autoencoder /4 with patch 2). Bad images drop their row (counted in the report),
never the shard; finished output shards are skipped on a rerun. Then index the output:

    .venv/bin/python src/create_indices.py --data data/cc12m_imagenet21k_256
"""

from __future__ import annotations

import argparse
import os
import sys

from sd3.data.phase import FORMATS, create_phase
from sd3.data.schema import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of raw .parquet shards (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the resized shards (same relative names)")
    parser.add_argument("--max-res", type=int, required=True, help="longest side of the phase, e.g. 256")
    parser.add_argument("--patch", type=int, default=16,
                        help="bucket sides are multiples of this: latent factor x patch (default 16)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes, one shard each")
    parser.add_argument("--format", default="jpeg", choices=FORMATS, help="encoding of the resized images")
    parser.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality (default 95)")
    parser.add_argument("--upscale", action="store_true", help="also scale smaller images up to --max-res")
    parser.add_argument("--row-group-rows", type=int, default=64,
                        help="rows per parquet row group (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = create_phase(args.input, args.output, max_res=args.max_res, multiple=args.patch,
                              workers=args.workers, fmt=args.format, quality=args.quality,
                              upscale=args.upscale, row_group_rows=args.row_group_rows,
                              progress=not args.quiet)
    except DataError as e:
        print(f"create_phase: error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
