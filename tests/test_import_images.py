"""import_images: every input kind (image folder with caption files, webdataset tars, parquet with other
column names, a Hugging Face dataset saved to disk) with corrupt items mixed in; exact counts, every
valid row with its caption and true size; the output feeds create_phase and the bucket index; a killed
run resumes to exactly the uninterrupted output; usage errors exit 2 with the fix."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.import_images import main
from sd3.data.importer import (
    EMPTY_IMAGE,
    MISSING_CAPTION,
    NO_IMAGE,
    UNDECODABLE,
    UNREADABLE,
    ImportOptions,
    first_sentence,
    import_images,
)
from sd3.data.index import open_index
from sd3.data.schema import check_schema

REPO = Path(__file__).resolve().parents[1]
RAW_COLUMNS = ("image", "recaption", "recaption_short", "height", "width", "aspect_ratio")


# --------------------------------------------------------------------------------------------------
# Fixtures: real photos from scikit-image, in every mode, with corrupt items mixed in
# --------------------------------------------------------------------------------------------------


@functools.cache
def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def _encode(name: str, w: int, h: int, mode: str, fmt: str) -> bytes:
    img = _photo(name).resize((w, h), Image.Resampling.BILINEAR)
    if mode == "I;16":                                            # 16-bit grey PNG
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@dataclass(frozen=True)
class Sample:
    name: str
    ext: str
    data: bytes
    caption: str | None
    short: str | None = None
    size: tuple[int, int] | None = None
    """(width, height) when the image is valid."""
    reason: str | None = None
    """Why it must be skipped; None: it must arrive."""


@functools.cache
def samples() -> tuple[Sample, ...]:
    """Valid photos (RGB, grey, RGBA, CMYK, 16-bit, WebP) interleaved with the corrupt cases."""
    truncated = _encode("coffee", 80, 60, "RGB", "JPEG")
    return (
        Sample("astronaut", ".jpg", _encode("astronaut", 96, 96, "RGB", "JPEG"),
               "A smiling astronaut in an orange suit. A flag hangs behind her.", size=(96, 96)),
        Sample("zero", ".jpg", b"", "A zero-byte file.", reason=EMPTY_IMAGE),
        Sample("cat-grey", ".png", _encode("chelsea", 120, 80, "L", "PNG"), "A tabby cat in black and white.",
               short="A grey cat.", size=(120, 80)),
        Sample("truncated", ".jpg", truncated[: len(truncated) // 2], "Half an espresso.", reason=UNDECODABLE),
        Sample("coffee-rgba", ".png", _encode("coffee", 90, 60, "RGBA", "PNG"),
               "An espresso cup on a red saucer.\nIt sits on a wooden table!", size=(90, 60)),
        Sample("not-an-image", ".jpg", b"These are notes, saved with the wrong extension.\n", "Notes.",
               reason=UNDECODABLE),
        Sample("rocket-cmyk", ".jpg", _encode("rocket", 64, 80, "CMYK", "JPEG"), "A rocket on its launch pad.",
               size=(64, 80)),
        Sample("no-caption", ".jpg", _encode("rocket", 70, 50, "RGB", "JPEG"), None, reason=MISSING_CAPTION),
        Sample("astronaut-16bit", ".png", _encode("astronaut", 50, 70, "I;16", "PNG"),
               "An astronaut, in sixteen-bit grey.", size=(50, 70)),
        Sample("cat-webp", ".webp", _encode("chelsea", 100, 66, "RGB", "WEBP"), "A cat with green eyes.",
               size=(100, 66)),
    )


VALID = 6
EXPECTED_SKIPS = {EMPTY_IMAGE: 1, UNDECODABLE: 2, MISSING_CAPTION: 1}


def expected_short(s: Sample, *, given: bool) -> str:
    return s.short if (given and s.short) else first_sentence(s.caption)


def read_output(out: Path) -> list[dict]:
    """Every row of the import's shards, in shard order; each shard passes the raw schema check."""
    shards = sorted(out.glob("part-*.parquet"))
    assert shards, f"no shards in {out}"
    for path in shards:
        schema = pq.read_schema(path)
        check_schema(schema, RAW_COLUMNS, where=str(path))
        assert "bucket_size" not in schema.names
        assert schema.field("image").type == pa.binary()
    return pa.concat_tables([pq.read_table(p) for p in shards]).to_pylist()


