"""The bucket index: exact against a full read of the bucket column, fast path = slow path, clear errors
for every kind of bad folder, stale-index detection, and the command line as the README shows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from sd3.data.buckets import parse_bucket
from sd3.data.index import BucketIndex, build_index, default_index_path, list_shards, open_index, scan_shard
from sd3.data.schema import DataError
from tests.data_helpers import SEED_SCHEMA, bucketed_dataset, demo_dataset, seed_row, write_shard

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (64, 48), (48, 64), (64, 40)]


def ground_truth(data_dir: Path) -> dict[tuple[int, int], list[int]]:
    """bucket -> global row ids, from a plain read of every shard's bucket column."""
    shards, _ = list_shards(data_dir)
    table = pa.concat_tables([pq.read_table(data_dir / s, columns=["bucket_size"]) for s in shards])
    out: dict[tuple[int, int], list[int]] = {}
    for row, value in enumerate(table.column(0).to_pylist()):
        out.setdefault(parse_bucket(value), []).append(row)
    return out


def assert_index_matches(index: BucketIndex, truth: dict) -> None:
    assert sorted(index.buckets) == index.buckets == sorted(truth)
    for k, size in enumerate(index.buckets):
        assert index.bucket_rows(k).tolist() == truth[size]


def test_index_is_exact_on_seed_like_shards(tmp_path):
    data = bucketed_dataset(tmp_path / "d", SIZES)               # row groups mix buckets: column reads
    summary = build_index(data, progress=False)
    index = open_index(default_index_path(data), data)
    assert_index_matches(index, ground_truth(data))
    assert summary.rows == index.num_rows == 4 * 12 and summary.groups_read > 0
    assert index.shard_rows.sum() == 48 and index.shards == ["part-000.parquet", "part-001.parquet",
                                                             "part-002.parquet"]
    shard, local = index.locate(np.array([0, 15, 16, 47]))
    assert shard.tolist() == [0, 0, 1, 2] and local.tolist() == [0, 15, 0, 15]


def test_footer_statistics_path_equals_column_read(tmp_path):
    # create_phase output: single-bucket row groups, indexed from the footer alone
    demo = demo_dataset()
    for name in list_shards(demo)[0]:
        assert scan_shard(demo, name).groups_read == 0
    summary = build_index(demo, tmp_path / "idx.safetensors", progress=False)
    assert summary.groups_read == 0
    assert_index_matches(BucketIndex(tmp_path / "idx.safetensors"), ground_truth(demo))


def test_index_file_is_plain_safetensors(tmp_path):
    data = bucketed_dataset(tmp_path / "d", SIZES, shards=2)
    build_index(data, progress=False)
    arrays = load_file(str(default_index_path(data)))
    index = BucketIndex(default_index_path(data))
    assert set(arrays) == {"rows", "bucket_offsets", "shard_rows", "shard_bytes"}
    assert np.array_equal(arrays["rows"], index.rows) and isinstance(index.rows, np.memmap)
    assert arrays["bucket_offsets"][-1] == len(arrays["rows"])


def test_seed_files_with_swapped_sizes_index_by_bucket_size(tmp_path):
    rows = [seed_row(i, 64, 48, swapped=True) for i in range(5)]  # height/width columns swapped
    write_shard(tmp_path / "d" / "a.parquet", rows)
    build_index(tmp_path / "d", progress=False)
    index = open_index(default_index_path(tmp_path / "d"))
    assert index.buckets == [(64, 48)] and index.num_rows == 5


def test_invalid_and_null_buckets_are_counted_not_indexed(tmp_path):
    rows = [seed_row(0, 64, 64), seed_row(1, 64, 64, bucket="garbage"), seed_row(2, 64, 48)]
    rows.append({**seed_row(3, 64, 64), "bucket_size": None})
    write_shard(tmp_path / "d" / "a.parquet", rows)
    summary = build_index(tmp_path / "d", progress=False)
    index = open_index(default_index_path(tmp_path / "d"))
    assert summary.skipped_rows == index.skipped_rows == 2
    assert index.num_rows == 2 and index.bucket_rows(index.buckets.index((64, 48))).tolist() == [2]
    assert "skipped 2 rows" in str(summary)


def test_empty_folder_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.parquet shards found"):
        build_index(tmp_path / "empty", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_index(tmp_path / "nope", progress=False)
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"found only: notes\.txt"):
        build_index(tmp_path / "empty", progress=False)


