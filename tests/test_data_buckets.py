"""Bucket snapping (the seed's create_phase rule) and the parquet schema check."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sd3.data.buckets import bucket_problem, format_bucket, parse_bucket, snap_size
from sd3.data.schema import TRAIN_COLUMNS, DataError, check_schema, image_bytes, schema_problems


@pytest.mark.parametrize(("size", "kwargs", "bucket"), [
    ((1000, 500), {}, (256, 128)),                 # long side capped, aspect kept
    ((300, 200), {}, (256, 176)),                  # 256 x 170.7 -> nearest multiple of 16
    ((100, 60), {}, (96, 64)),                     # no upscaling: only snapped
    ((100, 60), {"upscale": True}, (256, 160)),    # upscaling when asked
    ((5, 5), {}, (16, 16)),                        # never below one multiple
    ((4000, 50), {}, (256, 16)),                   # extreme aspect: short side clamped to one multiple
    ((500, 1000), {}, (128, 256)),                 # portrait: W first
    ((256, 256), {}, (256, 256)),
])
def test_snap_size_follows_the_seed_rule(size, kwargs, bucket):
    assert snap_size(*size, max_res=256, multiple=16, **kwargs) == bucket


def test_snap_size_always_lands_on_the_grid_under_max_res():
    rng = np.random.default_rng(0)
    for w, h in rng.integers(1, 3000, size=(2000, 2)):
        for max_res, multiple in ((256, 16), (64, 8), (250, 16)):
            W, H = snap_size(int(w), int(h), max_res=max_res, multiple=multiple)
            assert W % multiple == 0 and H % multiple == 0
            assert multiple <= W <= max_res and multiple <= H <= max_res
            if min(W, H) > 4 * multiple:  # aspect ratio kept up to the snapping error
                assert abs(np.log((W / H) / (w / h))) < 0.15


def test_snap_size_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="side <= 0"):
        snap_size(0, 10, max_res=256, multiple=16)
    with pytest.raises(ValueError, match="max_res=8"):
        snap_size(10, 10, max_res=8, multiple=16)


def test_bucket_strings_round_trip_width_first():
    assert parse_bucket("256x192") == (256, 192)
    assert parse_bucket(" 64X48 ") == (64, 48)
    assert format_bucket(256, 192) == "256x192"
    for bad in ("256", "axb", "0x64", "", None, "256x192x3"):
        with pytest.raises(ValueError, match="bucket_size"):
            parse_bucket(bad)


def test_bucket_problem_names_the_reason():
    assert bucket_problem((256, 192), max_res=256, multiple=16) is None
    assert "max_res=256" in bucket_problem((512, 256), max_res=256, multiple=16)
    assert "multiple of 16" in bucket_problem((64, 40), max_res=256, multiple=16)


def test_schema_check_lists_everything_missing_or_mistyped():
    schema = pa.schema([("image", pa.string()), ("recaption", pa.string()), ("height", pa.float32())])
    with pytest.raises(DataError) as err:
        check_schema(schema, TRAIN_COLUMNS, where="shard.parquet", fix="run create_phase")
    msg = str(err.value)
    assert msg.startswith("shard.parquet:")
    for expected in ("missing column 'recaption_short'", "missing column 'bucket_size'",
                     "column 'image' is string, expected binary", "column 'height' is float",
                     "run create_phase"):
        assert expected in msg


def test_schema_accepts_seed_and_hugging_face_layouts():
    hf_image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", hf_image), ("recaption", pa.large_string()),
                        ("recaption_short", pa.string()),
                        ("bucket_size", pa.dictionary(pa.int32(), pa.string())), ("class", pa.int64()),
                        ("id", pa.string()), ("height", pa.int32()), ("width", pa.int64()),
                        ("aspect_ratio", pa.float32())])
    assert schema_problems(schema, TRAIN_COLUMNS) == []
    column = pa.array([{"bytes": b"abc", "path": "x.jpg"}, None, {"bytes": None, "path": "y"}], hf_image)
    assert image_bytes(column) == [b"abc", None, None]
    assert image_bytes(pa.chunked_array([pa.array([b"a"]), pa.array([b"b", None])])) == [b"a", b"b", None]