def assert_valid_rows(rows: list[dict], ids: dict[str, object], *, short_given: bool, by_id: bool = False) -> None:
    """Exactly the valid samples, in input order (by_id: sorted by id, as sorted paths are), with the
    original bytes, true size and their captions."""
    good = [s for s in samples() if s.reason is None]
    if by_id:
        good.sort(key=lambda s: ids[s.name])
    assert [r["id"] for r in rows] == [ids[s.name] for s in good]
    for row, s in zip(rows, good):
        assert row["image"] == s.data, s.name                      # original encoded bytes, untouched
        assert (row["width"], row["height"]) == s.size, s.name
        assert row["aspect_ratio"] == pytest.approx(s.size[0] / s.size[1])
        assert row["recaption"] == " ".join(s.caption.split()), s.name
        assert row["recaption_short"] == expected_short(s, given=short_given), s.name


def summary(out: Path) -> dict:
    return json.loads((out / "_import_summary.json").read_text())


# -- input kinds ------------------------------------------------------------------------------------


def make_folder(root: Path) -> dict[str, str]:
    """Images with .txt / .caption / .json sidecars in a tree; returns name -> expected id."""
    ids = {}
    for i, s in enumerate(samples()):
        folder = root / ("sub" if i % 3 == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{i:02d}-{s.name}"
        (folder / (stem + s.ext)).write_bytes(s.data)
        ids[s.name] = (folder / (stem + s.ext)).relative_to(root).as_posix()
        if s.caption is None:
            continue
        if s.short is not None or i % 3 == 1:
            meta = {"caption": s.caption, "url": f"https://example.com/{i}", **({"short": s.short} if s.short else {})}
            (folder / (stem + ".json")).write_text(json.dumps(meta))
        elif i % 3 == 0:
            (folder / (stem + ".txt")).write_text(s.caption + "\n")
        else:
            (folder / (stem + ".caption")).write_text(s.caption)
    (root / "README.txt").write_text("a caption file without an image is ignored")
    (root / ".hidden.jpg").write_bytes(b"hidden files are ignored")
    return ids


def make_tars(root: Path) -> dict[str, str]:
    """img2dataset-style webdataset shards: KEY.jpg|png|webp + KEY.txt and/or KEY.json (with url)."""
    root.mkdir(parents=True, exist_ok=True)
    ids = {}
    parts = [samples()[:6], samples()[6:]]
    for t, part in enumerate(parts):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            for j, s in enumerate(part):
                key = f"{t:05d}{j:04d}"
                ids[s.name] = f"{t:05d}.tar/{key}"
                add(key + s.ext, s.data)
                meta = {"url": f"https://example.com/{key}", "key": key, "status": "success"}
                if s.caption is not None:
                    if j % 2 == 0:
                        add(key + ".txt", s.caption.encode())
                    else:
                        meta["caption"] = s.caption
                if s.short:
                    meta["short"] = s.short
                add(key + ".json", json.dumps(meta).encode())
            if t == 0:
                add(f"{t:05d}9999.txt", b"a sample whose image failed to download")
    return ids


def make_img2dataset_parquet(root: Path) -> dict[str, str]:
    """img2dataset's parquet output: jpg / txt columns, width/height as it wrote them, a failed download."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples()):
        rows.append({"key": f"{i:09d}", "jpg": s.data, "txt": s.caption, "url": f"https://example.com/{i}",
                     "status": "success", "width": 7, "height": 9, "error_message": None})
    rows.insert(4, {"key": "failed", "jpg": None, "txt": "a failed download", "url": "https://example.com/x",
                    "status": "failed_to_download", "width": None, "height": None, "error_message": "404"})
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()), ("url", pa.string()),
                        ("status", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("error_message", pa.string())])
    ids = {}
    for f, (lo, hi) in enumerate(((0, 5), (5, len(rows)))):
        name = f"{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[lo:hi], schema=schema), root / name, row_group_size=2)
        for r, row in enumerate(rows[lo:hi]):
            ids[next((s.name for s in samples() if s.data == row["jpg"]), row["key"])] = f"{name}:{r}"
    return ids


HF_FEATURES = {"photo": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"},
               "short_caption": {"dtype": "string", "_type": "Value"},
               "label": {"dtype": "int64", "_type": "Value"}}
HF_SCHEMA = pa.schema([("photo", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                       ("text", pa.string()), ("short_caption", pa.string()), ("label", pa.int64())],
                      metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})


def _hf_rows(subset: tuple[Sample, ...]) -> list[dict]:
    return [{"photo": {"bytes": s.data, "path": None}, "text": s.caption, "short_caption": s.short, "label": i}
            for i, s in enumerate(subset)]


def write_saved_dataset(folder: Path, rows: list[dict], *, files: int = 2, batch_rows: int = 3) -> None:
    """The layout `Dataset.save_to_disk` writes (datasets 5.x): `data-XXXXX-of-YYYYY.arrow` Arrow IPC
    *stream* files of record batches (schema metadata `huggingface` holds the features), `state.json`
    listing them in order, `dataset_info.json` with the features."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    names = [f"data-{f:05d}-of-{files:05d}.arrow" for f in range(files)]
    for f, name in enumerate(names):
        part = pa.Table.from_pylist(rows[bounds[f]:bounds[f + 1]], schema=HF_SCHEMA)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, HF_SCHEMA) as writer:
            for batch in part.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": HF_FEATURES,
                                                          "homepage": "", "license": ""}, indent=2))


