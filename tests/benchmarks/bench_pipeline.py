"""The loader -> model pipeline: how long model ranks wait for data, and how many bytes a sample costs.

    python tests/benchmarks/bench_pipeline.py [--steps 60] [--width 384] [--depth 6]

(a) Runs the real job with torchrun on gloo, CPU: one loader rank (demo photos, stand-in encoders,
    pixel autoencoder) feeding two DDP model ranks whose model is made heavy enough that the loader
    can keep ahead ("loader capacity exceeds demand"). The model ranks' own log reports the share of
    their wall time spent blocked on the next batch; the first log window (start-up: the loader loads
    its encoders while the model ranks build the model) is reported apart from the steady state.

(b) Bytes on the wire per sample at the seed's stage-1 shapes (256 px buckets -> 16 x 32 x 32 latents,
    Gemma-2-2B 2304 + ModernBERT-large 1024 token states, MetaCLIP 768 pooled, all bf16), packed by
    the real `sd3.dist.transport.pack`, against the seed's fixed format (every caption as 154 x 2304 bf16 +
    latents padded to the largest bucket + pooled). Caption lengths follow the seed's data: each
    sample trains on its detailed recaption (VLM, 60-150 words, so nearly always cut at 77 tokens) or
    its one-sentence short caption (10-40 words), 50/50; ~1.3 Gemma tokens per English word.

Last lines: `model_wait_fraction: X` (steady state) and `wire_bytes_ratio_vs_seed: Y`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from sd3.config import FlowConfig  # noqa: E402
from sd3.diffusion.flow import dropout_keep  # noqa: E402
from sd3.dist.batch import Batch  # noqa: E402
from sd3.dist.loader import without_dropped  # noqa: E402
from sd3.dist.transport import pack, wire_bytes  # noqa: E402

SEED_TEXT = (154, 2304)          # the seed's concatenated, zero-padded text per sample
WIDTHS = (2304, 1024)            # Gemma-2-2B, ModernBERT-large
POOLED, LATENT = 768, (16, 32, 32)
TOKENS_PER_WORD = 1.3
BF16 = 2


# --- (a) waiting for data --------------------------------------------------------------------------


def measure_wait(args) -> tuple[float, float, float]:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "src/train.py",
           "--preset", "tiny", "--run_dir", str(run_dir), "--steps", str(args.steps),
           f"--log.every={args.log_every}", f"--model.width={args.width}", f"--model.depth={args.depth}",
           f"--model.num_heads={args.width // 64}", "--log.save_every=100000", "--log.sample_prompts=()"]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"the training run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    waits = [float(w) / 100 for w in re.findall(r"data wait ([0-9.]+)%", out.stdout)]
    speed = [float(s) for s in re.findall(r"\| ([0-9.]+) img/s", out.stdout)]
    print(f"(a) {args.steps} steps, model width {args.width} x {args.depth} blocks, 1 loader -> 2 model ranks, "
          f"{wall:.0f} s wall")
    print(f"    data wait per {args.log_every}-step window: " + ", ".join(f"{100 * w:.1f}%" for w in waits))
    print("    images/s per window: " + ", ".join(f"{s:.1f}" for s in speed))
    return waits[0], float(np.mean(waits[1:])), float(np.mean(speed[1:]))


# --- (b) bytes per sample --------------------------------------------------------------------------


def caption_tokens(rng: np.random.Generator, n: int, *, specials: int) -> np.ndarray:
    long = rng.uniform(60, 150, n) * TOKENS_PER_WORD
    short = rng.uniform(10, 40, n) * TOKENS_PER_WORD
    words = np.where(rng.random(n) < 0.5, long, short)
    return np.minimum(np.round(words).astype(int) + specials, 77)


def synthetic_batch(rng: np.random.Generator, batch: int, step: int) -> Batch:
    """A stage-1 batch with the seed's shapes and realistic per-stream caption lengths (bf16)."""
    lengths = [caption_tokens(rng, batch, specials=1), caption_tokens(rng, batch, specials=2)]  # BOS; CLS+SEP
    text, masks = [], []
    for lens, width in zip(lengths, WIDTHS):
        mask = torch.arange(int(lens.max()))[None] < torch.from_numpy(lens)[:, None]
        text.append(torch.randn(batch, mask.shape[1], width, dtype=torch.bfloat16) * mask[..., None])
        masks.append(mask)
    return Batch(latents=torch.randn(batch, *LATENT, dtype=torch.bfloat16), text=tuple(text),
                 text_mask=tuple(masks), pooled=torch.randn(batch, POOLED, dtype=torch.bfloat16), step=step,
                 rows=torch.arange(batch))


def measure_bytes(batch: int, steps: int) -> tuple[float, float, float, float]:
    rng = np.random.default_rng(0)
    flow = FlowConfig()  # the seed's caption dropout: 0.316 per stream, 0.1 pooled, plus 0.1 all-null
    seed_per_sample = BF16 * (SEED_TEXT[0] * SEED_TEXT[1] + int(np.prod(LATENT)) + POOLED)
    packed = skipped = padded77 = 0
    for step in range(steps):
        b = synthetic_batch(rng, batch, step)
        packed += wire_bytes(pack(b))
        keep = dropout_keep(flow, seed=0, step=step, rank=0, batch_size=batch)
        skipped += wire_bytes(pack(without_dropped(b, keep)))
        padded77 += BF16 * batch * (77 * sum(WIDTHS) + int(np.prod(LATENT)) + POOLED)
    n = batch * steps
    return seed_per_sample, padded77 / n, packed / n, skipped / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=140, help="samples per model rank (seed stage 1: 140)")
    parser.add_argument("--byte-steps", type=int, default=20)
    parser.add_argument("--skip-run", action="store_true", help="only (b)")
    args = parser.parse_args()

    seed, native77, packed, skipped = measure_bytes(args.batch, args.byte_steps)
    print(f"(b) bytes per sample at stage-1 shapes, batch {args.batch}, {args.byte_steps} batches:")
    print(f"    seed fixed format (154 x 2304 text + padded latents + pooled): {seed / 1e3:9.1f} KB")
    print(f"    native widths, padded to 77 tokens:                          {native77 / 1e3:9.1f} KB "
          f"({native77 / seed:.1%})")
    print(f"    native widths, only real tokens (trimmed and packed):        {packed / 1e3:9.1f} KB "
          f"({packed / seed:.1%})")
    print(f"    ... and dropped text streams not sent (as the loader does):  {skipped / 1e3:9.1f} KB "
          f"({skipped / seed:.1%})")
    if not args.skip_run:
        startup, steady, speed = measure_wait(args)
        print(f"    first window (start-up) {100 * startup:.1f}%, "
              f"steady state {100 * steady:.2f}% at {speed:.1f} img/s")
        print(f"model_wait_fraction: {steady:.4f}")
    print(f"wire_bytes_ratio_vs_seed: {skipped / seed:.3f}")


if __name__ == "__main__":
    main()
