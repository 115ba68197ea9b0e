"""recaption: a VLM writes a detailed caption of each row's image, a chat LLM distils it to one sentence.

    summary = recaption_task(input_dir=Path("raw"), output_dir=Path("recaptioned"), num_shards=8,
                             shard_index=3, load_models=lambda: load_hf_models(vlm, llm, ...),
                             prompts=Prompts(), opts=Options(hint_column="caption"))

The command line is `data/recaption_parquets.py` (`data/recaption_SLURM.sh` runs it as a SLURM array).

Per row: the image bytes (`schema.image_bytes`: binary or Hugging Face's {bytes, path} struct) are
decoded by `images.open_rgb`, the decoder the trainer uses, so the VLM sees the trainer's pixels (16-bit,
float, transparent, CMYK, palette and EXIF-rotated images included), shrunk to `max_image_side` -> the
VLM describes it, with the row's alt-text as a hint -> quality filters -> the LLM rewrites the description
as one sentence of at most 40 words -> filters. Every input column is kept unchanged and in order;
`recaption` and `recaption_short` are added (or overwritten in place). A row that fails anywhere gets
null captions and a counted reason (`REASONS`); such rows are dropped unless `keep_null_captions`.
Captions are keyed by row index through every stage, so a failed row never shifts another's caption.

Safe to kill and rerun: each output shard is written through `sd3.atomic.atomic_path` (a hidden
temporary sibling, fsynced, renamed when whole), a rerun skips finished shards, redoes unfinished ones
from scratch and removes the temporaries that killed runs left of this task's shards; `delete_input`
deletes an input shard only after its output is whole. Task I of K takes the shards whose position in
the name-sorted list is I modulo K, so K tasks cover every shard exactly once.

Each output shard carries its own counts in its parquet footer (key `recaption_stats`), so the summary
(`_summary_shard{I}of{K}.json` in the output folder, returned by `recaption_task`) covers shards
finished by earlier runs. Bad arguments and input schemas raise `RecaptionError` before any model loads.
"""

from __future__ import annotations

import glob
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sd3.atomic import atomic_path, atomic_write_text, remove, stale_temporaries
from sd3.data.images import ImageError, open_rgb
from sd3.data.schema import COLUMNS, DataError, check_schema, image_bytes

# --------------------------------------------------------------------------------------------------
# Prompts and filters: written for this project, all in one place, each overridable from the CLI
# --------------------------------------------------------------------------------------------------

VLM_PROMPT = (
    "Describe this image in detail, as a caption for someone who cannot see it. Start with the main "
    "subject, then the setting, the colours, the lighting, the composition and the medium (photo, "
    "painting, drawing, 3D render, screenshot, ...). If the image contains written text, quote it "
    "exactly. Describe only what is visible: do not invent names, places or dates.{hint}"
)
"""The VLM's instruction. `{hint}` is replaced by HINT_PROMPT for rows with alt-text, by '' otherwise."""

HINT_PROMPT = (
    ' The image was published with this alt-text, which may be incomplete, wrong or unrelated: "{alt_text}".'
    " Use it only where it agrees with what you see, for example to name a place, a species or a product."
)
"""How a row's alt-text is put into VLM_PROMPT. `{alt_text}` is the row's hint."""

LLM_PROMPT = (
    "Rewrite the image description below as one sentence of at most {max_words} words. Keep the main "
    "subject, the most important details and any quoted text; leave out everything else. Answer with the "
    "sentence only, with no introduction and no quotation marks around it.\n\nDescription: {caption}"
)
"""The LLM's instruction. `{caption}` is the VLM's description, `{max_words}` the word limit."""

BOILERPLATE = (
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i cannot",
    "i can't",
    "i am unable",
    "i'm unable",
    "as an ai",
    "as a language model",
    "unable to see the image",
    "unable to view the image",
    "there is no image",
    "no image was provided",
    "image is not available",
    "cannot see the image",
)
"""Phrases (lower case) that mark a refusal or a non-answer; a caption containing one is dropped."""

MIN_DISTINCT_WORDS = 8
"""A detailed caption with fewer distinct words than this is a non-answer ("A cat.") and is dropped."""