# --------------------------------------------------------------------------------------------------
# One test per input kind
# --------------------------------------------------------------------------------------------------


def test_folder_with_sidecar_captions(tmp_path):
    ids = make_folder(tmp_path / "photos")
    opts = ImportOptions(rows_per_shard=4, json_short_caption_key="short")
    report = import_images(tmp_path / "photos", tmp_path / "raw", opts, progress=False)
    assert report.kind == "folder" and not report.failed
    assert (report.stats.rows_in, report.stats.rows_written) == (len(samples()), VALID)
    assert report.stats.skipped == EXPECTED_SKIPS
    assert report.shards == 2 and [p.name for p in sorted((tmp_path / "raw").glob("*.parquet"))] == [
        "part-00000.parquet", "part-00001.parquet"]
    assert [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "raw").glob("*.parquet"))] == [4, 2]
    assert_valid_rows(read_output(tmp_path / "raw"), ids, short_given=True, by_id=True)
    assert ids["cat-grey"].startswith("sub/")
    s = summary(tmp_path / "raw")
    assert (s["rows_in"], s["rows_written"], s["rows_skipped"], s["shards"]) == (10, 6, 4, 2)
    assert s["skipped"] == EXPECTED_SKIPS and s["failed_inputs"] == {}


def test_folder_keeps_rows_without_caption_when_asked(tmp_path):
    ids = make_folder(tmp_path / "photos")
    opts = ImportOptions(missing_caption="empty", short_caption="empty")
    report = import_images(tmp_path / "photos", tmp_path / "raw", opts, progress=False)
    assert report.stats.rows_written == VALID + 1 and report.stats.no_caption_kept == 1
    assert report.stats.skipped == {EMPTY_IMAGE: 1, UNDECODABLE: 2}
    rows = {r["id"]: r for r in read_output(tmp_path / "raw")}
    uncaptioned = rows[ids["no-caption"]]
    assert (uncaptioned["recaption"], uncaptioned["recaption_short"]) == ("", "")
    assert (uncaptioned["width"], uncaptioned["height"]) == (70, 50)
    assert rows[ids["astronaut"]]["recaption_short"] == ""  # --short-caption empty: not derived


