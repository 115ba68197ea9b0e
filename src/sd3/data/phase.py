"""create_phase: resize a folder of parquet shards to one training resolution and bucket every row.

Per image (the seed's rule, `buckets.snap_size`): cap the long side at max_res, snap both sides to
the nearest multiple of the patch grid, no upscaling unless asked. The image is scaled to cover its
bucket and centre-cropped (no squashing), re-encoded, and its true `height`, `width`,
`aspect_ratio` (width / height) and `bucket_size` are written; every other column is kept.

Robustness: a row whose image is empty or does not decode is dropped and counted, never the shard;
a shard that cannot be read at all is reported at the end and the others go on. Each output shard
is written under a hidden temporary name and renamed when whole, so a rerun skips finished shards
and never trusts a half-written one.

Layout for fast indexing and reading: rows are grouped by bucket into row groups of
`row_group_rows` rows (default 64, about 1 MB at 256 px) that never mix buckets, so the index reads
a bucket from the footer statistics alone, and a random row costs one small row-group read.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sd3.atomic import publish, remove, stale_temporaries, temporary_sibling
from sd3.data.buckets import format_bucket, snap_size
from sd3.data.images import ImageError, open_rgb
from sd3.data.index import list_shards
from sd3.data.schema import PHASE_COLUMNS, DataError, check_schema, image_bytes

FORMATS = ("jpeg", "png", "webp")


@dataclass(frozen=True)
class PhaseOptions:
    max_res: int
    multiple: int = 16
    fmt: str = "jpeg"
    quality: int = 95
    upscale: bool = False
    row_group_rows: int = 64


@dataclass
class ShardReport:
    name: str
    status: str = "done"
    """'done', 'skipped' (already finished by an earlier run) or 'failed'."""
    rows_in: int = 0
    rows_out: int = 0
    bad: Counter = field(default_factory=Counter)
    """Dropped rows by reason."""
    example: str = ""
    """One decode error message, for the report."""
    buckets: Counter = field(default_factory=Counter)
    error: str = ""


@dataclass
class PhaseReport:
    shards: list[ShardReport]

    @property
    def failed(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "failed"]

    def __str__(self) -> str:
        done = [s for s in self.shards if s.status == "done"]
        skipped = [s for s in self.shards if s.status == "skipped"]
        bad = sum((s.bad for s in self.shards), Counter())
        lines = [f"create_phase: {len(done)} shards written, {len(skipped)} already done, "
                 f"{len(self.failed)} failed; {sum(s.rows_out for s in done):,} of "
                 f"{sum(s.rows_in for s in done):,} rows kept"]
        if bad:
            example = next((s.example for s in self.shards if s.example), "")
            lines.append("dropped rows: " + ", ".join(f"{n:,} {why}" for why, n in bad.most_common())
                         + (f" (e.g. {example})" if example else ""))
        for s in self.failed:
            lines.append(f"FAILED {s.name}: {s.error}")
        buckets = sum((s.buckets for s in done), Counter())
        if buckets:
            lines.append("buckets: " + ", ".join(f"{b}: {n:,}" for b, n in buckets.most_common()))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# One image, one shard
# --------------------------------------------------------------------------------------------------


def resize_encode(data: bytes | None, opts: PhaseOptions) -> tuple[bytes, int, int]:
    """Encoded image -> (re-encoded bytes, W, H) at its bucket size. Raises ImageError."""
    img = open_rgb(data)
    W, H = snap_size(*img.size, max_res=opts.max_res, multiple=opts.multiple, upscale=opts.upscale)
    w, h = img.size
    if (w, h) != (W, H):
        scale = max(W / w, H / h)
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        # reducing_gap: a cheap integer pre-shrink before LANCZOS on large downscales (Pillow docs)
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
        left, top = (nw - W) // 2, (nh - H) // 2
        img = img.crop((left, top, left + W, top + H))
    buf = io.BytesIO()
    if opts.fmt == "jpeg":
        img.save(buf, "JPEG", quality=opts.quality)
    elif opts.fmt == "webp":
        img.save(buf, "WEBP", quality=opts.quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue(), W, H


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The input schema with `image` as plain binary and true size columns (added when missing)."""
    new = {"image": pa.binary(), "height": pa.int64(), "width": pa.int64(), "aspect_ratio": pa.float64(),
           "bucket_size": pa.string()}
    fields = [pa.field(f.name, new[f.name]) if f.name in new else f for f in schema]
    fields += [pa.field(name, t) for name, t in new.items() if name not in schema.names]
    return pa.schema(fields)


def process_shard(src: Path, dst: Path, opts: PhaseOptions) -> ShardReport:
    """Resize one shard into dst. Never raises: failures are in the report."""
    report = ShardReport(name=str(src))
    if dst.exists():
        report.status = "skipped"
        with contextlib.suppress(OSError, pa.ArrowException):
            report.rows_out = report.rows_in = pq.read_metadata(dst).num_rows
        return report
    tmp = temporary_sibling(dst)
    try:
        pf = pq.ParquetFile(src)
        check_schema(pf.schema_arrow, PHASE_COLUMNS, where=str(src))
        schema = output_schema(pf.schema_arrow)
        pending: dict[str, list[pa.Table]] = {}
        dst.parent.mkdir(parents=True, exist_ok=True)
        # Image bytes are already compressed: snappy on them costs read time for nothing.
        codecs = {n: "none" if n == "image" else "snappy" for n in schema.names}
        with pq.ParquetWriter(tmp, schema, compression=codecs, use_dictionary=["bucket_size"],
                              write_statistics=["bucket_size", "height", "width"]) as writer:
            for batch in pf.iter_batches(batch_size=256):
                report.rows_in += batch.num_rows
                table = _resize_batch(pa.Table.from_batches([batch]), schema, opts, report)
                _queue_by_bucket(table, pending, writer, opts.row_group_rows)
            for bucket in list(pending):
                _flush(pending, bucket, writer, 0)
        publish(tmp, dst)
    except Exception as e:  # one shard must never stop the others; the report names it
        remove(tmp)
        report.status, report.error = "failed", f"{type(e).__name__}: {e}"
    return report


