"""Import your own images and captions into raw parquet shards that data/create_phase.py accepts.

    .venv/bin/python data/import_images.py --input photos/ --output data/mine/raw \\
        [--kind folder|webdataset|parquet|hf] \\
        [--rows-per-shard 10000] [--workers N] [--missing-caption drop|empty] [--phase-res 256 --patch 16]

--input is a folder of images with caption files (photo.jpg + photo.txt, photo.caption or photo.json),
img2dataset's output (webdataset .tar shards or parquet), parquet files with other column names
(--image-column, --caption-column, --short-caption-column), or a Hugging Face dataset saved with
save_to_disk. The kind is detected unless --kind is given. Unreadable images and rows without a caption
are skipped and counted; a killed run resumes where it stopped when rerun with the same arguments.
With --phase-res the create_phase step (into <res> beside OUTPUT, or --phase-output) and the bucket index
follow, so one command yields a training set; otherwise run them next:

    .venv/bin/python data/create_phase.py --input data/mine/raw --output data/mine/256 --max-res 256 --patch 16
    .venv/bin/python src/create_indices.py --data data/mine/256

Exit code: 0 done, 1 some input could not be read (listed), 2 bad arguments (the message names the fix).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sd3.data.importer import KINDS, ImportOptions, import_images
from sd3.data.index import build_index
from sd3.data.phase import create_phase
from sd3.data.schema import DataError

ROW_DELAY_ENV = "SD3_IMPORT_ROW_DELAY_S"
"""Testing aid: seconds to sleep after each input item, so a test can kill a run part-way."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, like every other usage error here
        self.exit(2, f"import_images: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="images folder, .tar shards, parquet files or a saved dataset")
    parser.add_argument("--output", required=True, help="folder for the raw shards (part-NNNNN.parquet)")
    parser.add_argument("--kind", choices=KINDS, default=None, help="input kind (default: detected)")
    parser.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per output shard (default 10000)")
    parser.add_argument("--image-column", default=None, help="parquet/hf: image column (default: detected)")
    parser.add_argument("--caption-column", default=None, help="parquet/hf: caption column (default: detected)")
    parser.add_argument("--short-caption-column", default=None,
                        help="parquet/hf: short caption column (default: recaption_short or short_caption if present)")
    parser.add_argument("--json-caption-key", default="caption", help="folder/webdataset: caption key of NAME.json")
    parser.add_argument("--json-short-caption-key", default=None,
                        help="folder/webdataset: short caption key of NAME.json (default: none)")
    parser.add_argument("--missing-caption", choices=("drop", "empty"), default="drop",
                        help="rows without a caption: drop them (counted) or keep them with empty captions")
    parser.add_argument("--short-caption", choices=("first-sentence", "empty"), default="first-sentence",
                        help="recaption_short when none is given: the caption's first sentence, or empty")
    parser.add_argument("--split", default=None, help="hf DatasetDict: split(s) to import, comma-separated")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode images to check them (default: min(8, CPUs))")
    parser.add_argument("--phase-res", type=int, default=None,
                        help="then run create_phase at this resolution and index it")
    parser.add_argument("--patch", type=int, default=16,
                        help="with --phase-res: bucket grid, latent factor x patch (16: FLUX VAE; 8: tiny preset)")
    parser.add_argument("--phase-output", default=None,
                        help="with --phase-res: its folder (default: <res> beside OUTPUT, e.g. data/mine/256 for "
                             "data/mine/raw)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.phase_output is not None and args.phase_res is None:
        parser.error("--phase-output needs --phase-res")
    if args.phase_res is not None and not 0 < args.patch <= args.phase_res:
        parser.error(f"--phase-res {args.phase_res} must be at least --patch {args.patch} (and --patch > 0)")
    opts = ImportOptions(kind=args.kind, rows_per_shard=args.rows_per_shard, image_column=args.image_column,
                         caption_column=args.caption_column, short_caption_column=args.short_caption_column,
                         json_caption_key=args.json_caption_key, json_short_caption_key=args.json_short_caption_key,
                         missing_caption=args.missing_caption, short_caption=args.short_caption, split=args.split,
                         workers=args.workers)
    delay = float(os.environ.get(ROW_DELAY_ENV, "0") or 0)
    try:
        report = import_images(args.input, args.output, opts, progress=not args.quiet,
                               on_row=(lambda _: time.sleep(delay)) if delay > 0 else None)
    except DataError as e:
        print(f"import_images: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("import_images: interrupted; finished shards are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(report)
    status = 1 if report.failed else 0
    if args.phase_res is None:
        return status
    if report.stats.rows_written == 0:
        print("import_images: no rows to resize: skipping --phase-res", file=sys.stderr)
        return 1
    # Beside the raw folder, not inside it: create_phase reads every shard under its input, so a phase
    # folder inside OUTPUT would become input to the next phase made from OUTPUT (the demo's layout too).
    phase_dir = Path(args.phase_output or Path(args.output).resolve().parent / str(args.phase_res))
    try:
        phase = create_phase(args.output, phase_dir, max_res=args.phase_res, multiple=args.patch,
                             workers=args.workers, progress=not args.quiet)
        print(phase)
        if phase.failed:
            return 1
        print(build_index(phase_dir, progress=not args.quiet))
    except DataError as e:
        print(f"import_images: error: {e}", file=sys.stderr)
        return 2
    print(f"training set: {phase_dir} (train with --data.dataset={phase_dir})")
    return status


if __name__ == "__main__":
    sys.exit(main())
