"""Recaption parquet shards: a VLM writes a detailed caption, a chat LLM distils it to one sentence.

    .venv/bin/python data/recaption_parquets.py --input raw/ --output recaptioned/ \\
        --vlm llava-hf/llama3-llava-next-8b-hf --llm meta-llama/Meta-Llama-3-8B-Instruct \\
        --hint-column caption --num-shards 8 --shard-index 3

Every input column is kept; `recaption` and `recaption_short` are added (or overwritten). Rows that fail
get null captions and a counted reason, and are dropped unless --keep-null-captions. Safe to kill and
rerun: finished shards are skipped, unfinished ones redone. Task I of K (--shard-index, --num-shards;
default $SLURM_ARRAY_TASK_ID, $SLURM_ARRAY_TASK_COUNT) takes every K-th shard by name; see
data/recaption_SLURM.sh. The summary is printed and written to OUTPUT/_summary_shard{I}of{K}.json.
The code is src/sd3/data/recaption.py.

Exit code: 0 done, 2 bad arguments or input (the message names the fix), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sd3.data.recaption import (
    BOILERPLATE,
    HINT_PROMPT,
    LLM_PROMPT,
    MAX_SHORT_WORDS,
    MIN_DISTINCT_WORDS,
    VLM_PROMPT,
    Options,
    Prompts,
    RecaptionError,
    format_summary,
    load_hf_models,
    recaption_task,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(
        batch_size=args.batch_size, rows_per_group=args.rows_per_group, hint_column=args.hint_column,
        image_column=args.image_column, max_image_side=args.max_image_side,
        min_distinct_words=args.min_distinct_words, max_short_words=args.max_short_words,
        boilerplate=BOILERPLATE + tuple(p.lower() for p in args.boilerplate),
        keep_null_captions=args.keep_null_captions,
    )
    try:
        summary = recaption_task(
            input_dir=Path(args.input), output_dir=Path(args.output), num_shards=args.num_shards,
            shard_index=args.shard_index, prompts=Prompts(vlm=args.vlm_prompt, hint=args.hint_prompt,
                                                          llm=args.llm_prompt),
            opts=opts, delete_input=args.delete_input, models={"vlm": args.vlm, "llm": args.llm},
            load_models=lambda: load_hf_models(
                args.vlm, args.llm, device=args.device, dtype=args.dtype,
                vlm_max_new_tokens=args.vlm_max_new_tokens, llm_max_new_tokens=args.llm_max_new_tokens,
                temperature=args.temperature, attn_implementation=args.attn_implementation,
            ),
        )
    except RecaptionError as e:
        print(f"recaption_parquets: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recaption_parquets: interrupted; finished shards are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env_index = os.environ.get("SLURM_ARRAY_TASK_ID")
    env_count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of input *.parquet shards")
    p.add_argument("--output", required=True, help="folder for output shards (same names), summaries")
    p.add_argument("--vlm", required=True, help="VLM: local dir or hub id (AutoModelForImageTextToText)")
    p.add_argument("--llm", required=True, help="chat LLM: local directory or hub id (AutoModelForCausalLM)")
    p.add_argument("--num-shards", type=int, default=int(env_count) if env_count else 1,
                   help="tasks the shards are split over (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--shard-index", type=int, default=int(env_index) if env_index else 0,
                   help="which task this is, 0..num_shards-1 (default: $SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--batch-size", type=int, default=Options.batch_size,
                   help=f"rows per generate call (default {Options.batch_size})")
    p.add_argument("--rows-per-group", type=int, default=Options.rows_per_group,
                   help=f"rows read and written at a time, bounds memory (default {Options.rows_per_group})")
    p.add_argument("--hint-column", default=None,
                   help="column with the alt-text hint (e.g. caption); default: no hint")
    p.add_argument("--image-column", default=Options.image_column,
                   help=f"column with the encoded image bytes (default {Options.image_column})")
    p.add_argument("--keep-null-captions", action="store_true",
                   help="keep rows whose captions failed, with null captions (default: drop and count them)")
    p.add_argument("--delete-input", action="store_true",
                   help="delete each input shard once its output shard is whole")
    p.add_argument("--vlm-prompt", default=VLM_PROMPT, help="VLM instruction; {hint}: where the hint goes")
    p.add_argument("--hint-prompt", default=HINT_PROMPT, help="hint sentence; {alt_text}: the row's alt-text")
    p.add_argument("--llm-prompt", default=LLM_PROMPT, help="LLM instruction; {caption}, {max_words}")
    p.add_argument("--vlm-max-new-tokens", type=int, default=256, help="bound on the detailed caption (256)")
    p.add_argument("--llm-max-new-tokens", type=int, default=96, help="bound on the short caption (96)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding; > 0: sampling")
    p.add_argument("--min-distinct-words", type=int, default=MIN_DISTINCT_WORDS,
                   help=f"drop detailed captions with fewer distinct words (default {MIN_DISTINCT_WORDS})")
    p.add_argument("--max-short-words", type=int, default=MAX_SHORT_WORDS,
                   help=f"drop longer short captions (default {MAX_SHORT_WORDS})")
    p.add_argument("--boilerplate", action="append", default=[], metavar="PHRASE",
                   help="extra refusal phrase that drops a caption (repeatable; adds to the built-in list)")
    p.add_argument("--max-image-side", type=int, default=Options.max_image_side,
                   help=f"shrink images to this long side before the VLM, 0: never (default "
                        f"{Options.max_image_side})")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="model dtype; auto (default): bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn-implementation", default=None,
                   help="for from_pretrained (sdpa, flash_attention_2, ...); default: transformers'")
    args = p.parse_args(argv)
    for flag in ("vlm_max_new_tokens", "llm_max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


if __name__ == "__main__":
    sys.exit(main())
