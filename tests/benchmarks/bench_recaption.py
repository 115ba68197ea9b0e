"""Rows/s of recaptioning (sd3.data.recaption) with tiny random models, batched vs one prompt per generate call.

    python tests/benchmarks/bench_recaption.py [--rows 128] [--batch-sizes 1 16] [--vlm-tokens 48]

Builds a tiny LLaVA and a tiny Llama (tests/recaption_fixtures.py) and shards of real photos, then runs the
whole task (read -> decode -> VLM -> filter -> LLM -> write) through the package's transformers classes once
per batch size, into a fresh output folder each time. The first batch size is the reference (batch 1 is how
the system we rebuild ran its LLM). Model load time is reported apart from the captioning time.
Tiny models say little about real 8B models on a GPU; they measure the pipeline's own overhead and how
well batched left-padded generation amortises it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.recaption_fixtures
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # `import sd3` without an install

from sd3.data import recaption as rc
from tests.recaption_fixtures import make_tiny_llm, make_tiny_vlm, write_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=128, help="rows in all, over 4 shards")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--vlm-tokens", type=int, default=48, help="max new tokens of the VLM")
    p.add_argument("--llm-tokens", type=int, default=24, help="max new tokens of the LLM")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        vlm_dir, llm_dir = make_tiny_vlm(root / "vlm"), make_tiny_llm(root / "llm")
        write_shards(root / "in", 4, args.rows // 4, corrupt=frozenset({3}))
        print(f"fixtures: {time.perf_counter() - t0:.1f} s ({args.rows // 4 * 4} rows, 4 shards)")

        t0 = time.perf_counter()
        dtype = rc.resolve_dtype("auto", "cpu")
        vlm = rc.HFDescriber(str(vlm_dir), device="cpu", dtype=dtype, max_new_tokens=args.vlm_tokens)
        llm = rc.HFShortener(str(llm_dir), device="cpu", dtype=dtype, max_new_tokens=args.llm_tokens)
        print(f"model load: {time.perf_counter() - t0:.1f} s")

        reference = None
        for b in args.batch_sizes:
            opts = rc.Options(batch_size=b, hint_column="caption", min_distinct_words=1, max_short_words=1000)
            t0 = time.perf_counter()
            summary = rc.recaption_task(
                input_dir=root / "in", output_dir=root / f"out_b{b}", num_shards=1, shard_index=0,
                load_models=lambda: (vlm, llm), prompts=rc.Prompts(), opts=opts,
            )
            rate = summary["rows_in"] / (time.perf_counter() - t0)
            reference = reference or rate
            ratio = f"{rate / reference:5.2f}x batch {args.batch_sizes[0]}"
            print(f"batch {b:3d}: {rate:8.2f} rows/s ({ratio}), "
                  f"rows out {summary['rows_out']}, reasons {summary['reasons']}")


if __name__ == "__main__":
    main()