def _resize_batch(table: pa.Table, schema: pa.Schema, opts: PhaseOptions, report: ShardReport) -> pa.Table:
    kept, images, widths, heights = [], [], [], []
    for i, data in enumerate(image_bytes(table.column("image"))):
        try:
            encoded, W, H = resize_encode(data, opts)
        except ImageError as e:
            report.bad["empty images" if not data else "undecodable images"] += 1
            report.example = report.example or str(e)[:200]
            continue
        kept.append(i)
        images.append(encoded)
        widths.append(W)
        heights.append(H)
    table = table.take(pa.array(kept, pa.int64()))
    buckets = [format_bucket(w, h) for w, h in zip(widths, heights)]
    report.rows_out += len(kept)
    report.buckets.update(buckets)
    new = {"image": pa.array(images, pa.binary()), "width": pa.array(widths, pa.int64()),
           "height": pa.array(heights, pa.int64()),
           "aspect_ratio": pa.array([w / h for w, h in zip(widths, heights)], pa.float64()),
           "bucket_size": pa.array(buckets, pa.string())}
    columns = [new[f.name] if f.name in new else table.column(f.name) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _queue_by_bucket(table: pa.Table, pending: dict[str, list[pa.Table]], writer: pq.ParquetWriter,
                     group_rows: int) -> None:
    """Add rows to their bucket's queue; write every full row group (one bucket each)."""
    if table.num_rows == 0:
        return
    buckets = table.column("bucket_size").to_pylist()
    by_bucket: dict[str, list[int]] = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(i)
    for bucket, rows in by_bucket.items():
        pending.setdefault(bucket, []).append(table.take(pa.array(rows, pa.int64())))
        _flush(pending, bucket, writer, group_rows)


def _flush(pending: dict[str, list[pa.Table]], bucket: str, writer: pq.ParquetWriter,
           group_rows: int) -> None:
    """Write full row groups of this bucket (group_rows=0: everything queued)."""
    queued = pa.concat_tables(pending[bucket])
    if group_rows == 0:
        if queued.num_rows:
            writer.write_table(queued, row_group_size=queued.num_rows)
        pending[bucket] = []
        return
    full = queued.num_rows // group_rows * group_rows
    if full:
        writer.write_table(queued.slice(0, full), row_group_size=group_rows)
    pending[bucket] = [queued.slice(full)]


# --------------------------------------------------------------------------------------------------
# A folder
# --------------------------------------------------------------------------------------------------


def create_phase(input_dir: str | Path, output_dir: str | Path, *, max_res: int, multiple: int = 16,
                 workers: int = 1, fmt: str = "jpeg", quality: int = 95, upscale: bool = False,
                 row_group_rows: int = 64, progress: bool = True) -> PhaseReport:
    """Resize every shard under input_dir into output_dir (same relative paths), split over `workers`
    processes by file. Raises DataError only for bad arguments or an input folder without shards."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if max_res < multiple or multiple <= 0:
        raise DataError(f"--max-res {max_res} must be at least --patch {multiple} (and --patch > 0)")
    if row_group_rows <= 0 or not 1 <= quality <= 100:
        raise DataError("--row-group-rows must be positive and --quality in 1..100")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    shards, _ = list_shards(input_dir)
    if output_dir.resolve().is_relative_to(input_dir.resolve()):  # outputs must not become inputs on a rerun
        inner = output_dir.resolve().relative_to(input_dir.resolve()).as_posix()
        shards = [s for s in shards if inner != "." and not s.startswith(inner + "/")]
    if not shards:
        raise DataError(f"{input_dir}: no .parquet shards found; point --input at the folder of raw shards")
    opts = PhaseOptions(max_res=max_res, multiple=multiple, fmt=fmt, quality=quality, upscale=upscale,
                        row_group_rows=row_group_rows)
    jobs = [(input_dir / s, output_dir / s, opts) for s in shards]
    for _, dst, _ in jobs:  # leftovers of an interrupted run (one create_phase per output folder at a time)
        for stale in stale_temporaries(dst.parent, dst.name):
            remove(stale)
    total = 0
    for src, _, _ in jobs:
        with contextlib.suppress(OSError, pa.ArrowException):  # unreadable: reported when processed
            total += pq.read_metadata(src).num_rows
    reports = []
    with tqdm(total=total, unit="row", desc="create_phase", disable=None if progress else True) as bar:
        if workers <= 1:
            for job in jobs:
                reports.append(process_shard(*job))
                bar.update(reports[-1].rows_in)
        else:
            # spawn: workers start clean (no inherited threads or locks from the parent)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = [pool.submit(process_shard, *job) for job in jobs]
                for future in as_completed(futures):
                    reports.append(future.result())
                    bar.update(reports[-1].rows_in)
    reports.sort(key=lambda r: r.name)
    return PhaseReport(reports)
