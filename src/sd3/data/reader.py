"""Fetch the rows of a batch from parquet shards: only the needed columns, whole row groups at a time
(parquet's unit of random access), each row group once per call, open files cached per thread.

Reads are cheap when row groups are small: data/create_phase.py writes 64-row groups (about 1 MB at
256 px), so one random row costs about one megabyte of I/O (tests/benchmarks/bench_reader.py: about
2,000 random rows/s per thread from the page cache on this machine). A shard that cannot be read (truncated
since it was indexed, changed, missing a column) never raises here: its rows come back as failed,
with the reason, and the caller replaces them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sd3.data.index import BucketIndex
from sd3.data.schema import READ_COLUMNS, DataError, check_schema, image_bytes


@dataclass
class Rows:
    """Column values of the requested rows, in request order; failed rows hold None."""

    columns: dict[str, list]
    failed: np.ndarray
    """(B,) bool: the row could not be read (its shard is unreadable)."""
    errors: dict[str, str] = field(default_factory=dict)
    """shard -> reason, for the shards that failed in this call."""


class ShardReader:
    """Reads rows by global row id from the shards of an index. Thread-safe."""

    def __init__(self, data_dir: str | Path, index: BucketIndex, *, max_open_per_thread: int = 64,
                 max_footers: int = 1024, memory_map: bool = False):
        self.data_dir = Path(data_dir)
        self.index = index
        self.max_open, self.max_footers, self.memory_map = max_open_per_thread, max_footers, memory_map
        self._local = threading.local()
        self._lock = threading.Lock()
        # shard -> (parsed footer, (G+1,) first row of each row group), shared by all threads: a shard
        # opened again (by another thread, or after its handle was evicted) skips the footer parse.
        self._footers: OrderedDict[int, tuple[pq.FileMetaData, np.ndarray]] = OrderedDict()

    def read(self, rows: np.ndarray | Sequence[int], columns: Sequence[str]) -> Rows:
        """Values of `columns` for each global row id in `rows` (duplicates allowed)."""
        rows = np.asarray(rows, np.int64)
        out = {c: [None] * len(rows) for c in columns}
        failed = np.zeros(len(rows), bool)
        errors: dict[str, str] = {}
        if len(rows) == 0:
            return Rows(out, failed, errors)
        if rows.min() < 0 or rows.max() >= self.index.shard_offsets[-1]:
            raise IndexError(f"row ids must be in 0..{self.index.shard_offsets[-1] - 1}")
        shard_of, local = self.index.locate(rows)
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)             # positions in the request
            try:
                self._read_shard(int(shard), local[where], where, columns, out)
            except (OSError, pa.ArrowException, DataError) as e:
                failed[where] = True
                errors[self.index.shards[shard]] = f"{type(e).__name__}: {e}"
                self._forget(int(shard))                          # reopen next time: it may be repaired
        return Rows(out, failed, errors)

    def _read_shard(self, shard: int, local: np.ndarray, where: np.ndarray, columns: Sequence[str],
                    out: dict[str, list]) -> None:
        pf, starts = self._open(shard)
        group = np.searchsorted(starts, local, side="right") - 1
        needed = np.unique(group)
        # One read of all the needed row groups; positions inside the concatenation by group.
        table = pf.read_row_groups(needed.tolist(), columns=list(columns), use_threads=False)
        sizes = starts[needed + 1] - starts[needed]
        concat_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        take = concat_start[np.searchsorted(needed, group)] + (local - starts[group])
        picked = table.take(pa.array(take))
        for c in columns:
            values = image_bytes(picked.column(c)) if c == "image" else picked.column(c).to_pylist()
            for slot, v in zip(where.tolist(), values):
                out[c][slot] = v

    def _open(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """This thread's open ParquetFile for a shard (LRU of max_open), and its row-group starts.

        No pre-buffering: for one small row group it only adds work (measured here, a random 64-row
        group read from the page cache: 0.6 ms without, 0.9 ms with). Memory-mapping would save a little
        more, but a shard overwritten in place while mapped kills the process with SIGBUS, so it is
        off by default; a batch of 420 random rows reads at about 2,000 rows/s per thread either way."""
        files: OrderedDict[int, pq.ParquetFile] = self._local.__dict__.setdefault("files", OrderedDict())
        footer = self._footer(shard)
        if shard in files:
            files.move_to_end(shard)
            return files[shard], footer[1]
        path = self.data_dir / self.index.shards[shard]
        pf = pq.ParquetFile(path, metadata=footer[0], memory_map=self.memory_map, pre_buffer=False)
        files[shard] = pf
        while len(files) > self.max_open:
            files.popitem(last=False)[1].close()
        return pf, footer[1]

    def _footer(self, shard: int) -> tuple[pq.FileMetaData, np.ndarray]:
        """The parsed footer of a shard, checked against the index once."""
        with self._lock:
            if shard in self._footers:
                self._footers.move_to_end(shard)
                return self._footers[shard]
        path = self.data_dir / self.index.shards[shard]
        md = pq.read_metadata(path)
        check_schema(md.schema.to_arrow_schema(), READ_COLUMNS, where=str(path),
                     fix="rebuild the shard with data/create_phase.py")
        expected = int(self.index.shard_rows[shard])
        if md.num_rows != expected:
            raise DataError(f"{path} has {md.num_rows} rows but the index says {expected}: the shard changed "
                            "since indexing; rerun src/create_indices.py")
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        footer = (md, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        with self._lock:
            self._footers[shard] = footer
            while len(self._footers) > self.max_footers:
                self._footers.popitem(last=False)
        return footer

    def _forget(self, shard: int) -> None:
        files = self._local.__dict__.get("files", {})
        pf = files.pop(shard, None)
        if pf is not None:
            pf.close()
        with self._lock:
            self._footers.pop(shard, None)
