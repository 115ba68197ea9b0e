"""Quality of demo runs at their training compute: to compare patch masking with unmasked training.

    python tests/benchmarks/masking_quality.py runs/q_plain runs/q_masked [--seeds 4] [--steps 20] [--cfg 5]

Per run (a `--preset tiny` run directory, demo data): its masking settings, the training FLOPs it spent (from
its metrics.jsonl: every log window's FLOPs per sample, recovered from MFU and images/s, times its samples,
so the token counts of the real batches are in it), the last fixed-t validation loss on the held-out rows,
and the nearest-photo accuracy of tests/demo_scoring.py: the EMA weights sample every demo caption at
64 x 64 with `--seeds` seeds, and a sample counts when its nearest demo photo (pixel MSE at 8 x 8 to the
closest crop of each photo's square bucket) is its own caption's. FID and KID come from src/evaluate.py
(README, "Patch masking", has the commands). The first run is the reference of the compute ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from sd3.checkpoint.read import latest_checkpoint  # noqa: E402
from sd3.config.presets import DEMO_CAPTIONS  # noqa: E402
from sd3.diffusion.pipeline import Pipeline  # noqa: E402
from sd3.eval.scores import pil_to_uint8  # noqa: E402
from sd3.paths import resolve  # noqa: E402
from sd3.train.metrics import read_history  # noqa: E402
from tests.demo_scoring import nearest_photo_accuracy, photo_crops  # noqa: E402

RES = 64


def training_flops(run: Path, peak_tflops: float, images_per_step: int, per_rank: int) -> float:
    """FLOPs of the whole run from its log windows: FLOPs per sample = MFU x peak x model ranks / images/s."""
    total, last_images = 0.0, 0
    ranks = images_per_step // per_rank
    for record in read_history(run):
        if "mfu" not in record:
            continue
        images = record["images"]
        total += record["mfu"] * peak_tflops * 1e12 * ranks / record["images_per_s"] * (images - last_images)
        last_images = images
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = list(DEMO_CAPTIONS)
    prompts = [DEMO_CAPTIONS[n][1] for n in names]     # the short captions the tiny preset trains on
    reference = None
    for run in args.runs:
        ckpt = latest_checkpoint(run)
        cfg = json.loads((ckpt / "config.json").read_text())
        m, t, d = cfg["model"], cfg["train"], cfg["data"]
        history = read_history(run)
        images_per_step = history[-1]["images"] // history[-1]["step"]
        per_rank = d["batch_size"] * t["accumulation_steps"]
        flops = training_flops(run, cfg["log"]["peak_tflops"], images_per_step, per_rank)
        reference = reference or flops
        val = [(r["step"], r["val/loss"]) for r in history if "val/loss" in r]
        pipe = Pipeline.load(ckpt, device="cpu")
        samples = [im for seed in range(args.seeds) for im in pipe.generate(prompts, width=RES, height=RES,
                                                                            steps=args.steps, cfg=args.cfg,
                                                                            seed=seed).images]
        accuracy = nearest_photo_accuracy(pil_to_uint8(samples).float() / 255, names * args.seeds,
                                          photo_crops(resolve(d["dataset"]), res=RES))
        print(f"{run.name}: mask {m['mask_ratio']} after {m['mixer_depth']} "
              f"{'joint' if m['mixer_joint'] else 'image-only'} mixer block(s), {t['steps']} steps "
              f"({t['unmasked_steps'] if m['mask_ratio'] else t['steps']} unmasked)")
        print(f"  training: {flops / 1e12:.3f} TFLOP ({flops / reference:.3f} x the first run)")
        print(f"  validation loss at step {val[-1][0]}: {val[-1][1]:.4f}")
        print(f"  nearest-photo accuracy: {accuracy:.3f} of {len(samples)} samples (chance {1 / len(names):.2f})")


if __name__ == "__main__":
    main()
