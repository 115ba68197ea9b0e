"""create_phase: true sizes and buckets, bad rows dropped and counted (never the shard), atomic
shards, reruns that skip finished work, and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd3.data.buckets import parse_bucket
from sd3.data.images import decode_rgb
from sd3.data.index import build_index, default_index_path, open_index
from sd3.data.phase import create_phase
from sd3.data.schema import DataError
from tests.data_helpers import SEED_SCHEMA, encode, photo, seed_row, write_shard

REPO = Path(__file__).resolve().parents[1]
RAW_SCHEMA = pa.schema([f for f in SEED_SCHEMA if f.name != "bucket_size"])


def raw_row(i: int, image: bytes | None, **extra) -> dict:
    row = {k: v for k, v in seed_row(i, 8, 8, image=b"x").items() if k in RAW_SCHEMA.names}
    return {**row, "image": image, "height": -1, "width": -1, **extra}


def mode_image(mode: str, w: int, h: int) -> bytes:
    img = photo(w, h)
    if mode == "I;16":
        return encode(Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257), "PNG")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    return encode(img.convert(mode), fmt)


GOOD = {  # id -> (image bytes, expected bucket at max_res 64, multiple 8)
    "rgb-land": (encode(photo(300, 200), "JPEG"), (64, 40)),       # 64 x 42.7 -> 40
    "rgb-port": (encode(photo(120, 160), "WEBP"), (48, 64)),
    "grey": (mode_image("L", 100, 100), (64, 64)),
    "rgba": (mode_image("RGBA", 200, 150), (64, 48)),
    "palette": (mode_image("P", 90, 60), (64, 40)),               # 64 x 42.7
    "cmyk": (mode_image("CMYK", 64, 64), (64, 64)),
    "16bit": (mode_image("I;16", 160, 90), (64, 40)),              # 64 x 36: halfway rounds up
    "small": (encode(photo(30, 20), "PNG"), (32, 24)),            # no upscaling: only snapped
    "extreme": (encode(photo(640, 10), "PNG"), (64, 8)),
}
BAD = {"empty": b"", "null": None, "truncated": encode(photo(100, 100), "JPEG")[:500], "text": b"hello world"}


def make_raw(root: Path) -> Path:
    rows = [raw_row(i, data, id=name, recaption=f"caption {name}" + ("!" * 100_000 if name == "grey" else ""))
            for i, (name, (data, _)) in enumerate(GOOD.items())]
    rows += [raw_row(100 + i, data, id=name) for i, (name, data) in enumerate(BAD.items())]
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    write_shard(root / "a.parquet", rows[:7], schema=RAW_SCHEMA)
    write_shard(root / "sub" / "b.parquet", rows[7:], schema=RAW_SCHEMA, row_group_size=2)
    return root


def test_true_sizes_buckets_and_kept_columns(tmp_path):
    raw = make_raw(tmp_path / "raw")
    report = create_phase(raw, tmp_path / "out", max_res=64, multiple=8, progress=False)
    assert not report.failed
    assert sum(s.rows_in for s in report.shards) == len(GOOD) + len(BAD)
    assert sum(s.rows_out for s in report.shards) == len(GOOD)
    text = str(report)
    assert "9 of 13 rows kept" in text and "2 empty images" in text and "2 undecodable images" in text
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / p) for p in ("a.parquet", "sub/b.parquet")])
    assert table.schema.field("bucket_size").type == pa.string()
    assert table.schema.field("image").type == pa.binary()
    for row in table.to_pylist():
        img = decode_rgb(row["image"])
        W, H = parse_bucket(row["bucket_size"])
        assert (row["width"], row["height"]) == (W, H) == (img.shape[2], img.shape[1])
        assert row["aspect_ratio"] == pytest.approx(W / H)
        assert GOOD[row["id"]][1] == (W, H), row["id"]
        assert row["recaption"].startswith(f"caption {row['id']}") and row["class"] == "astronaut"
    long_caption = next(r for r in table.to_pylist() if r["id"] == "grey")["recaption"]
    assert len(long_caption) > 100_000                             # captions are carried over untouched


def test_row_groups_never_mix_buckets_so_the_index_reads_only_footers(tmp_path):
    raw = tmp_path / "raw"
    sizes = [(64, 64), (64, 48), (48, 64)]
    rows = [raw_row(i, encode(photo(*sizes[i % 3], seed=i), "JPEG")) for i in range(40)]
    write_shard(raw / "a.parquet", rows, schema=RAW_SCHEMA)
    create_phase(raw, tmp_path / "out", max_res=64, multiple=8, row_group_rows=4, progress=False)
    md = pq.read_metadata(tmp_path / "out" / "a.parquet")
    column = md.schema.names.index("bucket_size")
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(column).statistics
        assert stats.min == stats.max and md.row_group(g).num_rows <= 4
    summary = build_index(tmp_path / "out", progress=False)
    assert summary.groups_read == 0 and summary.rows == 40


def test_unreadable_shard_is_reported_and_others_finish(tmp_path):
    raw = make_raw(tmp_path / "raw")
    good = raw / "c.parquet"
    write_shard(good, [raw_row(0, encode(photo(64, 64), "JPEG"))], schema=RAW_SCHEMA)
    truncated = raw / "sub" / "b.parquet"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (raw / "notes.txt").write_text("not a shard")
    report = create_phase(raw, tmp_path / "out", max_res=64, multiple=8, progress=False)
    assert [s.name.endswith("b.parquet") for s in report.failed] == [True]
    assert "FAILED" in str(report) and "b.parquet" in str(report)
    assert (tmp_path / "out" / "a.parquet").is_file() and (tmp_path / "out" / "c.parquet").is_file()
    assert not (tmp_path / "out" / "sub" / "b.parquet").exists()
    assert not list((tmp_path / "out").rglob(".*tmp*"))            # no half-written files left


def test_rerun_skips_finished_shards(tmp_path):
    raw = make_raw(tmp_path / "raw")
    out = tmp_path / "out"
    create_phase(raw, out, max_res=64, multiple=8, progress=False)
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    (out / "a.parquet").unlink()
    (out / ".a.parquet.tmp-12345").write_bytes(b"half")            # an interrupted earlier run
    report = create_phase(raw, out, max_res=64, multiple=8, progress=False)
    assert sorted(s.status for s in report.shards) == ["done", "skipped"]
    assert (out / "sub" / "b.parquet").stat().st_mtime_ns == first[out / "sub" / "b.parquet"]
    assert (out / "a.parquet").is_file() and not (out / ".a.parquet.tmp-12345").exists()


def test_argument_and_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.parquet shards found"):
        create_phase(tmp_path / "empty", tmp_path / "out", max_res=64, multiple=8)
    with pytest.raises(DataError, match="--format"):
        create_phase(tmp_path / "empty", tmp_path / "out", max_res=64, fmt="gif")
    with pytest.raises(DataError, match="--max-res 8 must be at least --patch 16"):
        create_phase(tmp_path / "empty", tmp_path / "out", max_res=8, multiple=16)
    schema = pa.schema([("caption", pa.string())])
    write_shard(tmp_path / "nocol" / "a.parquet", [{"caption": "x"}], schema=schema)
    report = create_phase(tmp_path / "nocol", tmp_path / "out2", max_res=64, multiple=8, progress=False)
    assert "missing column 'image'" in report.failed[0].error


@pytest.mark.slow
def test_command_line_with_worker_processes(tmp_path):
    raw = make_raw(tmp_path / "raw")
    out = tmp_path / "out"
    cmd = [sys.executable, "data/create_phase.py", "--input", str(raw), "--output", str(out),
           "--max-res", "64", "--patch", "8", "--workers", "2", "--format", "png"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 shards written" in result.stdout and "9 of 13 rows kept" in result.stdout
    index = subprocess.run([sys.executable, "src/create_indices.py", "--data", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert index.returncode == 0, index.stderr
    assert open_index(default_index_path(out), out).num_rows == 9
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 already done" in again.stdout
