"""BucketDataset and the shard reader: batches of one bucket, deterministic, thread-safe, full even
when rows are corrupt or a shard breaks, held-out validation rows, clear errors on open."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sd3.config import DataConfig
from sd3.data import BucketDataset, RawBatch
from sd3.data.images import to_model_range
from sd3.data.index import build_index, default_index_path, list_shards, open_index
from sd3.data.reader import ShardReader
from sd3.data.schema import DataError
from tests.data_helpers import demo_dataset, encode, photo, seed_row, write_shard


def open_demo(tmp_path: Path | None = None, **overrides) -> BucketDataset:
    root = demo_dataset()
    if tmp_path is not None:                                      # a private copy the test may change
        root = Path(shutil.copytree(root, tmp_path / "64"))
    cfg = DataConfig(dataset=str(root), batch_size=4, **overrides)
    return BucketDataset(cfg, seed=0, num_model_ranks=2, max_res=64, multiple=8)


def test_load_returns_one_bucket_in_model_range():
    ds = open_demo()
    assert ds.steps_per_epoch > 0
    for step in range(ds.steps_per_epoch + 2):
        raw = ds.load(step)
        W, H = ds.bucket_of(step)
        assert isinstance(raw, RawBatch) and raw.bucket == (W, H) and raw.step == step
        assert raw.images.shape == (8, 3, H, W) and raw.images.dtype == torch.float32
        assert raw.images.min() >= -1.0 and raw.images.max() <= 1.0 and raw.images.std() > 0.1
        assert len(raw.captions) == 8 and all(raw.captions) and raw.rows.dtype == np.int64
        assert np.array_equal(raw.rows, ds.rows_of(step))
        assert raw.stats == {}                                    # the demo has no bad rows


def test_model_rank_slices_concatenate_and_are_deterministic():
    ds = open_demo()
    both = ds.load(3, model_ranks=[0, 1])
    r0, r1 = ds.load(3, model_ranks=[0]), ds.load(3, model_ranks=[1])
    assert torch.equal(both.images, torch.cat([r0.images, r1.images]))
    assert both.captions == r0.captions + r1.captions
    assert np.array_equal(both.rows, np.concatenate([r0.rows, r1.rows]))
    raw8 = ds.load(3, model_ranks=[0, 1], dtype=torch.uint8)
    assert raw8.images.dtype == torch.uint8 and torch.equal(to_model_range(raw8.images), both.images)
    swapped = ds.load(3, model_ranks=[1, 0])
    assert swapped.captions == r1.captions + r0.captions
    again = open_demo().load(3, model_ranks=[0, 1])              # a fresh process would get the same
    assert torch.equal(again.images, both.images) and again.captions == both.captions
    with pytest.raises(ValueError, match="model rank index 2"):
        ds.load(0, model_ranks=[2])


def test_caption_choice_follows_the_probability_with_fallback():
    long_only = open_demo(short_caption_prob=0.0)
    short_only = open_demo(short_caption_prob=1.0)
    from sd3.config.presets import DEMO_CAPTIONS

    longs = {v[0] for v in DEMO_CAPTIONS.values()}
    shorts = {v[1] for v in DEMO_CAPTIONS.values()}
    assert set(long_only.load(0).captions) <= longs
    assert set(short_only.load(0).captions) <= shorts
    mixed = open_demo(short_caption_prob=0.5)
    captions = [c for t in range(mixed.steps_per_epoch) for c in mixed.load(t).captions]
    share = np.mean([c in shorts for c in captions])
    assert 0.3 < share < 0.7


def test_concurrent_loads_equal_sequential_loads():
    ds = open_demo()
    steps = list(range(12))
    expected = {t: ds.load(t) for t in steps}
    shared = open_demo()
    results: dict[int, RawBatch] = {}

    def work(offset: int) -> None:
        for t in steps[offset::3]:
            results[t] = shared.load(t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert set(results) == set(steps)
    for t in steps:
        assert torch.equal(results[t].images, expected[t].images)
        assert results[t].captions == expected[t].captions


def test_describe_reports_rows_buckets_and_small_bucket_policy():
    text = open_demo().describe()
    assert "180 rows in 5 buckets" in text and "64x64: 60" in text
    assert "Global batch 8 = 4 per model rank x 2 model ranks" in text and "Small buckets (drop)" in text


# -- bad rows ---------------------------------------------------------------------------------------------

BAD_IMAGES = {
    "empty": b"",
    "truncated": encode(photo(32, 32), "JPEG")[:300],
    "not_an_image": b"<html>404 not found</html>",
    "null": None,
}


def corrupt_dataset(root: Path, bad_every: int = 3) -> tuple[Path, set[int]]:
    """Two buckets of real 32 px JPEGs; every `bad_every`-th row's image is broken in one of the ways
    above."""
    rows, bad = [], set()
    kinds = list(BAD_IMAGES.values())
    for i in range(48):
        w, h = (32, 32) if i % 2 else (32, 24)
        row = seed_row(i, w, h)
        if i % bad_every == 0:
            row["image"] = kinds[(i // bad_every) % len(kinds)]
            bad.add(i)
        rows.append(row)
    write_shard(root / "a.parquet", rows[:24], row_group_size=5)
    write_shard(root / "b.parquet", rows[24:], row_group_size=7)
    build_index(root, progress=False)
    return root, bad


def test_corrupt_rows_are_counted_and_replaced_from_the_same_bucket(tmp_path):
    root, bad = corrupt_dataset(tmp_path / "d")
    cfg = DataConfig(dataset=str(root), batch_size=4)
    ds = BucketDataset(cfg, seed=0, num_model_ranks=2, max_res=64, multiple=8)
    index = open_index(default_index_path(root))
    seen_bad = 0
    for step in range(ds.steps_per_epoch):
        raw = ds.load(step)
        k = index.buckets.index(raw.bucket)
        assert raw.images.shape[0] == 8                            # always a full batch
        assert np.isin(raw.rows, index.bucket_rows(k)).all()       # replacements come from the same bucket
        assert not set(raw.rows.tolist()) & bad                    # and decode
        planned_bad = len(set(ds.rows_of(step).tolist()) & bad)
        assert raw.stats.get("corrupt", 0) >= planned_bad and raw.stats.get("replaced", 0) == planned_bad
        seen_bad += planned_bad
        again = ds.load(step)
        assert np.array_equal(again.rows, raw.rows) and torch.equal(again.images, raw.images)
    assert seen_bad > 0 and ds.totals()["replaced"] >= seen_bad


def test_a_bucket_with_no_decodable_row_is_a_clear_error_not_a_hang(tmp_path):
    rows = [seed_row(i, 32, 32, image=b"broken") for i in range(8)]
    write_shard(tmp_path / "d" / "a.parquet", rows)
    build_index(tmp_path / "d", progress=False)
    ds = BucketDataset(DataConfig(dataset=str(tmp_path / "d"), batch_size=4), seed=0, num_model_ranks=2,
                       max_res=64, multiple=8)
    with pytest.raises(DataError, match="no row of bucket 32x32 could be decoded"):
        ds.load(0)


def test_a_shard_broken_after_indexing_is_replaced_not_raised(tmp_path, caplog):
    ds = open_demo(tmp_path)
    shard = ds.data_dir / "demo-01.parquet"
    size = shard.stat().st_size
    shard.write_bytes(b"\0" * size)                                # same size: passes the open-time check
    shard_rows = set(range(*ds.index.shard_offsets[1:3].tolist()))
    hit = next(t for t in range(ds.steps_per_epoch) if set(ds.rows_of(t).tolist()) & shard_rows)
    raw = ds.load(hit)
    assert raw.images.shape[0] == 8 and raw.stats["unreadable"] > 0 and raw.stats["replaced"] > 0
    assert not set(raw.rows.tolist()) & shard_rows
    assert "demo-01.parquet could not be read" in caplog.text


def test_captions_null_empty_and_huge(tmp_path):
    huge = "a very long caption " * 5000                          # 100 KB
    rows = [seed_row(0, 32, 32, long="", short="short only"), seed_row(1, 32, 32, long="long only", short=""),
            {**seed_row(2, 32, 32), "recaption": None, "recaption_short": None},
            seed_row(3, 32, 32, long=huge, short=huge)]
    write_shard(tmp_path / "d" / "a.parquet", rows)
    build_index(tmp_path / "d", progress=False)
    index = open_index(default_index_path(tmp_path / "d"))
    reader = ShardReader(tmp_path / "d", index)
    got = reader.read(np.array([3, 0, 0, 2]), ["recaption", "recaption_short"])
    assert got.columns["recaption_short"] == [huge, "short only", "short only", None] and not got.failed.any()
    for prob in (0.0, 1.0):
        cfg = DataConfig(dataset=str(tmp_path / "d"), batch_size=4, short_caption_prob=prob,
                         small_buckets="fill")
        ds = BucketDataset(cfg, seed=0, num_model_ranks=1, max_res=64, multiple=8)
        raw = ds.load(0)
        by_row = dict(zip(raw.rows.tolist(), raw.captions))
        assert by_row[0] == "short only" and by_row[1] == "long only" and by_row[2] == ""
        assert 3990 < len(by_row[3]) <= 4000 and huge.startswith(by_row[3])
        assert raw.stats["caption_fallback"] == 1 and raw.stats["empty_caption"] == 1
        assert raw.stats["caption_truncated"] == 1


def test_reader_reads_only_requested_rows_in_request_order():
    root = demo_dataset()
    index = open_index(default_index_path(root), root)
    reader = ShardReader(root, index)
    rows = np.array([179, 0, 50, 50, 91, 3])
    got = reader.read(rows, ["id", "image"])
    truth = [pq.read_table(root / s, columns=["id", "image"]) for s in list_shards(root)[0]]
    ids = [i for t in truth for i in t.column("id").to_pylist()]
    images = [i for t in truth for i in t.column("image").to_pylist()]
    assert got.columns["id"] == [ids[r] for r in rows]
    assert got.columns["image"] == [images[r] for r in rows]
    assert set(got.columns) == {"id", "image"}
    few_handles = ShardReader(root, index, max_open_per_thread=1)   # evicts open files as it goes
    for _ in range(2):
        assert few_handles.read(rows, ["id"]).columns["id"] == got.columns["id"]


# -- held-out rows ----------------------------------------------------------------------------------------

def test_holdout_rows_are_excluded_and_batched_by_bucket():
    ds = open_demo(val_rows=20)
    held = set(ds.holdout.tolist())
    assert len(held) == 20
    trained = {r for t in range(2 * ds.steps_per_epoch) for r in ds.rows_of(t).tolist()}
    assert not trained & held
    batches = ds.holdout_batches(3)
    assert sum(b.size for b in batches) == 20 and all(b.size <= 3 and b.step == -1 for b in batches)
    for b in batches:
        k = ds.index.buckets.index(b.bucket)
        assert np.isin(b.rows, ds.index.bucket_rows(k)).all() and b.images.shape[-2:] == b.bucket[::-1]
    again = open_demo(val_rows=20).holdout_batches(3)
    assert [b.captions for b in again] == [b.captions for b in batches]
    assert "20 rows held out for validation" in ds.describe()
    with pytest.raises(DataError, match="leaves no training rows"):
        open_demo(val_rows=1000)


# -- opening ----------------------------------------------------------------------------------------------

def test_buckets_larger_than_max_res_are_excluded_and_reported(tmp_path):
    rows = [seed_row(i, 32, 32) for i in range(8)] + [seed_row(8 + i, 128, 64) for i in range(8)]
    write_shard(tmp_path / "d" / "a.parquet", rows)
    build_index(tmp_path / "d", progress=False)
    cfg = DataConfig(dataset=str(tmp_path / "d"), batch_size=4)
    ds = BucketDataset(cfg, seed=0, num_model_ranks=2, max_res=64, multiple=8)
    assert all(ds.bucket_of(t) == (32, 32) for t in range(ds.steps_per_epoch))
    assert "Excluded 8 rows in 1 buckets" in ds.describe()
    assert "128x64 (a side exceeds max_res=64)" in ds.describe()
    with pytest.raises(DataError, match=r"no bucket fits max_res=16.*create_phase.py --max-res 16"):
        BucketDataset(cfg, seed=0, num_model_ranks=2, max_res=16, multiple=8)


def test_image_size_disagreeing_with_its_bucket_is_resized_and_counted(tmp_path):
    # seed files: sizes swapped in the columns, and here even the image is transposed
    rows = [seed_row(i, 32, 24, swapped=True, bucket="24x32") for i in range(8)]
    write_shard(tmp_path / "d" / "a.parquet", rows)
    build_index(tmp_path / "d", progress=False)
    ds = BucketDataset(DataConfig(dataset=str(tmp_path / "d"), batch_size=4), seed=0, num_model_ranks=2,
                       max_res=64, multiple=8)
    raw = ds.load(0)
    assert raw.images.shape == (8, 3, 32, 24) and raw.stats["resized"] == 8


def test_open_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"is not a folder.*create_demo=true"):
        BucketDataset(DataConfig(dataset=str(tmp_path / "none")), seed=0, num_model_ranks=1, max_res=64,
                      multiple=8)
    ds_dir = Path(shutil.copytree(demo_dataset(), tmp_path / "copy"))
    default_index_path(ds_dir).unlink()
    with pytest.raises(DataError, match=r"not found; build it with \S*python\S* \S*src/create_indices\.py"):
        BucketDataset(DataConfig(dataset=str(ds_dir)), seed=0, num_model_ranks=1, max_res=64, multiple=8)
    other = Path(shutil.copytree(demo_dataset(), tmp_path / "other"))
    (other / "demo-00.parquet").unlink()
    with pytest.raises(DataError, match=r"does not match the shards.*1 missing \(demo-00.parquet\)"):
        BucketDataset(DataConfig(dataset=str(other)), seed=0, num_model_ranks=1, max_res=64, multiple=8)


def test_create_demo_builds_a_missing_dataset_only_in_its_own_folder(tmp_path, monkeypatch):
    """The demo photos are built where the tiny preset keeps them, never at another missing path (a
    mistyped --data.dataset must fail, not train on the demo)."""
    from sd3.config import preset
    from sd3.encode import stand_ins

    monkeypatch.setattr(stand_ins, "DEMO_DIR", str(tmp_path / "demo"))
    cfg = preset("tiny")
    cfg.data = DataConfig(dataset=str(tmp_path / "elsewhere" / "64"), batch_size=4, create_demo=True)
    assert stand_ins.ensure(cfg, encoders=False, log=lambda _: None) == []
    with pytest.raises(DataError, match="is not a folder"):
        BucketDataset(cfg.data, seed=0, num_model_ranks=2, max_res=64, multiple=8)
    cfg.data.dataset = str(tmp_path / "demo" / "64")
    said = []
    assert stand_ins.ensure(cfg, encoders=False, log=said.append) == [tmp_path / "demo" / "64"]
    assert "built the demo dataset" in said[0]
    ds = BucketDataset(cfg.data, seed=0, num_model_ranks=2, max_res=64, multiple=8)
    assert ds.index.num_rows == 180 and (tmp_path / "demo" / "raw").is_dir()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_device_decode_gives_the_same_batch_on_the_device(device, monkeypatch):
    """The loader's batched device decode (nvjpeg on CUDA; the same path forced on the CPU): the same rows,
    captions and pixels (within JPEG decoder tolerance) as the per-image CPU path, on the device."""
    import sd3.data.dataset as dataset

    monkeypatch.setattr(dataset, "DEVICE_DECODE", (device,))
    ds = open_demo()
    ref, out = ds.load(0), ds.load(0, device=device)
    assert out.images.device.type == device and out.stats.get("gpu_decoded", 0) == len(out.rows)
    assert (out.images.cpu() - ref.images).abs().mean() < 0.03
    assert out.captions == ref.captions and np.array_equal(out.rows, ref.rows)