def test_webdataset_tars_streamed(tmp_path):
    ids = make_tars(tmp_path / "wds")
    opts = ImportOptions(rows_per_shard=5, json_short_caption_key="short")
    report = import_images(tmp_path / "wds", tmp_path / "raw", opts, progress=False)
    assert report.kind == "webdataset" and not report.failed
    assert (report.stats.rows_in, report.stats.rows_written) == (len(samples()) + 1, VALID)
    assert report.stats.skipped == {**EXPECTED_SKIPS, NO_IMAGE: 1}
    rows = read_output(tmp_path / "raw")
    assert_valid_rows(rows, ids, short_given=True)
    key = ids["astronaut"].split("/")[1]
    assert rows[0]["url"] == f"https://example.com/{key}"              # carried from img2dataset's json

    # gzip-compressed shards read the same
    (tmp_path / "gz").mkdir()
    for tar in sorted((tmp_path / "wds").glob("*.tar")):
        (tmp_path / "gz" / (tar.name + ".gz")).write_bytes(gzip.compress(tar.read_bytes()))
    report = import_images(tmp_path / "gz", tmp_path / "raw-gz", opts, progress=False)
    assert not report.failed and report.stats.skipped == {**EXPECTED_SKIPS, NO_IMAGE: 1}
    assert_valid_rows(read_output(tmp_path / "raw-gz"), {n: i.replace(".tar/", ".tar.gz/") for n, i in ids.items()},
                      short_given=True)


def test_img2dataset_parquet(tmp_path):
    ids = make_img2dataset_parquet(tmp_path / "pq")
    report = import_images(tmp_path / "pq", tmp_path / "raw", ImportOptions(rows_per_shard=3), progress=False)
    assert report.kind == "parquet" and not report.failed
    assert report.columns == {"image_column": "jpg", "caption_column": "txt", "short_caption_column": None}
    assert (report.stats.rows_in, report.stats.rows_written) == (len(samples()) + 1, VALID)
    assert report.stats.skipped == {**EXPECTED_SKIPS, EMPTY_IMAGE: 2}  # + the failed download (null jpg)
    rows = read_output(tmp_path / "raw")
    assert_valid_rows(rows, ids, short_given=False)
    # img2dataset's width/height are replaced by the true ones; its other columns are carried
    assert set(rows[0]) >= {"key", "url", "status", "error_message"}
    assert report.replaced_columns == ["width", "height"]


def test_parquet_named_columns_and_image_paths(tmp_path):
    """Other column names (--image-column / --caption-column), image given as file paths."""
    src = tmp_path / "pq"
    (src / "img").mkdir(parents=True)
    good = [s for s in samples() if s.reason is None][:3]
    for s in good:
        (src / "img" / (s.name + s.ext)).write_bytes(s.data)
    rows = [{"file": f"img/{s.name}{s.ext}", "description": s.caption, "id": 100 + i} for i, s in enumerate(good)]
    rows.append({"file": "img/missing.jpg", "description": "gone", "id": 200})
    pq.write_table(pa.Table.from_pylist(rows), src / "meta.parquet")
    opts = ImportOptions(kind="parquet", image_column="file", caption_column="description")
    report = import_images(src, tmp_path / "raw", opts, progress=False)
    assert report.stats.rows_written == 3 and report.stats.skipped == {UNREADABLE: 1}
    out = read_output(tmp_path / "raw")
    assert [r["id"] for r in out] == [100, 101, 102]                 # the input's id column is kept
    assert [r["image"] for r in out] == [s.data for s in good]
    assert [r["recaption"] for r in out] == [" ".join(s.caption.split()) for s in good]


def test_hf_save_to_disk(tmp_path):
    write_saved_dataset(tmp_path / "ds", _hf_rows(samples()))
    report = import_images(tmp_path / "ds", tmp_path / "raw", ImportOptions(rows_per_shard=4), progress=False)
    assert report.kind == "hf" and not report.failed
    assert report.columns == {"image_column": "photo", "caption_column": "text",
                              "short_caption_column": "short_caption"}
    assert (report.stats.rows_in, report.stats.rows_written) == (len(samples()), VALID)
    assert report.stats.skipped == EXPECTED_SKIPS
    rows = read_output(tmp_path / "raw")
    assert_valid_rows(rows, {s.name: str(i) for i, s in enumerate(samples())}, short_given=True)
    assert [r["label"] for r in rows] == [i for i, s in enumerate(samples()) if s.reason is None]


