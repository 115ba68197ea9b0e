"""import_images: bring your own data. Turns a folder of images with caption files, img2dataset output
(webdataset tars or parquet) or a Hugging Face dataset saved to disk into raw seed-schema parquet shards
that create_phase accepts.

    report = import_images("photos/", "data/mine/raw", ImportOptions(rows_per_shard=10_000))

Input kinds (`detect_kind` picks one from what the input holds; `ImportOptions.kind` forces one):

- `folder`: a tree of images (jpg, png, webp, gif, bmp, tiff) with sidecar captions of the same name:
  `NAME.txt`, `NAME.caption` or the `json_caption_key` of `NAME.json`, tried in that order. id: the
  relative path.
- `webdataset`: `.tar` shards as img2dataset writes them, members `KEY.jpg|png|webp|...` with `KEY.txt`,
  `KEY.caption` and/or `KEY.json`, read with tarfile's streaming mode (never extracted). id: `TAR/KEY`.
- `parquet`: any column names: the image as binary, Hugging Face's `{bytes, path}` struct or a file path
  (img2dataset's `jpg`/`txt` columns are found on their own); captions from `caption_column` (found among
  recaption, caption, text, txt, prompt, ... when not given). id: the input's `id` column, else `FILE:ROW`.
- `hf`: a folder written by `Dataset.save_to_disk` (Arrow IPC stream files listed in `state.json`) or
  `DatasetDict.save_to_disk` (`dataset_dict.json`, one such folder per split); columns as for parquet.
  id: the input's `id` column, else the row number (`SPLIT/ROW` for a DatasetDict).

Output: `part-NNNNN.parquet` shards of `rows_per_shard` rows with `image` (the original encoded bytes),
`recaption`, `recaption_short` (given, else the caption's first sentence when it has several, else empty:
training then uses the other caption), `height`, `width` (true pixel size after EXIF rotation, read by
decoding the image), `aspect_ratio` (width / height), `id`, then carried columns (every other input
column of parquet and hf inputs; `url` from img2dataset's json). No `bucket_size`: create_phase writes it.

Every input item is read in one fixed order (sorted paths; tar members in order; rows in order) and
checked; a skipped item counts once, under the first reason found: unreadable file or caption file, no
image (a tar sample without one), missing caption (unless `missing_caption='empty'`), empty image,
undecodable image (truncated, not an image, ...). An
input that cannot be read at all (a broken tar or parquet footer) is listed in the report; the others
go on, and what it yielded before breaking is kept.

Resume: output shard k holds valid rows [k R, (k+1) R) of that order. Each shard is written under a
hidden name, fsynced and renamed; its parquet footer (key `sd3_import`) records where the input stood
after its last row and the counts so far. A rerun checks the finished shards (same input and options),
continues from the last one's position and writes the rest: the final set equals an uninterrupted run's,
with no duplicates or gaps. One import per output folder at a time.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import posixpath
import re
import tarfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tqdm import tqdm

from sd3.atomic import atomic_write_bytes, publish, remove, stale_temporaries, temporary_sibling
from sd3.data.images import ImageError, decode_rgb
from sd3.data.schema import COLUMNS, DataError, image_bytes

KINDS = ("folder", "webdataset", "parquet", "hf")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".caption", ".json")
"""Sidecar caption files, in the order they are tried (the first non-empty caption wins)."""
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
SHARD_PREFIX = "part-"
FOOTER_KEY = b"sd3_import"
SUMMARY_NAME = "_import_summary.json"
FORMAT_VERSION = 1

# Auto-detected columns of parquet and hf inputs, in order of preference.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("recaption", "caption", "text", "txt", "prompt", "alt_text", "sentence")
SHORT_CAPTION_COLUMNS = ("recaption_short", "short_caption", "caption_short")
WRITTEN = ("image", "recaption", "recaption_short", "height", "width", "aspect_ratio", "bucket_size", "id")
"""Columns this importer writes (or leaves to create_phase): input columns of these names are not carried."""

# Skip reasons, in the order they are checked (an item counts once, under the first that applies).
UNREADABLE = "unreadable file"
BAD_CAPTION_FILE = "unreadable caption file"
NO_IMAGE = "no image"
MISSING_CAPTION = "missing caption"
EMPTY_IMAGE = "empty image"
UNDECODABLE = "undecodable image"

# Memory bounds: a row group is written at whichever comes first, and the checking processes get
# WINDOW_PER_WORKER items each at a time; nothing else holds image bytes.
_GROUP_ROWS = 256
_GROUP_BYTES = 64 << 20
WINDOW_PER_WORKER = 64
POOL_AFTER_ITEMS = 2000
"""Images checked in this process before the worker processes start (see _Checker)."""


@dataclass(frozen=True)
class ImportOptions:
    kind: str | None = None
    """One of KINDS; None detects it from the input."""
    rows_per_shard: int = 10_000
    image_column: str | None = None
    caption_column: str | None = None
    short_caption_column: str | None = None
    json_caption_key: str = "caption"
    json_short_caption_key: str | None = None
    missing_caption: str = "drop"
    """'drop' rows without a caption (counted), or keep them with 'empty' captions."""
    short_caption: str = "first-sentence"
    """When no short caption is given: 'first-sentence' of the caption (empty when it has only one), or 'empty'."""
    split: str | None = None
    """hf DatasetDict: the split(s) to import, comma-separated; None imports all, in the saved order."""
    workers: int = 1
    """Processes that decode images to check them (1: in this process)."""

    def validate(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise DataError(f"--kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.rows_per_shard <= 0:
            raise DataError(f"--rows-per-shard must be positive, got {self.rows_per_shard}")
        if self.missing_caption not in ("drop", "empty"):
            raise DataError(f"--missing-caption {self.missing_caption!r} must be 'drop' or 'empty'")
        if self.short_caption not in ("first-sentence", "empty"):
            raise DataError(f"--short-caption {self.short_caption!r} must be 'first-sentence' or 'empty'")
        if self.workers < 1:
            raise DataError(f"--workers must be at least 1, got {self.workers}")
        if not self.json_caption_key:
            raise DataError("--json-caption-key must not be empty")


# --------------------------------------------------------------------------------------------------
# Items: what every source yields, in its fixed order
# --------------------------------------------------------------------------------------------------


@dataclass
class Item:
    unit: int
    """Which input unit (file) it came from, and its position there: the resume cursor is (unit, index + 1)."""
    index: int
    id: Any
    image: bytes | None = None
    caption: str | None = None
    short: str | None = None
    carried: dict = field(default_factory=dict)
    problem: str = ""
    """A skip reason found while reading (an unreadable file), with its detail."""
    detail: str = ""
    size: tuple[int, int] | str | None = None
    """(width, height) once the image decoded, or why it did not (check_image)."""


@dataclass
class UnitFailure:
    """An input unit that could not be read (at all, or from `index` on)."""
    unit: int
    index: int
    name: str
    error: str


def clean_caption(value: Any) -> str | None:
    """A caption value -> one line of text, or None when there is none. Lists take their first non-empty
    string (datasets with several captions per image)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())                                # newlines and runs of spaces -> one space
    return text or None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def first_sentence(text: str) -> str:
    """The first sentence of text when it has more than one, else '' (the caption is short already)."""
    parts = _SENTENCE_END.split(text, maxsplit=1)
    return parts[0] if len(parts) > 1 else ""


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig", errors="replace")


