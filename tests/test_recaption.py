"""sd3.data.recaption and its CLI data/recaption_parquets.py: row alignment, filters, the pixels the VLM
sees, resume, sharding, schema, the SLURM wrapper.

Most tests inject deterministic fake captioners through the same interface as the transformers ones, so
they can check which row each caption came from; the tests marked with tiny models load random LLaVA and
Llama models through the package's real loading code.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data import recaption_parquets as cli
from sd3.atomic import stale_temporaries
from sd3.data import recaption as rc
from sd3.data.images import decode_rgb, open_rgb
from tests.recaption_fixtures import (
    CORRUPT,
    ROOT,
    FakeDescriber,
    FakeShortener,
    image_size,
    make_tiny_llm,
    make_tiny_vlm,
    photo_bytes,
    seed_table,
    write_shards,
)

SEED_COLUMNS = ["image", "recaption", "recaption_short", "height", "width", "aspect_ratio", "bucket_size",
                "class", "id", "caption"]


def run_task(input_dir, output_dir, *, num_shards=1, shard_index=0, fakes=None, loads=None, **opts):
    """recaption_task with fake models; `loads` (a list) records each time the models are loaded."""
    fakes = fakes or (FakeDescriber(), FakeShortener())

    def load_models():
        if loads is not None:
            loads.append(1)
        return fakes

    opts = {"hint_column": "caption", "batch_size": 4, "rows_per_group": 8} | opts
    delete_input = opts.pop("delete_input", False)
    return rc.recaption_task(
        input_dir=Path(input_dir), output_dir=Path(output_dir), num_shards=num_shards,
        shard_index=shard_index, load_models=load_models, prompts=rc.Prompts(), opts=rc.Options(**opts),
        delete_input=delete_input,
    )


def expected_captions(row_id: int) -> tuple[str, str]:
    """What the fakes give row `row_id` when its image and its hint reach them together."""
    w, h = image_size(row_id)
    core = f"a photo of {w} by {h} pixels showing row {row_id} alt text"
    return core + " with soft light and a quiet background.", core + "."


# --------------------------------------------------------------------------------------------------
# Images and filters
# --------------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def test_open_image_gives_rgb_for_every_mode_and_none_for_garbage():
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white, not black
    out = rc.open_image(_encode(rgba))
    assert out.mode == "RGB" and out.size == (8, 6)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)

    grey16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # mid grey in 16 bits
    assert abs(rc.open_image(_encode(grey16)).getpixel((0, 0))[0] - 128) <= 1  # scaled, not clipped to white

    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 256)  # index 3 is transparent black
    assert rc.open_image(_encode(palette, transparency=3)).getpixel((0, 0)) == (255, 255, 255)
    for img, fmt in [(Image.new("L", (5, 5), 7), "PNG"), (Image.new("LA", (5, 5), (9, 255)), "PNG"),
                     (Image.new("CMYK", (5, 5), (0, 0, 0, 0)), "JPEG"), (Image.new("1", (5, 5), 1), "PNG")]:
        assert rc.open_image(_encode(img, fmt)).mode == "RGB", img.mode

    big = rc.open_image(_encode(Image.new("RGB", (1000, 500)), "JPEG"), max_side=100)
    assert max(big.size) <= 100 and abs(big.size[0] / big.size[1] - 2) < 0.05

    jpeg = photo_bytes(3, "JPEG")
    assert rc.open_image(jpeg) is not None
    for garbage in [CORRUPT, b"", jpeg[: len(jpeg) // 2], b"GIF89a\x00"]:
        assert rc.open_image(garbage) is None


def trainer_test_images() -> dict[str, bytes]:
    """Images whose modes need more than a plain convert('RGB'), encoded as files would hold them."""
    rng = np.random.default_rng(0)
    floats = rng.uniform(0, 1, (20, 24)).astype(np.float32)  # (H, W)
    images = {
        "16-bit PNG": (Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)), "PNG"),
        "float TIFF in 0..1": (Image.fromarray(floats, mode="F"), "TIFF"),
        "float TIFF in 0..255": (Image.fromarray(floats * 200, mode="F"), "TIFF"),
        "RGBA PNG": (Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA"), "PNG"),
        "CMYK JPEG": (Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "CMYK"), "JPEG"),
    }
    return {kind: _encode(img, fmt) for kind, (img, fmt) in images.items()}


def test_the_vlm_sees_exactly_the_pixels_the_trainer_sees(tmp_path):
    class Recorder(FakeDescriber):
        def __init__(self):
            super().__init__()
            self.pixels: list[np.ndarray] = []

        def describe(self, images, prompts):
            self.pixels += [np.array(img) for img in images]  # (H, W, 3) uint8
            return super().describe(images, prompts)

    encoded = trainer_test_images()
    assert {Image.open(io.BytesIO(b)).mode for b in encoded.values()} >= {"I;16", "F", "RGBA", "CMYK"}
    kinds, datas = list(encoded), list(encoded.values())
    # Through a whole task: Hugging Face's {bytes, path} image struct -> the bytes -> decode -> the VLM.
    struct = pa.StructArray.from_arrays([pa.array(datas, pa.binary()), pa.array([None] * len(datas), pa.string())],
                                        names=["bytes", "path"])
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image": struct, "caption": [f"row {i} alt text" for i in range(len(datas))]}),
                   tmp_path / "in" / "a.parquet")
    vlm = Recorder()
    run_task(tmp_path / "in", tmp_path / "out", fakes=(vlm, FakeShortener()))
    assert len(vlm.pixels) == len(datas)
    for kind, data, seen in zip(kinds, datas, vlm.pixels):
        trainer = decode_rgb(data).permute(1, 2, 0).numpy()  # (H, W, 3), what sd3.data.dataset decodes
        assert seen.shape == trainer.shape == (20, 24, 3), kind
        assert np.array_equal(seen, trainer), f"{kind}: {np.abs(seen.astype(int) - trainer).max()} levels off"
        assert np.array_equal(seen, np.array(open_rgb(data))), kind


def test_caption_filters_and_cleanup():
    bp = rc.BOILERPLATE
    assert rc.caption_problem("  \n ", min_distinct_words=8, boilerplate=bp) == "empty"
    assert rc.caption_problem("A cat on a mat.", min_distinct_words=8, boilerplate=bp) == "few_words"
    assert rc.caption_problem("dog " * 30, min_distinct_words=8, boilerplate=bp) == "few_words"
    refusal = "I\u2019m sorry, but I cannot see any details in this image you have sent to me today."
    assert rc.caption_problem(refusal, min_distinct_words=8, boilerplate=bp) == "boilerplate"
    good = "A tabby cat sleeps on a green sofa beside a bright window in the afternoon."
    assert rc.caption_problem(good, min_distinct_words=8, boilerplate=bp) is None

    cat = "A cat on a sofa."
    assert rc.clean_caption("Sure! Here is a detailed description:\n\nA cat  on\na sofa.") == cat
    reply = 'Here is the sentence:\n\n"A cat on a sofa."\n\nNote: I kept'
    assert rc.clean_caption(reply, one_paragraph=True) == cat
    assert rc.clean_caption("Sunset over the sea: a red sky.") == "Sunset over the sea: a red sky."


# --------------------------------------------------------------------------------------------------
# Rows stay aligned
# --------------------------------------------------------------------------------------------------


def test_captions_stay_in_their_rows_when_rows_mid_batch_fail():
    ids = list(range(14))
    hints = {4: "BREAK", 7: "REFUSE", 8: "TERSE", 9: "EMPTY", 11: "row 11 alt text LONG"}
    table = seed_table(ids, corrupt=frozenset({1, 2, 5}), hints=hints)
    images = table.column("image").to_pylist()
    images[6] = None
    vlm, llm = FakeDescriber(), FakeShortener()
    rows = rc.recaption_rows(images, table.column("caption").to_pylist(), vlm=vlm, llm=llm,
                             prompts=rc.Prompts(), opts=rc.Options(batch_size=4))

    want_reasons = {1: "decode_error", 2: "decode_error", 5: "decode_error", 6: "no_image", 4: "vlm_error",
                    7: "vlm_boilerplate", 8: "vlm_few_words", 9: "vlm_empty", 11: "llm_too_long"}
    assert rows.reasons == [want_reasons.get(i) for i in ids]
    for i in ids:
        if i in want_reasons:
            assert rows.long[i] is None and rows.short[i] is None
        else:
            assert (rows.long[i], rows.short[i]) == expected_captions(i)
    # Failed rows never reach the LLM, and it is called in batches, not one prompt at a time.
    sent = [c for batch in llm.batches for c in batch]
    assert len(sent) == 6 and all("row 11" in c or "BREAK" not in c for c in sent)
    assert max(len(b) for b in llm.batches) == 4


def test_a_batch_where_every_row_fails_alone_is_a_broken_model_not_bad_rows():
    class Broken:
        def describe(self, images, prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")

    table = seed_table([0, 1, 2])
    with pytest.raises(rc.RecaptionError, match="every row of a batch failed"):
        rc.recaption_rows(table.column("image").to_pylist(), [None] * 3, vlm=Broken(), llm=FakeShortener(),
                          prompts=rc.Prompts(), opts=rc.Options(batch_size=2))


def test_prompts_put_the_hint_in_only_when_there_is_one():
    p = rc.Prompts()
    assert "alt-text" in p.for_vlm("a red bus") and '"a red bus"' in p.for_vlm("a red  bus\n")
    assert "alt-text" not in p.for_vlm(None) and "alt-text" not in p.for_vlm("   ")
    assert len(p.for_vlm("x" * 5000)) < len(p.for_vlm(None)) + len(p.hint) + rc.MAX_HINT_CHARS
    assert "at most 40 words" in p.for_llm("A cat.", max_words=40) and p.for_llm("A {cat}.", max_words=9)


# --------------------------------------------------------------------------------------------------
# Shards: schema, counts, resume, sharding, deletion
# --------------------------------------------------------------------------------------------------


def test_output_keeps_the_seed_schema_and_counts_every_dropped_row(tmp_path):
    src = tmp_path / "in"
    write_shards(src, 2, 10, corrupt=frozenset({3, 12}), hints={5: "REFUSE"}, row_group_size=4)
    summary = run_task(src, tmp_path / "out")

    in_table = pq.read_table(src / "part-00000.parquet")
    out_table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert out_table.schema.names == SEED_COLUMNS == in_table.schema.names
    assert out_table.schema.equals(in_table.schema.set(2, pa.field("recaption_short", pa.string())))
    kept = [f"img{r:05d}" for r in range(10) if r not in (3, 5)]
    assert out_table.column("id").to_pylist() == kept
    by_id = {r: i for i, r in enumerate(in_table.column("id").to_pylist())}
    for name in ["image", "height", "width", "aspect_ratio", "bucket_size", "class", "caption"]:
        assert out_table.column(name).to_pylist() == [in_table.column(name)[by_id[k]].as_py() for k in kept]
    for r, long, short in zip(kept, out_table.column("recaption").to_pylist(),
                              out_table.column("recaption_short").to_pylist()):
        assert (long, short) == expected_captions(int(r[3:]))

    assert (summary["rows_in"], summary["rows_out"], summary["rows_dropped"]) == (20, 17, 3)
    assert summary["reasons"] == {"decode_error": 2, "vlm_boilerplate": 1}
    on_disk = json.loads((tmp_path / "out" / "_summary_shard0of1.json").read_text())
    assert on_disk["rows_out"] == 17 and on_disk["per_shard"]["part-00001.parquet"]["rows_in"] == 10
    assert "rows in 20, rows out 17" in rc.format_summary(summary)


def test_keep_null_captions_keeps_every_row_in_order(tmp_path):
    write_shards(tmp_path / "in", 1, 9, corrupt=frozenset({4}))
    summary = run_task(tmp_path / "in", tmp_path / "out", keep_null_captions=True)
    out = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert out.column("id").to_pylist() == [f"img{r:05d}" for r in range(9)]
    assert out.column("recaption")[4].as_py() is None and out.column("recaption_short")[4].as_py() is None
    assert out.column("recaption_short")[5].as_py() == expected_captions(5)[1]
    assert (summary["rows_out"], summary["rows_captioned"], summary["rows_dropped"]) == (9, 8, 0)


def test_raw_input_gets_caption_columns_appended_and_hf_image_structs_work(tmp_path):
    seed = seed_table(list(range(6)), corrupt=frozenset({2}))
    paths = pa.array([None] * 6, pa.string())
    image = seed.column("image").combine_chunks()
    struct = pa.StructArray.from_arrays([image, paths], names=["bytes", "path"])
    raw = pa.table({"key": [str(i) for i in range(6)], "image": struct, "text": seed.column("caption")})
    (tmp_path / "in").mkdir()
    pq.write_table(raw, tmp_path / "in" / "a.parquet")
    run_task(tmp_path / "in", tmp_path / "out", hint_column="text")
    out = pq.read_table(tmp_path / "out" / "a.parquet")
    assert out.schema.names == ["key", "image", "text", "recaption", "recaption_short"]
    assert out.column("key").to_pylist() == ["0", "1", "3", "4", "5"]
    assert out.column("recaption_short")[2].as_py() == expected_captions(3)[1]


def test_a_killed_run_resumes_and_skips_finished_shards(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, 4, 6, hints={15: "STOP"})  # row 15 lies in the third shard
    with pytest.raises(KeyboardInterrupt):
        run_task(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    # A SIGKILL leaves its partial shard behind: the rerun must not trust it, and removes it.
    leave_partial_output(out / "part-00002.parquet")
    assert len(stale_temporaries(out)) == 1

    table = pq.read_table(src / "part-00002.parquet")
    pq.write_table(table.set_column(9, "caption", pa.array([f"row {r} alt text" for r in range(12, 18)])),
                   src / "part-00002.parquet")
    vlm, loads = FakeDescriber(), []
    summary = run_task(src, out, fakes=(vlm, FakeShortener()), loads=loads)
    assert vlm.rows_seen == 12  # only the two unfinished shards were captioned
    assert (summary["shards_this_run"], summary["shards_finished_earlier"]) == (2, 2)
    assert (summary["rows_in"], summary["rows_out"]) == (24, 24)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_summary_shard0of1.json"] + [f"part-0000{i}.parquet" for i in range(4)])
    for i in range(4):
        ids = pq.read_table(out / f"part-0000{i}.parquet").column("id").to_pylist()
        assert ids == [f"img{r:05d}" for r in range(6 * i, 6 * i + 6)]

    summary = run_task(src, out, loads=loads)  # everything finished: no model is even loaded
    assert loads == [1] and summary["shards_finished_earlier"] == 4 and summary["rows_out"] == 24


def leave_partial_output(path: Path) -> None:
    """What a run killed mid-shard leaves: a temporary of `path` written through sd3.atomic by a dead process."""
    code = ("import os, signal, sys\nfrom sd3.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'partial')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], env=os.environ | {"PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr


def test_shard_split_covers_every_shard_exactly_once():
    names = [f"part-{i:05d}.parquet" for i in range(23)]
    for k in range(1, 9):
        taken = [n for i in range(k) for n in rc.shards_for_task(names[::-1], num_shards=k, shard_index=i)]
        assert sorted(taken) == names
        sizes = [len(rc.shards_for_task(names, num_shards=k, shard_index=i)) for i in range(k)]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(rc.RecaptionError, match="--array=0-3"):
        rc.shards_for_task(names, num_shards=4, shard_index=4)


def test_array_tasks_with_delete_input_cover_every_shard_once(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, 7, 3)
    vlms = [FakeDescriber() for _ in range(3)]
    for i in (2, 0, 1):  # tasks finish in any order; each deletes its inputs, which must not move the split
        run_task(src, out, num_shards=3, shard_index=i, fakes=(vlms[i], FakeShortener()), delete_input=True)
    assert list(src.iterdir()) == []
    assert [v.rows_seen for v in vlms] == [9, 6, 6]
    ids = sorted(r for p in out.glob("*.parquet") for r in pq.read_table(p).column("id").to_pylist())
    assert ids == [f"img{r:05d}" for r in range(21)]
    summaries = [json.loads((out / f"_summary_shard{i}of3.json").read_text()) for i in range(3)]
    assert sum(s["rows_in"] for s in summaries) == 21


def test_delete_input_waits_until_the_output_is_whole(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, 2, 4, hints={6: "STOP"})
    with pytest.raises(KeyboardInterrupt):
        run_task(src, out, delete_input=True)
    assert sorted(p.name for p in src.iterdir()) == ["part-00001.parquet"]  # shard 0 done and deleted
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]  # no partial shard 1


@pytest.mark.parametrize("change, message", [
    ({"hint_column": "alt"}, "no hint column 'alt'"),
    ({"image_column": "jpg"}, "no image column 'jpg'"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"shard_index": 3, "num_shards": 3}, "outside 0..2"),
    ({"prompts": rc.Prompts(vlm="Describe the image.")}, "--vlm-prompt has no {hint}"),
    ({"prompts": rc.Prompts(llm="Shorten {caption} to {words} words")}, "--llm-prompt: cannot fill"),
    ({"output": "in"}, "is the input folder"),
    ({"input": "nowhere"}, "is not a directory"),
    ({"input": "empty"}, "holds no \\*.parquet"),
])
def test_bad_arguments_fail_before_any_model_loads(tmp_path, change, message):
    change = dict(change)
    write_shards(tmp_path / "in", 2, 2)
    (tmp_path / "empty").mkdir()
    loads = []
    kwargs = {"input_dir": tmp_path / change.pop("input", "in"),
              "output_dir": tmp_path / change.pop("output", "out"),
              "num_shards": change.pop("num_shards", 1), "shard_index": change.pop("shard_index", 0),
              "prompts": change.pop("prompts", rc.Prompts())}
    opts = rc.Options(**({"hint_column": "caption"} | change))
    with pytest.raises(rc.RecaptionError, match=message):
        rc.recaption_task(**kwargs, opts=opts, load_models=lambda: loads.append(1))
    assert loads == []


@pytest.mark.parametrize("column, values, message", [
    ("height", ["30"] * 3, "column 'height' is string, expected integer"),
    ("image", ["not bytes"] * 3, "column 'image' has type string; expected binary"),
])
def test_columns_create_phase_would_refuse_fail_before_any_model_loads(tmp_path, column, values, message):
    table = seed_table([0, 1, 2])
    (tmp_path / "in").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)),
                   tmp_path / "in" / "a.parquet")
    loads = []
    with pytest.raises(rc.RecaptionError, match=message):
        run_task(tmp_path / "in", tmp_path / "out", loads=loads)
    assert loads == [] and not list((tmp_path / "out").glob("*.parquet"))


# --------------------------------------------------------------------------------------------------
# SLURM wrapper
# --------------------------------------------------------------------------------------------------


def test_slurm_wrapper_dry_run_prints_this_tasks_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"DRY_RUN": "1", "INPUT": str(tmp_path / "my in"), "OUTPUT": "/o", "SLURM_ARRAY_TASK_ID": "3",
            "SLURM_ARRAY_TASK_COUNT": "8", "LLM": "local/llm", "PYTHON": "py"}
    res = subprocess.run(["bash", str(ROOT / "data" / "recaption_SLURM.sh"), "--hint-column", "caption"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[:2] == ["py", str(ROOT / "data" / "recaption_parquets.py")]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags == {"--input": str(tmp_path / "my in"), "--output": "/o",
                     "--vlm": "llava-hf/llama3-llava-next-8b-hf", "--llm": "local/llm", "--num-shards": "8",
                     "--shard-index": "3", "--batch-size": "16", "--hint-column": "caption"}

    del env["INPUT"]
    res = subprocess.run(["bash", str(ROOT / "data" / "recaption_SLURM.sh")], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode != 0 and "set INPUT" in res.stderr


def test_cli_defaults_shard_index_and_count_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "6")
    args = cli.parse_args(["--input", "i", "--output", "o", "--vlm", "v", "--llm", "l"])
    assert (args.shard_index, args.num_shards) == (5, 6)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    args = cli.parse_args(["--input", "i", "--output", "o", "--vlm", "v", "--llm", "l", "--shard-index", "2"])
    assert (args.shard_index, args.num_shards) == (2, 1)


# --------------------------------------------------------------------------------------------------
# Tiny real models through the real loading code
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return make_tiny_vlm(root / "vlm"), make_tiny_llm(root / "llm")


def test_tiny_models_batched_captions_match_one_at_a_time(tiny_models):
    vlm_dir, llm_dir = tiny_models
    vlm = rc.HFDescriber(str(vlm_dir), device="cpu", dtype=rc.resolve_dtype("auto", "cpu"), max_new_tokens=12)
    llm = rc.HFShortener(str(llm_dir), device="cpu", dtype=rc.resolve_dtype("auto", "cpu"), max_new_tokens=8)
    ids = list(range(7))
    # A hint that spells the image placeholder must stay text, or the batch would have too many image tokens.
    hints = {1: "a red sign reads <image> open", 4: "x " * 40}
    table = seed_table(ids, corrupt=frozenset({2, 3}), hints=hints)
    images, hints = table.column("image").to_pylist(), table.column("caption").to_pylist()
    opts = {"min_distinct_words": 1, "max_short_words": 1000}
    batched = rc.recaption_rows(images, hints, vlm=vlm, llm=llm, prompts=rc.Prompts(),
                                opts=rc.Options(batch_size=4, **opts))
    single = rc.recaption_rows(images, hints, vlm=vlm, llm=llm, prompts=rc.Prompts(),
                               opts=rc.Options(batch_size=1, **opts))
    # Row 1 passes: its "<image>" stayed text (unsanitised, its batch and then the row alone would fail).
    assert batched.reasons == [None, None, "decode_error", "decode_error", None, None, None]
    good = [0, 1, 4, 5, 6]
    assert len({batched.long[i] for i in good}) >= 2  # the comparison below can tell rows apart
    assert batched.long == single.long and batched.short == single.short
    assert all(len(batched.long[i].split()) <= 12 for i in good)  # bounded new tokens


@pytest.mark.slow
def test_cli_and_slurm_wrapper_run_end_to_end_with_tiny_models(tiny_models, tmp_path):
    vlm_dir, llm_dir = tiny_models
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, 2, 5, corrupt=frozenset({1, 7}))
    common = ["--vlm-max-new-tokens", "12", "--llm-max-new-tokens", "8", "--min-distinct-words", "1",
              "--keep-null-captions"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "data/recaption_parquets.py", "--input", str(src), "--output", str(out), "--vlm",
         str(vlm_dir), "--llm", str(llm_dir), "--num-shards", "2", "--shard-index", "0", "--hint-column",
         "caption", "--batch-size", "3", *common],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rows in 5, rows out 5" in res.stdout and "decode_error 1" in res.stdout
    env |= {"INPUT": str(src), "OUTPUT": str(out), "VLM": str(vlm_dir), "LLM": str(llm_dir),
            "PYTHON": sys.executable, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
            "SLURM_SUBMIT_DIR": str(ROOT)}
    res = subprocess.run(["bash", str(ROOT / "data" / "recaption_SLURM.sh"), *common], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    for i, ids in enumerate([range(5), range(5, 10)]):
        table = pq.read_table(out / f"part-0000{i}.parquet")
        assert table.column("id").to_pylist() == [f"img{r:05d}" for r in ids]
        long = table.column("recaption").to_pylist()
        assert [c is None for c in long] == [r in (1, 7) for r in ids]
        assert all(isinstance(c, str) and c for c in long if c is not None)
        assert json.loads((out / f"_summary_shard{i}of2.json").read_text())["reasons"] == {"decode_error": 1}


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_tiny_models_run_in_bf16(tiny_models, device):
    """The dtype a GPU run gets ('auto' on CUDA is bf16), on the CPU too: pixel values reach the bf16 VLM in
    its dtype, generation works, a corrupt image is a counted reason and the rest get captions."""
    vlm_dir, llm_dir = tiny_models
    dtype = rc.resolve_dtype("auto", "cuda")
    assert dtype == torch.bfloat16 and rc.resolve_dtype("auto", "cpu") == torch.float32
    vlm = rc.HFDescriber(str(vlm_dir), device=device, dtype=dtype, max_new_tokens=8)
    llm = rc.HFShortener(str(llm_dir), device=device, dtype=dtype, max_new_tokens=8)
    assert vlm.model.dtype == torch.bfloat16 and llm.model.dtype == torch.bfloat16
    assert vlm.model.device.type == device and llm.model.device.type == device
    table = seed_table(list(range(5)), corrupt=frozenset({1}))
    rows = rc.recaption_rows(table.column("image").to_pylist(), table.column("caption").to_pylist(), vlm=vlm,
                             llm=llm, prompts=rc.Prompts(),
                             opts=rc.Options(batch_size=4, min_distinct_words=1, max_short_words=1000))
    assert rows.reasons[1] == "decode_error" and sum(r is None for r in rows.reasons) >= 3


# --------------------------------------------------------------------------------------------------
# The data layer accepts the output (create_phase, create_indices live on the data branch)
# --------------------------------------------------------------------------------------------------


def test_create_phase_and_create_indices_accept_the_output(tmp_path):
    src = tmp_path / "raw"
    write_shards(src, 2, 6, corrupt=frozenset({2}))
    run_task(src, tmp_path / "recaptioned")
    res = subprocess.run([sys.executable, "data/create_phase.py", "--input", str(tmp_path / "recaptioned"),
                          "--output", str(tmp_path / "phase"), "--max-res", "256"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "src/create_indices.py", "--data", str(tmp_path / "phase"),
                          "--out", str(tmp_path / "index.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "index.json").exists()
    phase = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "phase").glob("*.parquet"))])
    ours = {expected_captions(r)[1] for r in range(12) if r != 2}
    assert 0 < phase.num_rows <= 11 and set(phase.column("recaption_short").to_pylist()) <= ours