MAX_SHORT_WORDS = 40
"""Word limit of `recaption_short` (the seed distils to one sentence under 40 words, SEED_NOTES "Data")."""

MAX_HINT_CHARS = 500
"""Alt-text longer than this is cut: one scraped paragraph must not set the padded length of a whole batch."""

REASONS = (
    "no_image",  # the image cell is null
    "decode_error",  # PIL could not decode the bytes
    "vlm_error",  # the VLM raised on this row alone (e.g. the processor rejects the image)
    "vlm_empty",
    "vlm_few_words",
    "vlm_boilerplate",
    "llm_error",
    "llm_empty",
    "llm_boilerplate",
    "llm_too_long",
)
"""Why a row has null captions; each is counted in the summary."""

CAPTION_COLUMNS = ("recaption", "recaption_short")
STATS_KEY = "recaption_stats"  # parquet footer key holding a finished shard's ShardStats as JSON


class RecaptionError(RuntimeError):
    """Bad input or configuration. The message names the thing and the fix."""


@dataclass
class Prompts:
    vlm: str = VLM_PROMPT
    hint: str = HINT_PROMPT
    llm: str = LLM_PROMPT

    def validate(self, *, uses_hints: bool) -> None:
        """Fill every template once with dummy values, so a typo fails before any model loads."""
        checks = [
            ("--vlm-prompt", self.vlm, {"hint": ""}, "hint" if uses_hints else None),
            ("--hint-prompt", self.hint, {"alt_text": ""}, "alt_text" if uses_hints else None),
            ("--llm-prompt", self.llm, {"caption": "", "max_words": 1}, "caption"),
        ]
        for flag, template, values, required in checks:
            try:
                template.format(**values)
            except (KeyError, IndexError, ValueError) as e:
                raise RecaptionError(
                    f"{flag}: cannot fill the template ({type(e).__name__}: {e}); the placeholders it may "
                    f"use are {', '.join('{' + k + '}' for k in values)}; double literal braces ({{{{ }}}})"
                ) from e
            if required and "{" + required + "}" not in template:
                raise RecaptionError(
                    f"{flag} has no {{{required}}} placeholder; add it where the {required} goes"
                )

    def for_vlm(self, alt_text: str | None) -> str:
        alt_text = " ".join((alt_text or "").split())[:MAX_HINT_CHARS]
        return self.vlm.format(hint=self.hint.format(alt_text=alt_text) if alt_text else "")

    def for_llm(self, caption: str, *, max_words: int) -> str:
        return self.llm.format(caption=caption, max_words=max_words)


@dataclass
class Options:
    batch_size: int = 16
    """Rows per VLM / LLM generate call."""
    rows_per_group: int = 256
    """Rows read, captioned and written at a time (one output row group): bounds memory."""
    hint_column: str | None = None
    """Column holding the alt-text hint (e.g. 'caption' or 'text'); None: no hint."""
    image_column: str = "image"
    """Column holding the encoded image bytes (binary, or a {bytes, path} struct as HF datasets writes)."""
    max_image_side: int = 768
    """Images are shrunk (aspect kept) to at most this long side before the VLM sees them; 0: never."""
    min_distinct_words: int = MIN_DISTINCT_WORDS
    max_short_words: int = MAX_SHORT_WORDS
    boilerplate: tuple[str, ...] = BOILERPLATE
    keep_null_captions: bool = False
    """Keep rows whose captions are null (False: drop and count them)."""

    def validate(self) -> None:
        for name in ("batch_size", "rows_per_group", "max_short_words"):
            if getattr(self, name) < 1:
                raise RecaptionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_image_side", "min_distinct_words"):
            if getattr(self, name) < 0:
                raise RecaptionError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------------
# The two model roles. The HF classes below implement them; tests inject deterministic fakes.
# --------------------------------------------------------------------------------------------------


