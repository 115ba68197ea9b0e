"""The bucket index: for every bucket, the global ids of its rows; built from the bucket column alone.

A global row id counts rows over the shards in sorted path order: shard s holds ids
`shard_offsets[s] .. shard_offsets[s + 1] - 1`. The index never reads image bytes:

- where a row group's `bucket_size` statistics say min == max with no nulls (every row group that
  data/create_phase.py writes: it never mixes buckets in a row group), the footer alone gives the
  bucket of all its rows;
- any other row group (seed files, hand-made shards) has its one `bucket_size` column read.

File format (`bucket_index.safetensors`, a safetensors file: 8-byte header length, JSON header, raw
little-endian arrays; `safetensors.numpy.load_file` reads it too):

| array            | dtype        | shape   | meaning                                                  |
| ---------------- | ------------ | ------- | -------------------------------------------------------- |
| `rows`           | U32 or I64   | (N,)    | global row ids, grouped by bucket, ascending within one   |
| `bucket_offsets` | I64          | (K+1,)  | bucket k owns `rows[bucket_offsets[k]:bucket_offsets[k+1]]` |
| `shard_rows`     | I64          | (S,)    | rows in each shard                                        |
| `shard_bytes`    | I64          | (S,)    | file size of each shard when indexed                      |

The header's `__metadata__` holds `format`, `version`, `shards` (JSON list of paths relative to the
data folder), `buckets` (JSON list of 'WxH', in (W, H) order), `skipped_rows` (rows whose
bucket_size was null or not 'WxH') and `skipped_examples`. `rows` is memory-mapped when opened,
so an index of tens of millions of rows costs no load time and is shared between processes.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file
from tqdm import tqdm

from sd3.atomic import atomic_path
from sd3.data.buckets import format_bucket, parse_bucket
from sd3.data.schema import TRAIN_COLUMNS, DataError, check_schema
from sd3.paths import command

INDEX_SCRIPT = "src/create_indices.py"
"""The script that builds an index, as error messages print it (with the interpreter running now)."""

INDEX_NAME = "bucket_index.safetensors"
FORMAT = "sd3-bucket-index"
VERSION = 1
BUCKET_COLUMN = "bucket_size"


def default_index_path(data_dir: str | Path) -> Path:
    """Where the index of a dataset folder lives unless told otherwise."""
    return Path(data_dir) / INDEX_NAME


def list_shards(data_dir: str | Path) -> tuple[list[str], list[str]]:
    """(sorted relative paths of the `*.parquet` shards under data_dir, other files that were ignored).

    Hidden files and folders (names starting with '.', e.g. a shard still being written) and the
    index itself are skipped silently."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    shards, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name == INDEX_NAME:
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            (shards if name.endswith(".parquet") else ignored).append(rel)
    return sorted(shards), sorted(ignored)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardBuckets:
    """The bucket label of every row of one shard."""

    name: str
    num_rows: int
    size_bytes: int
    labels: list[str | None]
    """Distinct bucket_size values of this shard (None for null)."""
    codes: np.ndarray
    """(num_rows,) int32: row i has bucket `labels[codes[i]]`."""
    groups_read: int
    """Row groups whose column had to be read (the others came from their statistics)."""


def scan_shard(data_dir: Path, name: str) -> ShardBuckets:
    """Bucket labels of one shard from its footer statistics, reading the column only where needed."""
    path = data_dir / name
    try:
        pf = pq.ParquetFile(path)
        md = pf.metadata
        check_schema(pf.schema_arrow, TRAIN_COLUMNS, where=str(path),
                     fix="make shards with data/create_phase.py, or add the missing columns")
        column = next(i for i in range(md.num_columns) if md.schema.column(i).path == BUCKET_COLUMN)
        labels: dict[str | None, int] = {}
        codes = np.empty(md.num_rows, np.int32)
        to_read, start = [], 0
        for g in range(md.num_row_groups):
            group = md.row_group(g)
            n = group.num_rows
            stats = group.column(column).statistics
            if (stats is not None and stats.has_min_max and stats.has_null_count and stats.null_count == 0
                    and isinstance(stats.min, str) and stats.min == stats.max):
                codes[start:start + n] = labels.setdefault(stats.min, len(labels))
            else:
                to_read.append((g, start, n))
            start += n
        if to_read:
            # dictionary-encoded read: a few distinct strings, never one Python string per row
            pf = pq.ParquetFile(path, metadata=md, read_dictionary=[BUCKET_COLUMN])
            table = pf.read_row_groups([g for g, _, _ in to_read], columns=[BUCKET_COLUMN], use_threads=False)
            values = np.concatenate([_chunk_codes(chunk, labels) for chunk in table.column(0).chunks]
                                    or [np.empty(0, np.int32)])
            at = 0
            for _, start, n in to_read:
                codes[start:start + n] = values[at:at + n]
                at += n
    except DataError:
        raise
    except (OSError, pa.ArrowException, StopIteration) as e:
        raise DataError(f"{path}: not a readable parquet shard ({type(e).__name__}: {e}); "
                        "re-create it or move it out of the folder") from e
    return ShardBuckets(name=name, num_rows=md.num_rows, size_bytes=path.stat().st_size,
                        labels=list(labels), codes=codes, groups_read=len(to_read))