def test_non_parquet_files_are_ignored_and_reported(tmp_path):
    data = bucketed_dataset(tmp_path / "d", SIZES, shards=2)
    (data / "README.txt").write_text("about this data")
    (data / ".half-written.parquet").write_bytes(b"PAR1")     # hidden: a shard still being written
    summary = build_index(data, progress=False)
    assert summary.ignored_files == ["README.txt"] and summary.shards == 2
    assert "ignored 1 files that are not .parquet: README.txt" in str(summary)


@pytest.mark.parametrize("damage", ["not_parquet", "truncated", "empty_file"])
def test_unreadable_shard_is_named(tmp_path, damage):
    data = bucketed_dataset(tmp_path / "d", SIZES, shards=2)
    bad = data / "part-001.parquet"
    if damage == "not_parquet":
        bad.write_bytes(b"this is a csv file, honestly\n1,2,3\n")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataError, match=r"part-001\.parquet: not a readable parquet shard"):
        build_index(data, progress=False)
    assert not default_index_path(data).exists()


def test_missing_and_mistyped_columns_are_listed(tmp_path):
    schema = pa.schema([f for f in SEED_SCHEMA if f.name not in ("bucket_size", "recaption_short")])
    rows = [{k: v for k, v in seed_row(0, 64, 64).items() if k in schema.names}]
    write_shard(tmp_path / "d" / "a.parquet", rows, schema=schema)
    with pytest.raises(DataError) as err:
        build_index(tmp_path / "d", progress=False)
    assert "missing column 'bucket_size'" in str(err.value)
    assert "missing column 'recaption_short'" in str(err.value)
    assert "a.parquet" in str(err.value)
    schema = SEED_SCHEMA.set(SEED_SCHEMA.get_field_index("bucket_size"), pa.field("bucket_size", pa.int64()))
    write_shard(tmp_path / "e" / "b.parquet", [{**seed_row(0, 64, 64), "bucket_size": 64}], schema=schema)
    with pytest.raises(DataError, match="column 'bucket_size' is int64, expected string"):
        build_index(tmp_path / "e", progress=False)


def test_index_for_a_different_folder_is_detected(tmp_path):
    a = bucketed_dataset(tmp_path / "a", SIZES, shards=2)
    b = bucketed_dataset(tmp_path / "b", SIZES, shards=3)
    build_index(a, progress=False)
    with pytest.raises(DataError, match=r"1 not indexed \(part-002\.parquet\).*Rebuild it"):
        open_index(default_index_path(a), b)
    (a / "part-001.parquet").unlink()
    with pytest.raises(DataError, match=r"1 missing \(part-001\.parquet\)"):
        open_index(default_index_path(a), a)
    write_shard(a / "part-001.parquet", [seed_row(0, 64, 64)])   # same name, other contents
    with pytest.raises(DataError, match="changed size"):
        open_index(default_index_path(a), a)


def test_not_an_index(tmp_path):
    """The command a message prints runs as printed: this interpreter, the script from where we stand."""
    with pytest.raises(DataError, match=r"not found; build it with \S*python\S* \S*src/create_indices\.py") as info:
        BucketIndex(tmp_path / "missing.safetensors")
    interpreter, script = str(info.value).split("build it with ")[1].split()[:2]
    assert Path(interpreter).resolve() == Path(sys.executable).resolve() and Path(script).is_file()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="is not a bucket index"):
        BucketIndex(tmp_path / "junk.safetensors")


def test_shards_in_subfolders_are_found_in_sorted_order(tmp_path):
    write_shard(tmp_path / "d" / "b" / "x.parquet", [seed_row(0, 64, 64)])
    write_shard(tmp_path / "d" / "a" / "y.parquet", [seed_row(1, 64, 48)])
    build_index(tmp_path / "d", progress=False)
    index = open_index(default_index_path(tmp_path / "d"), tmp_path / "d")
    assert index.shards == ["a/y.parquet", "b/x.parquet"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_command_line_as_in_the_readme(tmp_path):
    data = bucketed_dataset(tmp_path / "d", SIZES, shards=2)
    out = tmp_path / "index.safetensors"
    result = _run("src/create_indices.py", "--data", str(data), "--out", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "indexed 48 rows of 2 shards into 4 buckets" in result.stdout
    assert open_index(out, data).num_rows == 48
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run("src/create_indices.py", "--data", str(empty))
    assert result.returncode == 2 and "no .parquet shards found" in result.stderr
    assert "Traceback" not in result.stderr


def test_command_line_does_not_import_torch(tmp_path):
    data = bucketed_dataset(tmp_path / "d", SIZES, shards=1)
    code = ("import sys; sys.path.insert(0, 'src'); import create_indices; "
            f"assert create_indices.main(['--data', {str(data)!r}, '--quiet']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
