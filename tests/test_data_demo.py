"""The demo dataset: real photos, distinct captions, several buckets, idempotent and race-safe."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd3.config.presets import DEMO_CAPTIONS, DEMO_PROMPTS
from sd3.data.demo import ensure_demo_dataset
from sd3.data.index import default_index_path, list_shards, open_index
from sd3.data.schema import COLUMNS
from tests.data_helpers import demo_dataset

REPO = Path(__file__).resolve().parents[1]


def test_demo_is_real_varied_and_in_the_seed_schema():
    root = demo_dataset()
    index = open_index(default_index_path(root), root)
    table = pa.concat_tables([pq.read_table(root / s) for s in list_shards(root)[0]])
    assert set(COLUMNS) <= set(table.schema.names)
    assert len(set(table.column("class").to_pylist())) == len(DEMO_CAPTIONS) == 10
    assert len(set(table.column("id").to_pylist())) == table.num_rows == index.num_rows
    sizes = set(index.buckets)
    assert {(64, 64), (64, 48), (48, 64)} <= sizes and len(sizes) >= 4    # square, landscape and portrait
    for long, short in DEMO_CAPTIONS.values():
        assert len(short) < len(long) and short.endswith(".") and long.endswith(".")
    assert len(set(DEMO_PROMPTS)) == 10
    assert set(DEMO_PROMPTS) <= set(table.column("recaption_short").to_pylist())
    # the raw shards beside it hold full-size crops in several PIL modes, as users' files do
    raw = pa.concat_tables([pq.read_table(p, columns=["image", "width"])
                            for p in (root.parent / "raw").glob("*")])
    modes = {Image.open(io.BytesIO(data)).mode for data in raw.column("image").to_pylist()}
    assert modes == {"RGB", "L", "CMYK", "RGBA"} and max(raw.column("width").to_pylist()) > 300


def test_ensure_is_idempotent():
    root = demo_dataset()
    before = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    assert ensure_demo_dataset(root, max_res=64, multiple=8) == root
    assert {p: p.stat().st_mtime_ns for p in root.iterdir()} == before


@pytest.mark.slow
def test_racing_builders_leave_one_whole_dataset(tmp_path):
    target = tmp_path / "demo" / "64"
    errors = []

    def build() -> None:
        try:
            ensure_demo_dataset(target, max_res=64, multiple=8)
        except Exception as e:  # the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors
    assert open_index(default_index_path(target), target).num_rows == 180
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["64", "raw"]  # no temporary folders


@pytest.mark.slow
def test_make_demo_dataset_command_line(tmp_path):
    result = subprocess.run([sys.executable, "data/make_demo_dataset.py", "--out", str(tmp_path / "demo"),
                             "--max-res", "32", "--multiple", "8"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "180 rows in 4 shards" in result.stdout
    index = open_index(default_index_path(tmp_path / "demo" / "32"), tmp_path / "demo" / "32")
    assert max(max(b) for b in index.buckets) == 32