def _json_captions(raw: bytes | str, key: str, short_key: str | None) -> tuple[str | None, str | None, dict]:
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    short = clean_caption(meta.get(short_key)) if short_key else None
    return clean_caption(meta.get(key)), short, meta


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else path.name


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class Source(ABC):
    """A fixed-order stream of Items over a list of units (files)."""

    kind: str
    root: Path
    units: list[str]
    carried: pa.Schema
    """Columns carried from the input, written after `id`."""
    id_type: pa.DataType = pa.string()
    columns: dict[str, str | None]
    """The resolved input columns / keys (part of the fingerprint)."""
    total: int | None
    """Items to read, when known up front (the progress bar's total)."""

    def listing(self) -> str:
        """What the input is, as text: its hash decides whether finished shards belong to this import."""
        return "\n".join(self.units)

    @abstractmethod
    def items(self, unit: int, index: int) -> Iterator[Item | UnitFailure]:
        """Items from position `index` of unit `unit` on, in order, with failures where inputs break."""


def _walk(root: Path, exclude: Path | None) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted visible file names) for every folder under root, in sorted order, skipping
    hidden names and the output folder."""
    excluded = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (excluded is None or (here / d).resolve() != excluded))
        yield here, sorted(f for f in filenames if not f.startswith("."))


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_EXTS)


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


class FolderSource(Source):
    kind = "folder"

    def __init__(self, root: Path, opts: ImportOptions, exclude: Path | None):
        self.root, self.opts = root, opts
        self.entries: list[tuple[str, tuple[str, ...]]] = []       # (image path, its sidecar paths in order)
        for here, names in _walk(root, exclude):
            by_stem: dict[str, dict[str, str]] = {}
            for name in names:
                stem, ext = os.path.splitext(name)
                by_stem.setdefault(stem, {})[ext.lower()] = name
            for name in names:
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTS:
                    found = by_stem[stem]
                    sidecars = tuple(_rel(here / found[e], root) for e in CAPTION_EXTS if e in found)
                    self.entries.append((_rel(here / name, root), sidecars))
        self.entries.sort()
        if not self.entries:
            raise DataError(f"{root}: no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) found; point --input at "
                            "the folder of images and caption files")
        self.units = ["."]
        self.total = len(self.entries)
        self.carried = pa.schema([])
        self.columns = {"json_caption_key": opts.json_caption_key,
                        "json_short_caption_key": opts.json_short_caption_key}

    def listing(self) -> str:
        return "\n".join(f"{image}\t{' '.join(sidecars)}" for image, sidecars in self.entries)

    def items(self, unit: int, index: int) -> Iterator[Item]:
        if unit > 0:
            return
        for i in range(index, len(self.entries)):
            image, sidecars = self.entries[i]
            item = Item(0, i, image)
            try:
                item.image = (self.root / image).read_bytes()
            except OSError as e:
                item.problem, item.detail = UNREADABLE, f"{type(e).__name__}: {e}"
                yield item
                continue
            for sidecar in sidecars:
                try:
                    if sidecar.endswith(".json"):
                        long, short, _ = _json_captions((self.root / sidecar).read_bytes(),
                                                        self.opts.json_caption_key, self.opts.json_short_caption_key)
                    else:
                        long, short = clean_caption(_read_text(self.root / sidecar)), None
                except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, not an object
                    item.problem, item.detail = BAD_CAPTION_FILE, f"{sidecar}: {type(e).__name__}: {e}"
                    break
                item.short = item.short or short
                if long:
                    item.caption = long
                    break
            yield item


class WebDatasetSource(Source):
    """img2dataset / webdataset tars: a sample is the run of consecutive members sharing a key (the
    member path up to the first '.' of its file name), read with tarfile's streaming mode."""

    kind = "webdataset"

    def __init__(self, root: Path, opts: ImportOptions, exclude: Path | None):
        self.root, self.opts = root, opts
        if root.is_file():
            self.units = [root.name]
            self.base = root.parent
        else:
            self.base = root
            self.units = sorted(_rel(here / n, root) for here, names in _walk(root, exclude)
                                for n in names if _is_tar(n))
        if not self.units:
            raise DataError(f"{root}: no .tar shards found; point --input at img2dataset's output folder")
        self.total = None
        self.carried = pa.schema([("url", pa.string())])
        self.columns = {"json_caption_key": opts.json_caption_key,
                        "json_short_caption_key": opts.json_short_caption_key}

    def listing(self) -> str:
        return "\n".join(f"{u}\t{(self.base / u).stat().st_size}" for u in self.units)

    def items(self, unit: int, index: int) -> Iterator[Item | UnitFailure]:
        for u in range(unit, len(self.units)):
            yield from self._tar(u, index if u == unit else 0)

    def _tar(self, u: int, start: int) -> Iterator[Item | UnitFailure]:
        name = self.units[u]
        n = 0                                                     # samples seen in this tar
        key: str | None = None
        members: dict[str, bytes] = {}
        error = ""
        try:
            with tarfile.open(self.base / name, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = posixpath.split(member.name)
                    dot = base.find(".")
                    if dot <= 0:
                        continue                                  # no extension: not part of a sample
                    this = posixpath.join(folder, base[:dot])
                    if this != key:
                        if key is not None:
                            if n >= start:
                                yield self._sample(u, n, key, members)
                            n += 1
                        key, members = this, {}
                    ext = base[dot:].lower()
                    if n >= start and (ext in IMAGE_EXTS or ext in CAPTION_EXTS) and ext not in members:
                        members[ext] = tar.extractfile(member).read()  # streaming: only the current member
                end = tar.offset
            if not _tar_end_ok(self.base / name, end):
                error = f"cut off or damaged after byte {end}: no end-of-archive block there"
        except Exception as e:  # TarError, EOFError, zlib.error, ...: a broken stream never stops the import
            error = f"{type(e).__name__}: {e}"
        if key is not None and n >= start:
            yield self._sample(u, n, key, members)              # members are only kept when read whole
            n += 1
        if error:
            yield UnitFailure(u, max(n, start), name, error)

    def _sample(self, u: int, n: int, key: str, members: dict[str, bytes]) -> Item:
        item = Item(u, n, f"{self.units[u]}/{key}", carried={"url": None})
        item.image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if item.image is None:
            item.problem, item.detail = NO_IMAGE, f"members: {', '.join(sorted(members)) or 'none'}"
            return item
        for ext in CAPTION_EXTS:
            if ext not in members:
                continue
            if ext == ".json":
                try:
                    long, short, meta = _json_captions(members[ext], self.opts.json_caption_key,
                                                       self.opts.json_short_caption_key)
                except ValueError as e:
                    item.problem, item.detail = BAD_CAPTION_FILE, f"{key}.json: {e}"
                    return item
                url = meta.get("url")
                item.carried["url"] = url if isinstance(url, str) else None
            else:
                long, short = clean_caption(members[ext]), None
            item.short = item.short or short
            item.caption = item.caption or long
        return item


def _tar_end_ok(path: Path, offset: int) -> bool:
    """Whether a tar stream has its end-of-archive block (512 zero bytes) where tarfile stopped reading.
    tarfile ends silently, as if the archive were complete, at a cut-off or garbled header after the
    first one: without this check a truncated shard would pass for a whole one."""
    opener = gzip.open if path.name.lower().endswith((".gz", ".tgz")) else open
    with opener(path, "rb") as f:
        f.seek(offset)                                            # gzip: decompresses up to there again
        return f.read(512) == bytes(512)


# -- columnar inputs (parquet files, Hugging Face Arrow files) ---------------------------------------


def _hf_image_columns(schema: pa.Schema) -> list[str]:
    """Columns the Hugging Face `datasets` features (schema metadata) call an Image."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return []
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        features = json.loads(meta).get("info", {}).get("features", {})
        return [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    return []


def _image_type_ok(t: pa.DataType) -> bool:
    return COLUMNS["image"][1](t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _caption_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or (
        pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))


def resolve_columns(schema: pa.Schema, opts: ImportOptions, where: str) -> tuple[str, str | None, str | None]:
    """(image, caption, short caption) column names for this schema; DataError names the fix."""
    names = schema.names
    shown = ", ".join(f"{f.name} ({f.type})" for f in schema)

    def given(flag: str, name: str | None) -> str | None:
        if name is not None and name not in names:
            raise DataError(f"{where}: unknown column '{name}' for {flag}; the columns are: {shown}")
        return name

    image = given("--image-column", opts.image_column)
    if image is None:
        hf = [n for n in _hf_image_columns(schema) if n in names]
        image = next(iter(hf), None) or next((n for n in IMAGE_COLUMNS if n in names), None)
    if image is None:
        binary = [f.name for f in schema if COLUMNS["image"][1](f.type)]
        image = binary[0] if len(binary) == 1 else None
    if image is None:
        raise DataError(f"{where}: no image column found; pass --image-column NAME (the columns are: {shown})")
    if not _image_type_ok(schema.field(image).type):
        raise DataError(f"{where}: column '{image}' is {schema.field(image).type}, expected encoded image bytes, "
                        "Hugging Face's {bytes, path} struct or file paths; pass the right --image-column")
    caption = given("--caption-column", opts.caption_column)
    short = given("--short-caption-column", opts.short_caption_column)
    if caption is None:
        caption = next((n for n in CAPTION_COLUMNS if n in names and n != short), None)
    if short is None:
        short = next((n for n in SHORT_CAPTION_COLUMNS if n in names and n != caption), None)
    if caption is None and short is None and opts.missing_caption == "drop":
        raise DataError(f"{where}: no caption column found; pass --caption-column NAME, or --missing-caption empty"
                        f" to import without captions (the columns are: {shown})")
    for flag, name in (("--caption-column", caption), ("--short-caption-column", short)):
        if name is not None and not _caption_type_ok(schema.field(name).type):
            raise DataError(f"{where}: column '{name}' is {schema.field(name).type}, expected text; pass the "
                            f"right {flag}")
    return image, caption, short


class _ColumnarSource(Source):
    """Shared by parquet and hf: units are files of record batches with one unified schema."""

    def _setup(self, schemas: dict[int, pa.Schema], opts: ImportOptions, where: str) -> None:
        """Pick the columns from the files' unified schema. `schemas` has the readable units only."""
        self.carried, self.columns, self.replaced = pa.schema([]), {}, []
        self.image = self.caption = self.short = None
        self.has_id, self.id_type, self.missing_image = False, pa.string(), {}
        if not schemas:
            return
        try:
            unified = pa.unify_schemas(list(schemas.values()), promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"{where}: the files' columns do not agree ({e}); import them separately") from None
        self.image, self.caption, self.short = resolve_columns(unified, opts, where)
        consumed = {self.image, self.caption, self.short}
        self.carried = pa.schema([f for f in unified if f.name not in consumed and f.name not in WRITTEN])
        self.has_id = "id" in unified.names
        self.id_type = unified.field("id").type if self.has_id else pa.string()
        self.replaced = [n for n in unified.names if n in WRITTEN and n not in consumed and n != "id"]
        self.unified = unified
        self.columns = {"image_column": self.image, "caption_column": self.caption,
                        "short_caption_column": self.short}
        self.missing_image = {u: s.names for u, s in schemas.items() if self.image not in s.names}

    folder: Path
    """The folder the units' names are relative to."""

    def listing(self) -> str:
        return "\n".join(f"{u}\t{(self.folder / u).stat().st_size}" for u in self.units)

    def items(self, unit: int, index: int) -> Iterator[Item | UnitFailure]:
        for u in range(unit, len(self.units)):
            yield from self._file(u, index if u == unit else 0)

    def _unit_failure(self, u: int, start: int) -> UnitFailure | None:
        """Why unit u cannot be read at all (unreadable, or no image column), or None."""
        name = self.units[u]
        if u in self.errors:
            return UnitFailure(u, start, name, self.errors[u])
        if u in self.missing_image:
            return UnitFailure(u, start, name, f"no column '{self.image}' (its columns: "
                                               f"{', '.join(self.missing_image[u])})")
        return None

    def _rows(self, u: int, batch: pa.RecordBatch, first: int, row_id: Callable[[int], Any],
              folder: Path) -> Iterator[Item]:
        """Items of one record batch; `first` is the unit-local index of its first row."""
        n = batch.num_rows
        names = batch.schema.names
        images = batch.column(self.image)
        paths: list[str | None] = [None] * n
        if pa.types.is_struct(images.type):
            if images.type.get_field_index("path") >= 0:
                paths = pc.struct_field(images, "path").to_pylist()
            datas = image_bytes(images)
        elif COLUMNS["image"][1](images.type):
            datas = image_bytes(images)
        else:                                                     # file paths
            paths, datas = images.to_pylist(), [None] * n

        def texts(name: str | None) -> list:
            return batch.column(name).to_pylist() if name is not None and name in names else [None] * n

        longs, shorts = texts(self.caption), texts(self.short)
        ids = batch.column("id").to_pylist() if "id" in names else [None] * n
        carried = {}
        for f in self.carried:
            if f.name in names:
                column = batch.column(f.name)
                carried[f.name] = (column if column.type == f.type else column.cast(f.type)).to_pylist()
            else:
                carried[f.name] = [None] * n
        for i in range(n):
            item = Item(u, first + i, ids[i] if self.has_id else row_id(first + i),
                        caption=clean_caption(longs[i]), short=clean_caption(shorts[i]),
                        carried={name: values[i] for name, values in carried.items()})
            item.image = datas[i]
            if not item.image and paths[i]:
                path = Path(paths[i])
                path = path if path.is_absolute() else folder / path
                try:
                    item.image = path.read_bytes()
                except OSError as e:
                    item.problem, item.detail = UNREADABLE, f"{paths[i]}: {type(e).__name__}: {e}"
            yield item


class ParquetSource(_ColumnarSource):
    kind = "parquet"

    def __init__(self, root: Path, opts: ImportOptions, exclude: Path | None):
        self.root = root
        if root.is_file():
            self.base, self.units = root.parent, [root.name]
        else:
            self.base = root
            self.units = sorted(_rel(here / n, root) for here, names in _walk(root, exclude)
                                for n in names if n.endswith(".parquet"))
        self.folder = self.base
        if not self.units:
            raise DataError(f"{root}: no .parquet files found; point --input at the folder of parquet files")
        self.metas: dict[int, pq.FileMetaData] = {}
        self.errors: dict[int, str] = {}
        for u, name in enumerate(self.units):
            try:
                self.metas[u] = pq.read_metadata(self.base / name)
            except (OSError, pa.ArrowException) as e:
                self.errors[u] = f"{type(e).__name__}: {e}"
        self._setup({u: m.schema.to_arrow_schema() for u, m in self.metas.items()}, opts, str(root))
        self.total = sum(m.num_rows for m in self.metas.values())

    def _file(self, u: int, start: int) -> Iterator[Item | UnitFailure]:
        name = self.units[u]
        if failure := self._unit_failure(u, start):
            yield failure
            return
        index = start
        try:
            pf = pq.ParquetFile(self.base / name)
            groups, pos, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):           # whole row groups before `start` are not read
                rows = pf.metadata.row_group(g).num_rows
                if offset + rows > start:
                    pos = offset if pos is None else pos
                    groups.append(g)
                offset += rows
            if not groups:
                return
            wanted = [c for c in pf.schema_arrow.names
                      if c in {self.image, self.caption, self.short, "id"} or c in self.carried.names]
            skip = start - pos
            for batch in pf.iter_batches(batch_size=256, row_groups=groups, columns=wanted):
                lo = min(skip, batch.num_rows)
                skip -= lo
                if lo < batch.num_rows:
                    yield from self._rows(u, batch.slice(lo), pos + lo, lambda r: f"{name}:{r}",
                                          (self.base / name).parent)
                pos += batch.num_rows
                index = pos
        except (OSError, pa.ArrowException) as e:
            yield UnitFailure(u, index, name, f"{type(e).__name__}: {e}")