class Describer(Protocol):
    def describe(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One detailed caption per (RGB image, prompt) pair, in the same order."""


class Shortener(Protocol):
    def shorten(self, prompts: list[str]) -> list[str]:
        """One reply per prompt, in the same order."""


# --------------------------------------------------------------------------------------------------
# One task: my shards, skip the finished ones, caption the rest, summarise
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardStats:
    rows_in: int = 0
    rows_out: int = 0
    rows_captioned: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: ShardStats) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.rows_captioned += other.rows_captioned
        self.reasons = dict(Counter(self.reasons) + Counter(other.reasons))


def recaption_task(
    *,
    input_dir: Path,
    output_dir: Path,
    num_shards: int,
    shard_index: int,
    load_models: Callable[[], tuple[Describer, Shortener]],
    prompts: Prompts,
    opts: Options,
    delete_input: bool = False,
    models: dict[str, str] | None = None,
) -> dict:
    """Caption this task's shards of `input_dir` into `output_dir`; return (and write) the summary.

    Everything that can be wrong with the arguments or the input schemas fails here, before `load_models`
    runs; `load_models` is not called at all when every shard of this task is already finished.
    """
    opts.validate()
    prompts.validate(uses_hints=opts.hint_column is not None)
    if not input_dir.is_dir():
        raise RecaptionError(f"--input {input_dir} is not a directory")
    if output_dir.resolve() == input_dir.resolve():
        raise RecaptionError(f"--output {output_dir} is the input folder; choose another")
    output_dir.mkdir(parents=True, exist_ok=True)
    # The split is over input names plus finished output names (listed in that order), so it stays the same
    # when --delete-input has removed inputs whose outputs are whole, whichever task removed them.
    names = {p.name for p in input_dir.glob("*.parquet")} | {p.name for p in output_dir.glob("*.parquet")}
    if not names:
        raise RecaptionError(f"--input {input_dir} holds no *.parquet files")
    mine = shards_for_task(sorted(names), num_shards=num_shards, shard_index=shard_index)

    summary_name = f"_summary_shard{shard_index}of{num_shards}.json"
    remove_stale_temporaries(output_dir, [*mine, summary_name])

    finished: dict[str, ShardStats] = {}
    todo: list[Path] = []
    for name in mine:
        done = read_finished_stats(output_dir / name)
        if done is not None:
            finished[name] = done
        elif (input_dir / name).exists():
            todo.append(input_dir / name)
        else:
            raise RecaptionError(
                f"{output_dir / name} is not a finished recaptioned shard and {input_dir / name} does not "
                "exist; keep only recaptioning's outputs in --output"
            )
    for src in todo:
        check_input_schema(src, opts)

    if delete_input:  # a run killed between the rename and the delete left these behind
        for name in finished:
            (input_dir / name).unlink(missing_ok=True)

    rows_done, load_seconds, t0 = 0, 0.0, time.perf_counter()
    if todo:
        vlm, llm = load_models()
        load_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        total = sum(pq.ParquetFile(src).metadata.num_rows for src in todo)
        interactive = sys.stderr.isatty()
        with tqdm(total=total, unit="row", desc=f"recaption {shard_index}/{num_shards}", smoothing=0.05,
                  mininterval=0.5 if interactive else 30.0, dynamic_ncols=True) as bar:
            seen = Counter()

            def progress(rows: int, captioned: int) -> None:
                seen.update(rows=rows, captioned=captioned)
                bar.set_postfix(captioned=seen["captioned"], failed=seen["rows"] - seen["captioned"],
                                refresh=False)
                bar.update(rows)

            for src in todo:
                stats = recaption_shard(src, output_dir / src.name, vlm=vlm, llm=llm, prompts=prompts,
                                        opts=opts, progress=progress)
                finished[src.name] = stats
                rows_done += stats.rows_in
                if delete_input:
                    src.unlink()
    seconds = time.perf_counter() - t0

    total_stats = ShardStats()
    for name in sorted(finished):
        total_stats.add(finished[name])
    summary = {
        "task": shard_index,
        "num_tasks": num_shards,
        "input": str(input_dir),
        "output": str(output_dir),
        "models": models or {},
        "shards": len(mine),
        "shards_this_run": len(todo),
        "shards_finished_earlier": len(mine) - len(todo),
        "rows_in": total_stats.rows_in,
        "rows_out": total_stats.rows_out,
        "rows_captioned": total_stats.rows_captioned,
        "rows_dropped": total_stats.rows_in - total_stats.rows_out,
        "reasons": dict(sorted(total_stats.reasons.items())),
        "keep_null_captions": opts.keep_null_captions,
        "this_run": {"rows": rows_done, "seconds": round(seconds, 3),
                     "rows_per_s": round(rows_done / seconds, 3) if rows_done else None,
                     "model_load_seconds": round(load_seconds, 3)},
        "per_shard": {name: asdict(finished[name]) for name in sorted(finished)},
    }
    atomic_write_text(output_dir / summary_name, json.dumps(summary, indent=2))
    return summary


def remove_stale_temporaries(output_dir: Path, names: Sequence[str]) -> None:
    """Remove the temporaries that killed runs left of these outputs (never another task's: the array's
    tasks share the folder, and a pid says nothing about a writer on another node)."""
    stale = [p for name in names for p in stale_temporaries(output_dir, glob.escape(name))]
    for path in stale:
        remove(path)
    if stale:
        print(f"recaption: removed {len(stale)} partial output(s) of killed runs in {output_dir}",
              file=sys.stderr)


def shards_for_task(names: Sequence[str], *, num_shards: int, shard_index: int) -> list[str]:
    """Task I of K takes the sorted shard names at positions I, I+K, I+2K, ...: every shard exactly once."""
    if num_shards < 1:
        raise RecaptionError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise RecaptionError(
            f"--shard-index {shard_index} is outside 0..{num_shards - 1} for --num-shards {num_shards} "
            f"(under SLURM submit with --array=0-{num_shards - 1})"
        )
    return sorted(names)[shard_index::num_shards]


def check_input_schema(path: Path, opts: Options) -> None:
    """The image and hint columns exist and the image column holds bytes; seed columns the output keeps
    (`height`, `bucket_size`, ...) have the types create_phase and the trainer will check, so a shard
    they would refuse fails now rather than after hours of captioning."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise RecaptionError(f"{path}: not a readable parquet file ({e}); remove or repair it") from e
    names = schema.names
    if opts.image_column not in names:
        raise RecaptionError(
            f"{path}: no image column {opts.image_column!r} (columns: {names}); pass --image-column"
        )
    image_words, is_image = COLUMNS["image"]
    if not is_image(schema.field(opts.image_column).type):
        raise RecaptionError(
            f"{path}: column {opts.image_column!r} has type {schema.field(opts.image_column).type}; "
            f"expected {image_words} or Hugging Face's {{bytes, path}} struct; pass --image-column"
        )
    if opts.hint_column is not None and opts.hint_column not in names:
        raise RecaptionError(
            f"{path}: no hint column {opts.hint_column!r} (columns: {names}); fix --hint-column"
        )
    kept = pa.schema([f for f in schema if f.name not in CAPTION_COLUMNS])  # the captions are rewritten
    try:
        check_schema(kept, (), where=str(path), fix="fix those columns before recaptioning")
    except DataError as e:
        raise RecaptionError(str(e)) from e


def read_finished_stats(path: Path) -> ShardStats | None:
    """The stats of a finished output shard, or None when it does not exist (or is not one of ours)."""
    if not path.exists():
        return None
    try:
        meta = pq.ParquetFile(path).metadata.metadata or {}
        return ShardStats(**json.loads(meta[STATS_KEY.encode()]))
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError):
        print(f"recaption: {path} is not a finished recaptioned shard; redoing it",
              file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------------
# One shard: read row groups -> caption -> write row groups to a temporary sibling -> rename
# --------------------------------------------------------------------------------------------------


def recaption_shard(
    src: Path, dst: Path, *, vlm: Describer, llm: Shortener, prompts: Prompts, opts: Options,
    progress: Callable[[int, int], None] | None = None,
) -> ShardStats:
    """Caption one shard into `dst`; `progress(rows, captioned)` is called after each row group."""
    reader = pq.ParquetFile(src)
    schema = output_schema(reader.schema_arrow)
    stats = ShardStats()
    reasons: Counter[str] = Counter()
    # A kill (or any error) mid-shard leaves no `dst`: the temporary is removed, or found stale next run.
    with atomic_path(dst) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in reader.iter_batches(batch_size=opts.rows_per_group):
            table = pa.Table.from_batches([batch])
            images = image_bytes(table.column(opts.image_column))
            hints = [None] * len(images)
            if opts.hint_column:
                hints = [h if h is None else str(h) for h in table.column(opts.hint_column).to_pylist()]
            rows = recaption_rows(images, hints,
                                  vlm=vlm, llm=llm, prompts=prompts, opts=opts, where=src.name,
                                  first_row=stats.rows_in)
            out = with_captions(table, rows, schema=schema, keep_nulls=opts.keep_null_captions)
            writer.write_table(out)
            reasons.update(r for r in rows.reasons if r is not None)
            captioned = sum(r is None for r in rows.reasons)
            stats.rows_in += len(images)
            stats.rows_out += out.num_rows
            stats.rows_captioned += captioned
            if progress is not None:
                progress(len(images), captioned)
        stats.reasons = dict(sorted(reasons.items()))
        writer.add_key_value_metadata({STATS_KEY: json.dumps(asdict(stats))})
    return stats


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The input schema with `recaption`, `recaption_short` (strings) overwritten in place or appended."""
    for name in CAPTION_COLUMNS:
        i = schema.get_field_index(name)
        if i >= 0:
            schema = schema.set(i, pa.field(name, pa.string()))
        else:
            schema = schema.append(pa.field(name, pa.string()))
    meta = dict(schema.metadata or {})
    meta.pop(b"pandas", None)  # pandas' index description no longer fits once rows are dropped
    return schema.with_metadata(meta)


def with_captions(table: pa.Table, rows: RowCaptions, *, schema: pa.Schema, keep_nulls: bool) -> pa.Table:
    columns = {name: table.column(name) for name in table.column_names}
    columns["recaption"] = pa.chunked_array([pa.array(rows.long, pa.string())])
    columns["recaption_short"] = pa.chunked_array([pa.array(rows.short, pa.string())])
    out = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    if not keep_nulls:
        out = out.filter(pa.array([r is None for r in rows.reasons], pa.bool_()))
    return out


# --------------------------------------------------------------------------------------------------
# Rows: decode -> VLM -> filter -> LLM -> filter, every stage keyed by row index
# --------------------------------------------------------------------------------------------------


@dataclass
class RowCaptions:
    """Per input row, in input order: both captions, or None and the reason."""

    long: list[str | None]
    short: list[str | None]
    reasons: list[str | None]


def recaption_rows(
    images: Sequence[bytes | None], hints: Sequence[str | None], *, vlm: Describer, llm: Shortener,
    prompts: Prompts, opts: Options, where: str = "", first_row: int = 0,
) -> RowCaptions:
    """Caption rows. Results are keyed by row index through every stage, never by list position after a
    filter, so a row that fails anywhere cannot shift another row's caption."""
    if len(images) != len(hints):
        raise ValueError(f"{len(images)} images but {len(hints)} hints")
    reasons: dict[int, str] = {}
    decoded: dict[int, Image.Image] = {}
    for i, data in enumerate(images):
        if data is None:
            reasons[i] = "no_image"
            continue
        img = open_image(data, max_side=opts.max_image_side)
        if img is None:
            reasons[i] = "decode_error"
        else:
            decoded[i] = img

    def describe(ids: list[int]) -> list[str]:
        return vlm.describe([decoded[i] for i in ids], [prompts.for_vlm(hints[i]) for i in ids])

    where = f" ({where})" if where else ""
    described, errors = generate_batched(list(decoded), describe, batch_size=opts.batch_size,
                                         what=f"VLM{where}", first_row=first_row)
    reasons.update(dict.fromkeys(errors, "vlm_error"))
    long: dict[int, str] = {}
    for i, text in described.items():
        text = clean_caption(text)
        reason = caption_problem(text, min_distinct_words=opts.min_distinct_words,
                                 boilerplate=opts.boilerplate)
        if reason:
            reasons[i] = "vlm_" + reason
        else:
            long[i] = text

    def shorten(ids: list[int]) -> list[str]:
        return llm.shorten([prompts.for_llm(long[i], max_words=opts.max_short_words) for i in ids])

    # Sorted by length so each LLM batch pads little; the row index still travels with every caption.
    replies, errors = generate_batched(sorted(long, key=lambda i: len(long[i])), shorten,
                                       batch_size=opts.batch_size, what=f"LLM{where}", first_row=first_row)
    reasons.update(dict.fromkeys(errors, "llm_error"))
    short: dict[int, str] = {}
    for i, text in replies.items():
        text = clean_caption(text, one_paragraph=True)
        reason = caption_problem(text, min_distinct_words=1, boilerplate=opts.boilerplate)
        if reason is None and len(text.split()) > opts.max_short_words:
            reason = "too_long"
        if reason:
            reasons[i] = "llm_" + reason
        else:
            short[i] = text

    n = len(images)
    ok = [i not in reasons and i in short for i in range(n)]
    return RowCaptions(
        long=[long[i] if ok[i] else None for i in range(n)],
        short=[short[i] if ok[i] else None for i in range(n)],
        reasons=[None if ok[i] else reasons[i] for i in range(n)],
    )


def generate_batched(
    ids: list[int], run: Callable[[list[int]], list[str]], *, batch_size: int, what: str, first_row: int = 0
) -> tuple[dict[int, str], dict[int, Exception]]:
    """`run` on batches of row ids -> ({row id: text}, {row id: error}).

    A batch that raises is retried one row at a time, so one row the model cannot take (an image its
    processor rejects) costs that row only. A batch in which every row also fails on its own is not a bad
    row but a broken model or setup: that raises.
    """
    texts: dict[int, str] = {}
    errors: dict[int, Exception] = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        try:
            out = run(chunk)
        except Exception as e:
            if len(chunk) == 1:
                errors[chunk[0]] = e
                tqdm.write(f"recaption: {what} row {first_row + chunk[0]}: {type(e).__name__}: {e}")
                continue
            out = None
        if out is not None:
            if len(out) != len(chunk):
                raise RecaptionError(f"{what}: {len(chunk)} inputs gave {len(out)} outputs")
            texts.update(zip(chunk, out))
            continue
        chunk_errors: dict[int, Exception] = {}
        for i in chunk:
            try:
                (texts[i],) = run([i])
            except Exception as e:
                chunk_errors[i] = e
                tqdm.write(f"recaption: {what} row {first_row + i}: {type(e).__name__}: {e}")
        if len(chunk_errors) == len(chunk):
            first = next(iter(chunk_errors.values()))
            raise RecaptionError(
                f"{what}: every row of a batch failed, also one at a time: {first!r}"
            ) from first
        errors.update(chunk_errors)
    return texts, errors


# --------------------------------------------------------------------------------------------------
# Images and caption filters
# --------------------------------------------------------------------------------------------------


def open_image(data: bytes, *, max_side: int = 0) -> Image.Image | None:
    """Encoded bytes -> the RGB image the trainer decodes (`images.open_rgb`: any mode, EXIF rotation),
    shrunk to a long side of at most `max_side` (aspect kept; 0: never), or None if it does not decode."""
    try:
        img = open_rgb(data)
    except ImageError:
        return None
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


_PREAMBLE = re.compile(r"^\s*(sure|certainly|of course|okay|ok|here is|here's)\b[^\n]*:\s*", re.IGNORECASE)


def clean_caption(text: str, *, one_paragraph: bool = False) -> str:
    """Strip chat padding ("Here is a description:", wrapping quotes) and collapse whitespace."""
    text = _PREAMBLE.sub("", text.strip(), count=1).strip()
    if one_paragraph:
        text = text.split("\n\n")[0]
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


_WORD = re.compile(r"[^\W\d_]+")


def caption_problem(text: str, *, min_distinct_words: int, boilerplate: Sequence[str]) -> str | None:
    """None if the caption is usable, else why not: 'empty', 'few_words' or 'boilerplate'."""
    if not text.strip():
        return "empty"
    lower = text.lower().replace("\u2019", "'")
    if any(phrase in lower for phrase in boilerplate):
        return "boilerplate"
    if len(set(_WORD.findall(lower))) < min_distinct_words:
        return "few_words"
    return None


# --------------------------------------------------------------------------------------------------
# transformers implementations of the two roles
# --------------------------------------------------------------------------------------------------


def load_hf_models(
    vlm: str, llm: str, *, device: str | None = None, dtype: str = "auto", vlm_max_new_tokens: int = 256,
    llm_max_new_tokens: int = 96, temperature: float = 0.0, attn_implementation: str | None = None,
) -> tuple[HFDescriber, HFShortener]:
    """Both models from local directories or hub ids; `device` None: CUDA when available, else the CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    common = {"device": device, "dtype": torch_dtype, "temperature": temperature,
              "attn_implementation": attn_implementation}
    return (HFDescriber(vlm, max_new_tokens=vlm_max_new_tokens, **common),
            HFShortener(llm, max_new_tokens=llm_max_new_tokens, **common))


def resolve_dtype(name: str, device: str):
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; else the torch dtype of that name."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


class HFDescriber:
    """A VLM through AutoProcessor + AutoModelForImageTextToText and the processor's chat template."""

    def __init__(self, name: str, *, device: str, dtype, max_new_tokens: int, temperature: float = 0.0,
                 attn_implementation: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(name)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise RecaptionError(f"--vlm {name}: its processor has no tokenizer or no image processor")
        if not getattr(self.processor, "chat_template", None):
            raise RecaptionError(f"--vlm {name}: its processor has no chat template; use an instruct model")
        tokenizer.padding_side = "left"  # batched decoder-only generation: new tokens follow real ones
        self.model = AutoModelForImageTextToText.from_pretrained(
            name, **model_kwargs(dtype, attn_implementation)
        ).to(device).eval()
        self.device, self.dtype = device, dtype
        self.gen = generation_kwargs(max_new_tokens, temperature, tokenizer)

    def describe(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        import torch

        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]}]
            for img, prompt in zip(images, prompts)
        ]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
            sanitize_control_tokens=True,  # alt-text is user input: "<image>" in it must stay plain text
        )
        inputs = inputs.to(self.device, dtype=self.dtype)  # BatchFeature casts floating tensors only
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.gen)  # (B, L_prompt + L_new)
        new = out[:, inputs["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
        return self.processor.batch_decode(new, skip_special_tokens=True)


class HFShortener:
    """A chat LLM through AutoTokenizer + AutoModelForCausalLM and the tokenizer's chat template."""

    def __init__(self, name: str, *, device: str, dtype, max_new_tokens: int, temperature: float = 0.0,
                 attn_implementation: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        if not getattr(self.tokenizer, "chat_template", None):
            raise RecaptionError(f"--llm {name}: its tokenizer has no chat template; use an instruct model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # Llama 3 ships without one; padded positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            name, **model_kwargs(dtype, attn_implementation)
        ).to(device).eval()
        self.device = device
        self.gen = generation_kwargs(max_new_tokens, temperature, self.tokenizer)

    def shorten(self, prompts: list[str]) -> list[str]:
        import torch

        inputs = self.tokenizer.apply_chat_template(
            [[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt", padding=True, sanitize_control_tokens=True,
        ).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.gen)  # (B, L_prompt + L_new)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def model_kwargs(dtype, attn_implementation: str | None) -> dict:
    return {"dtype": dtype} | ({"attn_implementation": attn_implementation} if attn_implementation else {})


def generation_kwargs(max_new_tokens: int, temperature: float, tokenizer) -> dict:
    gen = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    if temperature > 0:
        return gen | {"do_sample": True, "temperature": temperature}
    # Greedy. The models' own generation configs often enable sampling (Llama 3: T 0.6, top-p 0.9).
    return gen | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def format_summary(s: dict) -> str:
    """The summary `recaption_task` returns, as a few lines for the console."""
    run = s["this_run"]
    lines = [
        f"recaption task {s['task']} of {s['num_tasks']}: {s['shards']} shards "
        f"({s['shards_this_run']} this run, {s['shards_finished_earlier']} finished earlier)",
        f"  rows in {s['rows_in']}, rows out {s['rows_out']}, captioned {s['rows_captioned']}, "
        f"dropped {s['rows_dropped']}",
        "  null-caption reasons: " + (", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "none"),
    ]
    if run["rows"]:
        rate = f"{run['rows_per_s']:.2f} rows/s"
        lines.append(f"  this run: {run['rows']} rows in {run['seconds']:.1f} s ({rate}), "
                     f"after {run['model_load_seconds']:.1f} s loading the models")
    summary_name = f"_summary_shard{s['task']}of{s['num_tasks']}.json"
    lines.append(f"  summary: {Path(s['output']) / summary_name}")
    return "\n".join(lines)