def _chunk_codes(chunk: pa.Array, labels: dict[str | None, int]) -> np.ndarray:
    """Codes into `labels` (extended in place) for one chunk of the bucket column."""
    if not pa.types.is_dictionary(chunk.type):
        chunk = chunk.dictionary_encode()
    lut = [labels.setdefault(v, len(labels)) for v in chunk.dictionary.to_pylist()]
    indices = chunk.indices
    if indices.null_count:
        indices = indices.fill_null(len(lut))
        lut.append(labels.setdefault(None, len(labels)))
    return np.array(lut, np.int32)[indices.to_numpy(zero_copy_only=False)]


@dataclass
class IndexSummary:
    path: Path
    shards: int
    rows: int
    """Rows indexed (in some bucket)."""
    skipped_rows: int
    buckets: dict[str, int]
    """'WxH' -> rows."""
    groups_read: int
    ignored_files: list[str]
    seconds: float

    def __str__(self) -> str:
        lines = [f"indexed {self.rows:,} rows of {self.shards} shards into {len(self.buckets)} buckets "
                 f"in {self.seconds:.2f} s -> {self.path}"]
        if self.skipped_rows:
            lines.append(f"skipped {self.skipped_rows:,} rows whose bucket_size is null or not 'WxH'")
        if self.ignored_files:
            shown = ", ".join(self.ignored_files[:5]) + (" ..." if len(self.ignored_files) > 5 else "")
            lines.append(f"ignored {len(self.ignored_files)} files that are not .parquet: {shown}")
        width = max(len(b) for b in self.buckets) if self.buckets else 0
        for bucket, n in sorted(self.buckets.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {bucket:>{width}}  {n:>12,}  {100 * n / max(self.rows, 1):5.1f} %")
        return "\n".join(lines)


def build_index(data_dir: str | Path, out: str | Path | None = None, *, workers: int | None = None,
                progress: bool = True) -> IndexSummary:
    """Index every shard under data_dir and write the index file (atomically). Raises DataError for an
    empty folder, an unreadable shard or a missing column, naming the shard."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    out = default_index_path(data_dir) if out is None else Path(out)
    shards, ignored = list_shards(data_dir)
    if not shards:
        extra = f" (found only: {', '.join(ignored[:5])})" if ignored else ""
        raise DataError(f"{data_dir}: no .parquet shards found{extra}; point --data at a folder made by "
                        "data/create_phase.py")
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(shards)))
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(shards), unit="shard", desc="indexing",
                                                    disable=None if progress else True) as bar:
        scanned = []
        for result in pool.map(lambda name: scan_shard(data_dir, name), shards):
            scanned.append(result)
            bar.update(1)

    # Shard-local labels -> one bucket table, sorted by (W, H) so the bucket order does not depend on
    # which shard a bucket was first seen in.
    sizes: dict[str, tuple[int, int]] = {}
    skipped_examples: set[str] = set()
    for shard in scanned:
        for label in shard.labels:
            try:
                sizes[label] = parse_bucket(label)
            except ValueError:
                skipped_examples.add(repr(label))
    buckets = sorted(set(sizes.values()))
    bucket_id = {size: k for k, size in enumerate(buckets)}
    invalid = len(buckets)  # sorts after every real bucket
    shard_rows = np.array([s.num_rows for s in scanned], np.int64)
    total = int(shard_rows.sum())
    code_dtype = np.int16 if invalid < 2**15 else np.int32
    ids = np.empty(total, code_dtype)
    at = 0
    for shard in scanned:
        lut = np.array([bucket_id[sizes[lb]] if lb in sizes else invalid for lb in shard.labels] or [invalid],
                       code_dtype)
        ids[at:at + shard.num_rows] = lut[shard.codes]
        at += shard.num_rows
    order = np.argsort(ids, kind="stable")                     # (total,) rows grouped by bucket, ascending
    counts = np.bincount(ids, minlength=invalid + 1)
    skipped = int(counts[invalid])
    indexed = total - skipped
    row_dtype = np.uint32 if total < 2**32 else np.int64
    arrays = {
        "rows": np.ascontiguousarray(order[:indexed], dtype=row_dtype),
        "bucket_offsets": np.concatenate([[0], np.cumsum(counts[:invalid])]).astype(np.int64),
        "shard_rows": shard_rows,
        "shard_bytes": np.array([s.size_bytes for s in scanned], np.int64),
    }
    names = [format_bucket(*b) for b in buckets]
    metadata = {
        "format": FORMAT, "version": str(VERSION), "shards": json.dumps(shards), "buckets": json.dumps(names),
        "skipped_rows": str(skipped), "skipped_examples": json.dumps(sorted(skipped_examples)[:10]),
    }
    with atomic_path(out) as tmp:
        save_file(arrays, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates it owner-only; every rank of a job may need to read it
    return IndexSummary(path=out, shards=len(shards), rows=indexed, skipped_rows=skipped,
                        buckets={n: int(c) for n, c in zip(names, counts[:invalid])},
                        groups_read=sum(s.groups_read for s in scanned), ignored_files=ignored,
                        seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_DTYPES = {"U32": np.uint32, "I64": np.int64, "I32": np.int32, "U64": np.uint64}


class BucketIndex:
    """An opened index. `rows` is memory-mapped; everything else is small and in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, base = _read_header(self.path)
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise DataError(f"{self.path} is not a bucket index (format {meta.get('format')!r}); build one "
                            f"with {command(INDEX_SCRIPT)} --data DIR --out FILE")
        if int(meta.get("version", -1)) != VERSION:
            raise DataError(f"{self.path}: index version {meta.get('version')} is not {VERSION}; rebuild it "
                            f"with {command(INDEX_SCRIPT)}")
        arrays = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
            begin, _ = info["data_offsets"]
            if name == "rows" and int(np.prod(shape)) > 0:
                arrays[name] = np.memmap(self.path, dtype=dtype, mode="r", offset=base + begin, shape=shape)
            else:
                arrays[name] = np.fromfile(self.path, dtype=dtype, count=int(np.prod(shape)),
                                           offset=base + begin).reshape(shape)
        self.rows: np.ndarray = arrays["rows"]
        """(N,) global row ids grouped by bucket (memory-mapped)."""
        self.bucket_offsets: np.ndarray = arrays["bucket_offsets"]
        self.shard_rows: np.ndarray = arrays["shard_rows"]
        self.shard_bytes: np.ndarray = arrays["shard_bytes"]
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.shards: list[str] = json.loads(meta["shards"])
        self.bucket_names: list[str] = json.loads(meta["buckets"])
        self.buckets: list[tuple[int, int]] = [parse_bucket(b) for b in self.bucket_names]
        self.skipped_rows = int(meta.get("skipped_rows", 0))

    @property
    def num_rows(self) -> int:
        """Rows in some bucket."""
        return int(self.rows.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """(K,) rows per bucket."""
        return np.diff(self.bucket_offsets)

    def bucket_rows(self, k: int) -> np.ndarray:
        """Global row ids of bucket k, ascending (a memory-mapped view)."""
        return self.rows[self.bucket_offsets[k]:self.bucket_offsets[k + 1]]

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids -> (shard index, row within that shard)."""
        rows = np.asarray(rows, np.int64)
        shard = np.searchsorted(self.shard_offsets, rows, side="right") - 1
        return shard, rows - self.shard_offsets[shard]

    def check_folder(self, data_dir: str | Path) -> None:
        """Raise DataError when the shards under data_dir are not the ones this index was built from
        (added, removed, or a different size): a stale index would silently read the wrong rows."""
        shards, _ = list_shards(data_dir)
        indexed = dict(zip(self.shards, self.shard_bytes.tolist()))
        present = set(shards)
        missing = [s for s in self.shards if s not in present]
        new = [s for s in shards if s not in indexed]
        changed = [s for s in shards if s in indexed and (Path(data_dir) / s).stat().st_size != indexed[s]]
        if missing or new or changed:
            parts = [f"{len(v)} {what} ({', '.join(v[:3])}{' ...' if len(v) > 3 else ''})"
                     for what, v in (("missing", missing), ("not indexed", new), ("changed size", changed))
                     if v]
            raise DataError(f"index {self.path} does not match the shards in {data_dir}: {'; '.join(parts)}. "
                            f"Rebuild it: {command(INDEX_SCRIPT)} --data {data_dir} --out {self.path}")


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts.

    Read by hand (the format is 8 bytes of length + JSON) because safetensors' numpy loader copies
    every array into memory, and the row array must be memory-mapped instead."""
    if not path.is_file():
        raise DataError(f"bucket index {path} not found; build it with {command(INDEX_SCRIPT)} --data DATASET_DIR "
                        f"--out {path}")
    with open(path, "rb") as f:
        raw = f.read(8)
        size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 2 <= size <= 100_000_000:
            raise DataError(f"{path} is not a bucket index (bad header); rebuild it with {command(INDEX_SCRIPT)}")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not a bucket index ({e}); rebuild it with {command(INDEX_SCRIPT)}") from e
    return header, 8 + size


def open_index(path: str | Path, data_dir: str | Path | None = None) -> BucketIndex:
    """Open an index and, when data_dir is given, check that it was built for that folder."""
    index = BucketIndex(path)
    if data_dir is not None:
        index.check_folder(data_dir)
    return index