class HFSource(_ColumnarSource):
    """`Dataset.save_to_disk`: `state.json` lists the Arrow IPC stream files (`data-XXXXX-of-YYYYY.arrow`)
    in row order; `DatasetDict.save_to_disk` adds `dataset_dict.json` with one such folder per split.
    A folder of `.arrow` files without `state.json` (a `datasets` cache) is read in sorted order."""

    kind = "hf"

    def __init__(self, root: Path, opts: ImportOptions, exclude: Path | None):
        self.root = self.folder = root
        splits: list[tuple[str | None, Path]] = []
        if (root / "dataset_dict.json").is_file():
            try:
                names = json.loads((root / "dataset_dict.json").read_text())["splits"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{root / 'dataset_dict.json'} is unreadable ({e}); is this a saved DatasetDict?"
                                ) from None
            wanted = names if opts.split is None else [s.strip() for s in opts.split.split(",") if s.strip()]
            unknown = [s for s in wanted if s not in names]
            if unknown:
                raise DataError(f"{root}: no split {', '.join(map(repr, unknown))}; the splits are: "
                                f"{', '.join(names)} (--split)")
            splits = [(s, root / s) for s in wanted]
        else:
            if opts.split is not None:
                raise DataError(f"{root}: --split needs a saved DatasetDict (dataset_dict.json); this is one dataset")
            splits = [(None, root)]
        self.units, self.split_of = [], []
        for split, folder in splits:
            for f in self._data_files(folder, exclude):
                self.units.append(_rel(folder / f, root))
                self.split_of.append(split)
        if not self.units:
            raise DataError(f"{root}: no .arrow files found; point --input at a folder written by "
                            "Dataset.save_to_disk")
        # Row ids count through each split's files: read every file's batch lengths (headers only, mapped).
        self.counts: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        schemas = {}
        for u in range(len(self.units)):
            try:
                with self._open(u) as reader:
                    schemas[u] = reader.schema
                    self.counts[u] = sum(b.num_rows for b in reader)
            except (OSError, pa.ArrowException) as e:
                self.errors[u] = f"{type(e).__name__}: {e}"
        self._setup(schemas, opts, str(root))
        self.total = sum(self.counts.values())

    @staticmethod
    def _data_files(folder: Path, exclude: Path | None) -> list[str]:
        state = folder / "state.json"
        if state.is_file():
            try:
                return [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{state} is unreadable ({e}); is this a folder written by save_to_disk?") from None
        return sorted(_rel(here / n, folder) for here, names in _walk(folder, exclude)
                      for n in names if n.endswith(".arrow"))

    @contextlib.contextmanager
    def _open(self, u: int) -> Iterator[ipc.RecordBatchStreamReader]:
        with pa.memory_map(str(self.root / self.units[u])) as source:
            try:
                reader = ipc.open_stream(source)
            except pa.ArrowInvalid:                               # the IPC file format (Feather v2) works too
                source.seek(0)
                file = ipc.open_file(source)
                reader = pa.RecordBatchReader.from_batches(
                    file.schema, (file.get_batch(i) for i in range(file.num_record_batches)))
            yield reader

    def _file(self, u: int, start: int) -> Iterator[Item | UnitFailure]:
        name = self.units[u]
        if failure := self._unit_failure(u, start):
            yield failure
            return
        split = self.split_of[u]
        offset = sum(self.counts.get(v, 0) for v in range(u) if self.split_of[v] == split)

        def row_id(r: int) -> str:
            return f"{split}/{offset + r}" if split is not None else str(offset + r)

        first, index = 0, start
        try:
            with self._open(u) as reader:
                for batch in reader:
                    n = batch.num_rows
                    if first + n > start:
                        lo = max(0, start - first)
                        for lo2 in range(lo, n, 256):             # Hugging Face writes 1000-row batches
                            part = batch.slice(lo2, min(256, n - lo2))
                            yield from self._rows(u, part, first + lo2, row_id, (self.root / name).parent)
                            index = first + lo2 + part.num_rows
                    first += n
        except (OSError, pa.ArrowException) as e:
            yield UnitFailure(u, index, name, f"{type(e).__name__}: {e}")


SOURCES: dict[str, type[Source]] = {"folder": FolderSource, "webdataset": WebDatasetSource,
                                    "parquet": ParquetSource, "hf": HFSource}


def detect_kind(root: Path, exclude: Path | None = None) -> str:
    """The input kind from what root holds; DataError when it holds nothing usable or several kinds."""
    if root.is_file():
        name = root.name.lower()
        if _is_tar(name):
            return "webdataset"
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith(".arrow"):
            raise DataError(f"{root}: pass the folder that holds it (with state.json) as --input")
        raise DataError(f"{root} is a file that is not .tar or .parquet; pass a folder as --input")
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        return "hf"
    found: Counter = Counter()
    for _, names in _walk(root, exclude):
        for name in names:
            ext = _suffix(name)
            kind = ("webdataset" if _is_tar(name) else "parquet" if ext == ".parquet" else "hf" if ext == ".arrow"
                    else "folder" if ext in IMAGE_EXTS else None)
            if kind:
                found[kind] += 1
    if not found:
        raise DataError(f"{root}: no images, .tar, .parquet or .arrow files found; point --input at your data")
    if len(found) > 1:
        seen = ", ".join(f"{n} {k}" for k, n in found.most_common())
        raise DataError(f"{root} holds several kinds of input ({seen} files): pass --kind {'|'.join(KINDS)}")
    return next(iter(found))


def open_source(root: str | Path, opts: ImportOptions, exclude: str | Path | None = None) -> Source:
    root = Path(root)
    exclude = Path(exclude) if exclude is not None else None
    if not root.exists():
        raise DataError(f"--input {root} does not exist; point it at your images, tars, parquet files or saved "
                        "dataset")
    kind = opts.kind or detect_kind(root, exclude)
    if kind == "folder" and root.is_file():
        raise DataError(f"--kind folder needs a folder, but {root} is a file")
    return SOURCES[kind](root, opts, exclude)


# --------------------------------------------------------------------------------------------------
# Checking images (in worker processes when asked)
# --------------------------------------------------------------------------------------------------


def check_image(data: bytes | None) -> tuple[int, int] | str:
    """(width, height) of encoded bytes that decode (after EXIF rotation), else EMPTY_IMAGE or the
    decoder's message."""
    if not data:
        return EMPTY_IMAGE
    try:
        img = decode_rgb(data)                                    # (3, H, W)
    except ImageError as e:
        return _ADDRESS.sub("", str(e)) or UNDECODABLE
    return int(img.shape[2]), int(img.shape[1])


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # PIL names a BytesIO by address: keep messages reproducible


class _Checker:
    """check_image over a list, in this process or a pool of spawned ones (order kept)."""

    def __init__(self, workers: int):
        self.pool: ProcessPoolExecutor | None = None
        self.workers = workers
        self.checked = 0

    def __call__(self, datas: Sequence[bytes | None]) -> list[tuple[int, int] | str]:
        """The pool starts once POOL_AFTER_ITEMS were checked here: a small import does not pay for the
        workers' start-up (each imports torch: 2-10 s measured on a busy 2-core machine, more than
        checking 1,000 images takes in one process; tests/benchmarks/bench_import.py)."""
        self.checked += len(datas)
        if self.checked > POOL_AFTER_ITEMS and self.workers > 1 and self.pool is None:
            # spawn: workers start clean (no inherited threads or locks from the parent)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        if self.pool is None or len(datas) < 2:
            return [check_image(d) for d in datas]
        return list(self.pool.map(check_image, datas, chunksize=max(1, len(datas) // (4 * self.workers))))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Output shards
# --------------------------------------------------------------------------------------------------


def output_schema(source: Source) -> pa.Schema:
    fields = [pa.field("image", pa.binary()), pa.field("recaption", pa.string()),
              pa.field("recaption_short", pa.string()), pa.field("height", pa.int64()),
              pa.field("width", pa.int64()), pa.field("aspect_ratio", pa.float64()),
              pa.field("id", source.id_type)]
    return pa.schema(fields + list(source.carried))


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:05d}.parquet"


class _ShardWriter:
    """Rows -> OUTPUT/part-NNNNN.parquet, one shard at a time, in row groups of bounded size, under a
    hidden name until closed (fsync, rename)."""

    def __init__(self, out_dir: Path, schema: pa.Schema, shard: int):
        self.out_dir, self.schema, self.shard = out_dir, schema, shard
        self.rows = 0
        self.buffer: list[dict] = []
        self.buffered_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.tmp: Path | None = None

    def add(self, row: dict) -> None:
        if self.writer is None:
            self.tmp = temporary_sibling(self.out_dir / shard_name(self.shard))
            # Image bytes are already compressed: snappy on them costs read time for nothing.
            codecs = {n: "none" if n == "image" else "snappy" for n in self.schema.names}
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression=codecs)
        self.buffer.append(row)
        self.buffered_bytes += len(row["image"])
        self.rows += 1
        if len(self.buffer) >= _GROUP_ROWS or self.buffered_bytes >= _GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            table = pa.Table.from_pylist(self.buffer, schema=self.schema)
            self.writer.write_table(table, row_group_size=table.num_rows)
            self.buffer, self.buffered_bytes = [], 0

    def close(self, footer: dict) -> Path:
        """Finish the current shard with `footer` in its metadata; returns its path."""
        self._flush()
        self.writer.add_key_value_metadata({FOOTER_KEY: json.dumps(footer)})
        self.writer.close()
        dst = self.out_dir / shard_name(self.shard)
        publish(self.tmp, dst)  # durable before the rename makes it visible
        self.writer, self.tmp, self.rows = None, None, 0
        self.shard += 1
        return dst

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            remove(self.tmp)
            self.writer = None


# --------------------------------------------------------------------------------------------------
# Counts and resume
# --------------------------------------------------------------------------------------------------


@dataclass
class ImportStats:
    rows_in: int = 0
    """Items read (images, samples, rows)."""
    rows_written: int = 0
    skipped: dict = field(default_factory=dict)
    """Reason -> items skipped."""
    examples: dict = field(default_factory=dict)
    """Reason -> one example ('id: detail')."""
    no_caption_kept: int = 0
    """Rows written with empty captions (missing_caption='empty')."""
    failed_inputs: dict = field(default_factory=dict)
    """Input unit -> why it could not be read (at all, or from some point on)."""

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.examples.setdefault(reason, example[:300])


def fingerprint(source: Source, opts: ImportOptions) -> dict:
    """What decides the output: finished shards are reused only when it matches."""
    return {"format": FORMAT_VERSION, "kind": source.kind,
            "input": hashlib.sha256(source.listing().encode()).hexdigest()[:32],
            "rows_per_shard": opts.rows_per_shard, "missing_caption": opts.missing_caption,
            "short_caption": opts.short_caption, "split": opts.split, **source.columns}


@dataclass
class _Resume:
    shards: int = 0
    unit: int = 0
    index: int = 0
    stats: ImportStats = field(default_factory=ImportStats)


def finished_shards(out_dir: Path, expected: dict) -> _Resume:
    """The longest run part-00000, part-00001, ... of whole shards of this import in out_dir, and where
    the input stood after the last one. DataError when out_dir holds shards of another import."""
    state = _Resume()
    if not out_dir.is_dir():
        return state
    others = sorted(p.name for p in out_dir.glob("*.parquet") if not re.fullmatch(r"part-\d{5,}\.parquet", p.name))
    if others:
        raise DataError(f"--output {out_dir} holds other parquet files ({', '.join(others[:3])}): choose an empty "
                        "folder for the import")
    k = 0
    while (out_dir / shard_name(k)).is_file():
        path = out_dir / shard_name(k)
        try:
            meta = pq.read_metadata(path).metadata or {}
            footer = json.loads(meta[FOOTER_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError):
            footer = None
        if footer is None:
            raise DataError(f"{path} was not written by import_images (or is damaged): remove it, or choose an "
                            "empty --output folder")
        if footer.get("fingerprint") != expected:
            theirs = footer.get("fingerprint") or {}
            differ = [f"{key} {theirs.get(key)!r} -> {expected.get(key)!r}" for key in expected
                      if theirs.get(key) != expected.get(key)]
            raise DataError(f"--output {out_dir} holds shards of an import with other inputs or options "
                            f"({'; '.join(differ)}): rerun with the same ones to resume, or choose an empty folder")
        state = _Resume(k + 1, footer["unit"], footer["index"], ImportStats(**footer["stats"]))
        k += 1
    return state


# --------------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    kind: str
    input: str
    output: str
    stats: ImportStats
    shards: int
    """Output shards in all."""
    shards_written: int
    """Written by this run (the rest were finished by an earlier one)."""
    seconds: float
    columns: dict
    replaced_columns: list[str] = field(default_factory=list)
    summary_path: str = ""

    @property
    def failed(self) -> dict:
        return self.stats.failed_inputs

    def to_json(self) -> dict:
        return {"kind": self.kind, "input": self.input, "output": self.output, **asdict(self.stats),
                "rows_skipped": sum(self.stats.skipped.values()), "shards": self.shards,
                "shards_written_now": self.shards_written, "shards_already_done": self.shards - self.shards_written,
                "seconds": round(self.seconds, 3), "columns": self.columns, "replaced_columns": self.replaced_columns}

    def __str__(self) -> str:
        s = self.stats
        done = self.shards - self.shards_written
        lines = [f"import_images ({self.kind}): {s.rows_written:,} of {s.rows_in:,} rows written to {self.shards} "
                 f"shards ({self.shards_written} now, {done} already done) in {self.seconds:.1f} s -> {self.output}"]
        if s.skipped:
            lines.append("skipped: " + ", ".join(f"{n:,} {why}" for why, n in sorted(s.skipped.items(),
                                                                                    key=lambda kv: -kv[1])))
            lines += [f"  e.g. {why}: {example}" for why, example in sorted(s.examples.items())]
        if s.no_caption_kept:
            lines.append(f"kept {s.no_caption_kept:,} rows without a caption (--missing-caption empty)")
        if self.replaced_columns:
            lines.append(f"input columns not carried (written anew): {', '.join(self.replaced_columns)}")
        lines += [f"FAILED {name}: {error}" for name, error in s.failed_inputs.items()]
        if self.summary_path:
            lines.append(f"summary: {self.summary_path}")
        return "\n".join(lines)


def _windows(items: Iterator, size: int) -> Iterator[list]:
    window = []
    for x in items:
        window.append(x)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def import_images(input_path: str | Path, output_dir: str | Path, opts: ImportOptions | None = None, *,
                  progress: bool = True, on_row: Callable[[Item], None] | None = None) -> ImportReport:
    """Import input_path into raw shards in output_dir (see the module docstring). Raises DataError for
    bad options or inputs (before any work); unreadable inputs are listed in the report instead.
    `on_row` is called after each item is handled (tests use it to slow a run down)."""
    t0 = time.perf_counter()
    opts = opts or ImportOptions()
    opts.validate()
    out_dir = Path(output_dir)
    if out_dir.resolve() == Path(input_path).resolve():
        raise DataError(f"--output {out_dir} is the --input folder: write the shards to a folder of their own")
    source = open_source(input_path, opts, exclude=out_dir)
    expected = fingerprint(source, opts)
    resume = finished_shards(out_dir, expected)
    stats = resume.stats
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(out_dir, SHARD_PREFIX):          # left by a killed run
        remove(stale)

    schema = output_schema(source)
    writer = _ShardWriter(out_dir, schema, resume.shards)
    check = _Checker(opts.workers)
    derive = opts.short_caption == "first-sentence"

    def footer(unit: int, index: int) -> dict:
        return {"fingerprint": expected, "unit": unit, "index": index, "stats": asdict(stats)}

    bar = tqdm(total=source.total, initial=stats.rows_in, unit="img", desc="import", disable=None if progress else True)
    try:
        for window in _windows(source.items(resume.unit, resume.index), WINDOW_PER_WORKER * opts.workers):
            items = [x for x in window if isinstance(x, Item)]
            todo = [x for x in items if not x.problem and x.image
                    and (x.caption or x.short or opts.missing_caption == "empty")]
            for x, size in zip(todo, check([x.image for x in todo])):
                x.size = size
            for x in window:
                if isinstance(x, UnitFailure):
                    stats.failed_inputs[x.name] = x.error
                    continue
                stats.rows_in += 1
                bar.update(1)
                if x.problem:
                    stats.skip(x.problem, f"{x.id}: {x.detail}")
                elif not (x.caption or x.short) and opts.missing_caption == "drop":
                    stats.skip(MISSING_CAPTION, str(x.id))
                elif not x.image:
                    stats.skip(EMPTY_IMAGE, str(x.id))
                elif isinstance(x.size, str):
                    reason = EMPTY_IMAGE if x.size == EMPTY_IMAGE else UNDECODABLE
                    stats.skip(reason, f"{x.id}: {x.size}" if reason == UNDECODABLE else str(x.id))
                else:
                    w, h = x.size
                    long = x.caption or ""
                    short = x.short or (first_sentence(long) if derive else "")
                    stats.no_caption_kept += not (long or short)
                    writer.add({"image": x.image, "recaption": long, "recaption_short": short, "height": h,
                                "width": w, "aspect_ratio": w / h, "id": x.id, **x.carried})
                    stats.rows_written += 1
                    if writer.rows == opts.rows_per_shard:
                        writer.close(footer(x.unit, x.index + 1))
                if on_row is not None:
                    on_row(x)
        if writer.rows:
            writer.close(footer(len(source.units), 0))            # the last shard: the input is done
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        check.close()

    report = ImportReport(kind=source.kind, input=str(input_path), output=str(out_dir), stats=stats,
                          shards=writer.shard, shards_written=writer.shard - resume.shards,
                          seconds=time.perf_counter() - t0, columns=source.columns,
                          replaced_columns=list(getattr(source, "replaced", [])))
    summary = out_dir / SUMMARY_NAME
    atomic_write_bytes(summary, json.dumps(report.to_json(), indent=2, default=str).encode())
    report.summary_path = str(summary)
    return report
