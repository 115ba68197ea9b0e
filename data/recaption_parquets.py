"""Recaption parquet shards: a VLM writes a detailed caption, a chat LLM distils it to one sentence.

    python data/recaption_parquets.py --input raw/ --output recaptioned/ \\
        --vlm llava-hf/llama3-llava-next-8b-hf --llm meta-llama/Meta-Llama-3-8B-Instruct \\
        --hint-column caption --num-shards 8 --shard-index 3

Per row: decode the image (any PIL mode -> RGB) -> the VLM describes it, with the row's alt-text as a hint
-> quality filters -> the LLM rewrites the description as one sentence of at most 40 words -> filters.
Every input column is kept unchanged and in order; `recaption` and `recaption_short` are added (or
overwritten in place). A row that fails anywhere gets null captions and a counted reason; such rows are
dropped unless `--keep-null-captions`.

Safe to kill and rerun: each output shard is written as `<name>.tmp` and renamed when whole, a rerun skips
finished shards and redoes unfinished ones from scratch, and `--delete-input` deletes an input shard only
after its output is whole. Task I of K (`--shard-index`, default $SLURM_ARRAY_TASK_ID) takes the shards
whose position in the name-sorted list is I modulo K, so K tasks cover every shard exactly once.
`data/recaption_SLURM.sh` runs one task per GPU as a SLURM array.

Each output shard carries its own counts in its parquet footer (key `recaption_stats`), so the summary
(`_summary_shard{I}of{K}.json` next to the output, also printed) covers shards finished by earlier runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from tqdm import tqdm

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
# Entry
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompts = Prompts(vlm=args.vlm_prompt, hint=args.hint_prompt, llm=args.llm_prompt)
        opts = Options(
            batch_size=args.batch_size,
            rows_per_group=args.rows_per_group,
            hint_column=args.hint_column,
            image_column=args.image_column,
            max_image_side=args.max_image_side,
            min_distinct_words=args.min_distinct_words,
            max_short_words=args.max_short_words,
            boilerplate=BOILERPLATE + tuple(p.lower() for p in args.boilerplate),
            keep_null_captions=args.keep_null_captions,
        )

        def load_models() -> tuple[Describer, Shortener]:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = resolve_dtype(args.dtype, device)
            gen = {"temperature": args.temperature}
            vlm = HFDescriber(
                args.vlm, device=device, dtype=dtype, max_new_tokens=args.vlm_max_new_tokens,
                attn_implementation=args.attn_implementation, **gen,
            )
            llm = HFShortener(
                args.llm, device=device, dtype=dtype, max_new_tokens=args.llm_max_new_tokens,
                attn_implementation=args.attn_implementation, **gen,
            )
            return vlm, llm

        summary = recaption_task(
            input_dir=Path(args.input),
            output_dir=Path(args.output),
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            load_models=load_models,
            prompts=prompts,
            opts=opts,
            delete_input=args.delete_input,
            models={"vlm": args.vlm, "llm": args.llm},
        )
    except RecaptionError as e:
        print(f"recaption_parquets: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env_index = os.environ.get("SLURM_ARRAY_TASK_ID")
    env_count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[2], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--input", required=True, help="folder of input *.parquet shards")
    p.add_argument("--output", required=True, help="folder for output shards (same names), summaries")
    p.add_argument("--vlm", required=True, help="VLM: local dir or hub id (AutoModelForImageTextToText)")
    p.add_argument("--llm", required=True, help="chat LLM: local directory or hub id (AutoModelForCausalLM)")
    p.add_argument("--num-shards", type=int, default=int(env_count) if env_count else 1,
                   help="tasks the shards are split over (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--shard-index", type=int, default=int(env_index) if env_index else 0,
                   help="which task this is, 0..num_shards-1 (default: $SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--batch-size", type=int, default=Options.batch_size, help="rows per generate call")
    p.add_argument("--rows-per-group", type=int, default=Options.rows_per_group,
                   help="rows read and written at a time (bounds memory)")
    p.add_argument("--hint-column", default=None,
                   help="column with the alt-text hint (e.g. caption); none: no hint")
    p.add_argument("--image-column", default=Options.image_column, help="column with the encoded image bytes")
    p.add_argument("--keep-null-captions", action="store_true",
                   help="keep rows whose captions failed, with null captions (default: drop and count them)")
    p.add_argument("--delete-input", action="store_true",
                   help="delete each input shard once its output shard is whole")
    p.add_argument("--vlm-prompt", default=VLM_PROMPT, help="VLM instruction; {hint}: where the hint goes")
    p.add_argument("--hint-prompt", default=HINT_PROMPT, help="hint sentence; {alt_text}: the row's alt-text")
    p.add_argument("--llm-prompt", default=LLM_PROMPT, help="LLM instruction; {caption}, {max_words}")
    p.add_argument("--vlm-max-new-tokens", type=int, default=256, help="bound on the detailed caption")
    p.add_argument("--llm-max-new-tokens", type=int, default=96, help="bound on the short caption's tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding; > 0: sampling")
    p.add_argument("--min-distinct-words", type=int, default=MIN_DISTINCT_WORDS,
                   help="drop detailed captions with fewer distinct words")
    p.add_argument("--max-short-words", type=int, default=MAX_SHORT_WORDS, help="drop longer short captions")
    p.add_argument("--boilerplate", action="append", default=[], metavar="PHRASE",
                   help="extra refusal phrase that drops a caption (repeatable; adds to the built-in list)")
    p.add_argument("--max-image-side", type=int, default=Options.max_image_side,
                   help="shrink images to this long side before the VLM (0: never)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="model dtype; auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn-implementation", default=None,
                   help="for from_pretrained (sdpa, flash_attention_2, ...); default: transformers'")
    args = p.parse_args(argv)
    for flag in ("vlm_max_new_tokens", "llm_max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


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

    finished: dict[str, ShardStats] = {}
    todo: list[Path] = []
    for name in mine:
        stale = output_dir / (name + ".tmp")
        if stale.exists():  # a killed run's partial shard: redo it from scratch
            stale.unlink()
        done = read_finished_stats(output_dir / name)
        if done is not None:
            finished[name] = done
        elif (input_dir / name).exists():
            todo.append(input_dir / name)
        else:
            raise RecaptionError(
                f"{output_dir / name} is not an output of this script and {input_dir / name} does not exist; "
                "keep only this script's outputs in --output"
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
    write_atomic(output_dir / f"_summary_shard{shard_index}of{num_shards}.json",
                 json.dumps(summary, indent=2).encode())
    return summary


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
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise RecaptionError(f"{path}: not a readable parquet file ({e}); remove or repair it") from e
    names = schema.names
    if opts.image_column not in names:
        raise RecaptionError(
            f"{path}: no image column {opts.image_column!r} (columns: {names}); pass --image-column"
        )
    if image_bytes_kind(schema.field(opts.image_column).type) is None:
        raise RecaptionError(
            f"{path}: column {opts.image_column!r} has type {schema.field(opts.image_column).type}; "
            "expected binary image bytes or a struct with a 'bytes' field"
        )
    if opts.hint_column is not None and opts.hint_column not in names:
        raise RecaptionError(
            f"{path}: no hint column {opts.hint_column!r} (columns: {names}); fix --hint-column"
        )


def read_finished_stats(path: Path) -> ShardStats | None:
    """The stats of a finished output shard, or None when it does not exist (or is not one of ours)."""
    if not path.exists():
        return None
    try:
        meta = pq.ParquetFile(path).metadata.metadata or {}
        return ShardStats(**json.loads(meta[STATS_KEY.encode()]))
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError):
        print(f"recaption_parquets: {path} is not a finished output shard of this script; redoing it",
              file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------------
# One shard: read row groups -> caption -> write row groups to <name>.tmp -> rename
# --------------------------------------------------------------------------------------------------


def recaption_shard(
    src: Path, dst: Path, *, vlm: Describer, llm: Shortener, prompts: Prompts, opts: Options,
    progress: Callable[[int, int], None] | None = None,
) -> ShardStats:
    """Caption one shard into `dst`; `progress(rows, captioned)` is called after each row group."""
    tmp = dst.with_name(dst.name + ".tmp")
    reader = pq.ParquetFile(src)
    schema = output_schema(reader.schema_arrow)
    stats = ShardStats()
    reasons: Counter[str] = Counter()
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
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
        with open(tmp, "rb+") as f:  # the rename below must never publish a file whose bytes are not on disk
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
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


def image_bytes_kind(t: pa.DataType) -> str | None:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    return None


def image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    if image_bytes_kind(column.type) == "struct":  # HF datasets' Image feature: {bytes, path}
        return column.combine_chunks().field("bytes").to_pylist()
    return column.to_pylist()


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
                tqdm.write(f"recaption_parquets: {what} row {first_row + chunk[0]}: {type(e).__name__}: {e}")
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
                tqdm.write(f"recaption_parquets: {what} row {first_row + i}: {type(e).__name__}: {e}")
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
    """Encoded bytes -> an upright RGB image (long side <= max_side if > 0), or None if it does not decode.

    Any PIL mode is handled: transparency is composited on white, 16-bit and float greys are scaled to
    8 bits (a plain convert would clip them to white), CMYK / YCbCr / palette go through convert.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if max_side and img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))  # JPEG decodes at reduced scale: far faster for big photos
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
            img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        img = img.convert("RGB")
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return img
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None


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


def resolve_dtype(name: str, device: str):
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
# Small helpers
# --------------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def format_summary(s: dict) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