def test_hf_dataset_dict_splits_and_parquet_export(tmp_path):
    train, test = samples()[:7], samples()[7:]
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    write_saved_dataset(tmp_path / "dd" / "train", _hf_rows(train), files=3)
    write_saved_dataset(tmp_path / "dd" / "test", _hf_rows(test), files=1)
    report = import_images(tmp_path / "dd", tmp_path / "all", ImportOptions(), progress=False)
    assert report.stats.rows_written == VALID and report.stats.skipped == EXPECTED_SKIPS
    ids = {s.name: f"train/{i}" for i, s in enumerate(train)} | {s.name: f"test/{i}" for i, s in enumerate(test)}
    assert_valid_rows(read_output(tmp_path / "all"), ids, short_given=True)

    report = import_images(tmp_path / "dd", tmp_path / "test", ImportOptions(split="test"), progress=False)
    assert [r["id"] for r in read_output(tmp_path / "test")] == ["test/1", "test/2"]  # the 16-bit and the WebP
    assert report.stats.rows_in == 3

    # Dataset.to_parquet / the Hub's parquet export: the same columns and metadata in parquet files
    (tmp_path / "export" / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(_hf_rows(samples()), schema=HF_SCHEMA)
    pq.write_table(table.slice(0, 5), tmp_path / "export" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(5), tmp_path / "export" / "data" / "train-00001-of-00002.parquet")
    report = import_images(tmp_path / "export", tmp_path / "from_export", ImportOptions(), progress=False)
    assert report.kind == "parquet" and report.stats.rows_written == VALID
    rows = read_output(tmp_path / "from_export")
    assert [r["recaption_short"] for r in rows] == [expected_short(s, given=True) for s in samples() if not s.reason]


def test_real_datasets_save_to_disk(tmp_path):
    """Where the `datasets` library is installed (not a dependency): its own save_to_disk output."""
    datasets = pytest.importorskip("datasets")
    good = [s for s in samples() if s.reason is None]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": s.data, "path": None} for s in good], "caption": [s.caption for s in good]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.shuffle(seed=0).save_to_disk(str(tmp_path / "ds"), max_shard_size=2000)
    report = import_images(tmp_path / "ds", tmp_path / "raw", ImportOptions(), progress=False)
    order = ds.shuffle(seed=0)["caption"]
    assert [r["recaption"] for r in read_output(tmp_path / "raw")] == [" ".join(c.split()) for c in order]
    assert report.stats.rows_written == len(good)


# --------------------------------------------------------------------------------------------------
# Broken inputs, end to end, resume
# --------------------------------------------------------------------------------------------------


def test_unreadable_inputs_are_listed_and_the_rest_imported(tmp_path, capsys):
    make_tars(tmp_path / "wds")
    whole = (tmp_path / "wds" / "00000.tar").read_bytes()
    (tmp_path / "wds" / "00000.tar").write_bytes(whole[: len(whole) * 2 // 3])   # cut mid-stream
    (tmp_path / "wds" / "00002.tar").write_bytes(b"not a tar file at all" * 50)
    code = main(["--input", str(tmp_path / "wds"), "--output", str(tmp_path / "raw"), "--quiet", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED 00000.tar" in out and "FAILED 00002.tar" in out
    failed = summary(tmp_path / "raw")["failed_inputs"]
    assert set(failed) == {"00000.tar", "00002.tar"}
    ids = [r["id"] for r in read_output(tmp_path / "raw")]
    assert ids[-3:] == ["00001.tar/000010000", "00001.tar/000010002", "00001.tar/000010003"]  # all of 00001.tar
    assert ids[:-3] and all(i.startswith("00000.tar/") for i in ids[:-3])  # what came before the cut


def test_end_to_end_phase_and_index(tmp_path, capsys):
    ids = make_folder(tmp_path / "photos")
    code = main(["--input", str(tmp_path / "photos"), "--output", str(tmp_path / "mine" / "raw"), "--quiet",
                 "--rows-per-shard", "4", "--json-short-caption-key", "short", "--workers", "1",
                 "--phase-res", "64", "--patch", "8"])                # the phase goes beside raw/: mine/64
    assert code == 0, capsys.readouterr()
    index = open_index(tmp_path / "mine" / "64" / "bucket_index.safetensors", tmp_path / "mine" / "64")
    assert len(index.rows) == VALID
    phase = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "mine" / "64").glob("*.parquet"))])
    by_id = {r["id"]: r for r in phase.to_pylist()}
    for s in samples():
        if s.reason is None:
            row = by_id[ids[s.name]]
            assert row["recaption"] == " ".join(s.caption.split())
            assert max(row["width"], row["height"]) <= 64 and row["bucket_size"] == f"{row['width']}x{row['height']}"
    assert "training set:" in capsys.readouterr().out


def _snapshot(out: Path) -> list[tuple[str, list[tuple]]]:
    """Each shard's name and its rows (id, captions, size, image bytes)."""
    return [(p.name, [(r["id"], r["recaption"], r["recaption_short"], r["width"], r["height"], r["image"])
                      for r in pq.read_table(p).to_pylist()])
            for p in sorted(out.glob("part-*.parquet"))]


def _counts(out: Path) -> tuple:
    s = summary(out)
    return s["rows_in"], s["rows_written"], s["skipped"], s["failed_inputs"], s["shards"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["folder", "webdataset", "parquet", "hf"])
def test_interrupted_run_resumes_to_the_same_output(tmp_path, kind):
    """Stop a run after each item in turn, rerun: the same shards, ids and counts as one straight run."""
    src = tmp_path / "src"
    {"folder": make_folder, "webdataset": make_tars, "parquet": make_img2dataset_parquet,
     "hf": lambda p: write_saved_dataset(p, _hf_rows(samples()))}[kind](src)
    opts = ImportOptions(rows_per_shard=2)
    import_images(src, tmp_path / "straight", opts, progress=False)
    expected = _snapshot(tmp_path / "straight")
    assert len(expected) == 3

    partial = 0
    for stop_after in range(1, summary(tmp_path / "straight")["rows_in"]):
        out = tmp_path / f"stopped-{stop_after}"
        seen = []

        def stop(item, stop_after=stop_after, seen=seen):
            seen.append(item)
            if len(seen) == stop_after:
                raise _Stop

        with pytest.raises(_Stop):
            import_images(src, out, opts, progress=False, on_row=stop)
        partial += 0 < len(list(out.glob("part-*.parquet"))) < 3
        assert not list(out.glob(".*tmp*"))                       # an interrupted shard never stays behind
        report = import_images(src, out, opts, progress=False)
        assert _snapshot(out) == expected, stop_after
        assert _counts(out) == _counts(tmp_path / "straight")
        assert report.shards == 3
    assert partial >= 2                                           # stops fell between finished shards

    again = import_images(src, tmp_path / "straight", opts, progress=False)   # a finished import: nothing to do
    assert again.shards_written == 0 and _snapshot(tmp_path / "straight") == expected
    assert _counts(tmp_path / "straight")[:2] == (again.stats.rows_in, again.stats.rows_written)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(tmp_path):
    """Really kill the CLI (SIGKILL) after its first shards, rerun it, compare with an uninterrupted run."""
    src = tmp_path / "photos"
    make_folder(src)
    for i in range(3):                                            # more rows: several shards before the end
        (src / f"more-{i}.jpg").write_bytes(_encode("coffee", 40 + 8 * i, 40, "RGB", "JPEG"))
        (src / f"more-{i}.txt").write_text(f"Espresso number {i}.")
    args = ["--input", str(src), "--rows-per-shard", "2", "--workers", "1", "--quiet"]
    cmd = [sys.executable, str(REPO / "data" / "import_images.py"), *args]
    subprocess.run([*cmd, "--output", str(tmp_path / "straight")], check=True, timeout=120, capture_output=True)

    out = tmp_path / "killed"
    env = {**os.environ, "SD3_IMPORT_ROW_DELAY_S": "0.3"}
    proc = subprocess.Popen([*cmd, "--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, "the import ended before it could be killed"
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    finished = len(list(out.glob("part-*.parquet")))
    assert 2 <= finished < len(_snapshot(tmp_path / "straight"))

    rerun = subprocess.run([*cmd, "--output", str(out)], timeout=120, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{finished} already done" in rerun.stdout
    assert _snapshot(out) == _snapshot(tmp_path / "straight")
    ids = [row[0] for _, rows in _snapshot(out) for row in rows]
    assert len(ids) == len(set(ids)) == VALID + 3
    assert not list(out.glob(".*tmp*"))                            # the killed run's partial shard is gone
    assert _counts(out) == _counts(tmp_path / "straight")


@pytest.mark.slow
def test_worker_processes_give_the_same_output(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from sd3.data import importer

    make_folder(tmp_path / "photos")
    monkeypatch.setattr(importer, "WINDOW_PER_WORKER", 2)          # several windows, and the pool from the
    monkeypatch.setattr(importer, "POOL_AFTER_ITEMS", 3)           # second one on
    started = []
    monkeypatch.setattr(importer, "ProcessPoolExecutor",
                        lambda *a, **k: started.append(1) or ProcessPoolExecutor(*a, **k))
    import_images(tmp_path / "photos", tmp_path / "one", ImportOptions(rows_per_shard=4), progress=False)
    import_images(tmp_path / "photos", tmp_path / "two", ImportOptions(rows_per_shard=4, workers=2), progress=False)
    assert _snapshot(tmp_path / "one") == _snapshot(tmp_path / "two")
    assert started == [1]


# --------------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line naming the fix
# --------------------------------------------------------------------------------------------------


def _usage_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:                                       # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_usage_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "--input" in _usage_error(capsys, ["--output", out])
    (tmp_path / "empty").mkdir()
    assert "no images" in _usage_error(capsys, ["--input", str(tmp_path / "empty"), "--output", out])
    assert "does not exist" in _usage_error(capsys, ["--input", str(tmp_path / "nope"), "--output", out])

    make_img2dataset_parquet(tmp_path / "pq")
    err = _usage_error(capsys, ["--input", str(tmp_path / "pq"), "--output", out, "--caption-column", "caption"])
    assert "unknown column 'caption'" in err and "txt (string)" in err and "jpg (binary)" in err

    assert "folder of their own" in _usage_error(capsys, ["--input", str(tmp_path / "pq"), "--output",
                                                          str(tmp_path / "pq")])
    # an output folder inside the input is not read as input
    assert main(["--input", str(tmp_path / "pq"), "--output", str(tmp_path / "pq" / "raw"), "--quiet"]) == 0
    assert main(["--input", str(tmp_path / "pq"), "--output", str(tmp_path / "pq" / "raw"), "--quiet"]) == 0
    assert "0 now, 1 already done" in capsys.readouterr().out

    (tmp_path / "pq" / "photo.jpg").write_bytes(samples()[0].data)
    assert "--kind" in _usage_error(capsys, ["--input", str(tmp_path / "pq"), "--output", out])

    make_folder(tmp_path / "photos")
    base = ["--input", str(tmp_path / "photos"), "--output", out, "--quiet", "--workers", "1"]
    assert main([*base, "--rows-per-shard", "4"]) == 0
    capsys.readouterr()
    err = _usage_error(capsys, [*base, "--rows-per-shard", "3"])
    assert "rows_per_shard 4 -> 3" in err and "empty folder" in err
    assert "--patch" in _usage_error(capsys, [*base, "--phase-res", "8", "--patch", "16"])
    assert "--rows-per-shard" in _usage_error(capsys, [*base[:4], "--rows-per-shard", "0"])


def test_first_sentence():
    assert first_sentence("A cat on a mat. It sleeps.") == "A cat on a mat."
    assert first_sentence("A cat on a mat.") == ""                    # one sentence: nothing shorter to give
    assert first_sentence("Pi is 3.14 here! Really.") == "Pi is 3.14 here!"
