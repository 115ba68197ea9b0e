"""The parquet columns of a dataset (seed-compatible) and their validation.

| column            | type                  | meaning                                                   |
| ----------------- | --------------------- | --------------------------------------------------------- |
| `image`           | binary                | encoded image bytes (JPEG, PNG, WebP, ...)                |
| `recaption`       | string                | detailed caption (one or two sentences)                   |
| `recaption_short` | string                | one short sentence                                        |
| `height`, `width` | integer               | pixel size (the seed wrote them swapped: never trusted)   |
| `aspect_ratio`    | float                 | width / height                                            |
| `bucket_size`     | string 'WxH'          | the bucket the row trains in, width first                 |
| `class`, `id`     | any                   | kept as they are                                          |

`image` may also be the struct {bytes, path} that Hugging Face `datasets` writes for its Image feature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc


class DataError(ValueError):
    """A dataset, shard or index is unusable. The message names the file and the fix."""


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return True
    # Hugging Face `datasets` Image feature: struct<bytes: binary, path: string>
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_image(t.field("bytes").type)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or (
        pa.types.is_dictionary(t) and _is_string(t.value_type))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _anything(t: pa.DataType) -> bool:
    return True


COLUMNS: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    "image": ("binary (encoded image bytes)", _is_image),
    "recaption": ("string", _is_string),
    "recaption_short": ("string", _is_string),
    "height": ("integer", pa.types.is_integer),
    "width": ("integer", pa.types.is_integer),
    "aspect_ratio": ("number", _is_number),
    "bucket_size": ("string 'WxH'", _is_string),
    "class": ("any", _anything),
    "id": ("any", _anything),
}
"""Seed column name -> (expected type in words, type check)."""

TRAIN_COLUMNS = ("image", "recaption", "recaption_short", "bucket_size")
"""Columns a training dataset must have (checked for every shard by create_indices)."""
READ_COLUMNS = ("image", "recaption", "recaption_short")
"""Columns the reader fetches for a batch (never the others)."""
PHASE_COLUMNS = ("image",)
"""Columns create_phase needs in its input; every other column is carried over."""


def schema_problems(schema: pa.Schema, required: Iterable[str]) -> list[str]:
    """What is missing or mistyped, one phrase each; empty when the schema is fine.

    Seed columns that are present are type-checked even when not required."""
    problems = []
    names = set(schema.names)
    for name in required:
        if name not in names:
            problems.append(f"missing column '{name}' ({COLUMNS[name][0]})")
    for name, (words, check) in COLUMNS.items():
        if name in names and not check(schema.field(name).type):
            problems.append(f"column '{name}' is {schema.field(name).type}, expected {words}")
    return problems


def check_schema(schema: pa.Schema, required: Iterable[str], *, where: str, fix: str = "") -> None:
    """Raise DataError listing every missing or mistyped column of `where` (a shard path)."""
    problems = schema_problems(schema, required)
    if problems:
        hint = f"; {fix}" if fix else ""
        raise DataError(f"{where}: " + "; ".join(problems) + hint)


def image_bytes(column: pa.Array | pa.ChunkedArray) -> list[bytes | None]:
    """The encoded bytes of an `image` column as Python bytes (None for nulls)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")  # a null struct stays null
    return column.to_pylist()
