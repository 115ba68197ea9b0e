"""Image quality of a checkpoint: FID, KID and CLIP score against held-out real images, per guidance scale.

    .venv/bin/python src/evaluate.py --ckpt runs/demo --data data/demo/64 --num 32 --steps 30 --cfg 1,3,5 \
        --sampler euler --seed 0 --out eval/ [--inception-weights FILE|random] [--clip MODEL] [--batch 16]

Draws `--num` rows of the dataset: by default from the rows the run held out of training
(`data.val_rows`, chosen by the same rule the trainer uses, with the run's seed and config read from the
checkpoint), or from every row with `--split all`. Each row's caption is sampled once per guidance scale
at the row's bucket size with the EMA weights (same noise at every scale), and the samples are compared
with the real images, decoded and fitted to their bucket as training does. Prints `fid: X`,
`kid: X +- s` and, with `--clip`, `clip_score: X` (`cfg S: ...` when several scales are given), and
writes to `--out`: metrics.json, cfg_sweep.png (the figures against the guidance scale) and samples.png
(real images and samples side by side, each row with its caption).

`--inception-weights`: the FID Inception weights file (weights-inception-2015-12-05-6726825d.pth, as
torch-fidelity publishes it), fetched once into the torch hub cache when omitted; `random` builds the
network with random weights for smoke tests: those figures are not comparable with published ones.
Bad input (no checkpoint, more rows asked than there are, a bad --cfg list) fails at once, before any
model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sd3 import salts
from sd3.checkpoint.read import CheckpointError, find_checkpoint, load_config
from sd3.config import ConfigError
from sd3.data.sampler import generator
from sd3.data.schema import DataError
from sd3.diffusion.sample import SAMPLERS
from sd3.encode import stand_ins
from sd3.eval.scores import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    RANDOM,
    RANDOM_WARNING,
    EvaluationError,
    FeatureStats,
    fid,
    kid,
    kid_subset_size,
    pil_to_uint8,
)
from sd3.paths import resolve, user_path

GRID_TILE = 128
"""Tiles of samples.png are scaled so that their long side is this many pixels (nearest neighbour)."""


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def parse_cfg_list(text: str) -> list[float]:
    """'1,3,5' -> [1.0, 3.0, 5.0]: finite, >= 0, no repeats."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"--cfg {text!r}: {part.strip()!r} is not a number; give guidance scales like 1,3,5"
                             ) from None
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--cfg {text!r}: {part.strip()} is not a guidance scale >= 0; give e.g. 1,3,5")
        if value in values:
            raise UsageError(f"--cfg {text!r}: {part.strip()} is listed twice; give each scale once")
        values.append(value)
    return values


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory (step_*) or run directory (its latest)")
    p.add_argument("--data", help="the dataset folder (default: the run's data.dataset)")
    p.add_argument("--split", choices=("holdout", "all"), default="holdout",
                   help="draw rows from those the run held out of training (default) or from every row")
    p.add_argument("--num", type=int, required=True, help="rows to evaluate (one sample per row and scale)")
    p.add_argument("--steps", type=int, default=30, help="sampler steps")
    p.add_argument("--cfg", default="5", help="guidance scale(s), comma separated: 1,3,5")
    p.add_argument("--sampler", default="euler", choices=SAMPLERS)
    p.add_argument("--shift", type=float, help="timestep shift (SD3 sec. 5.3.2); default: the run's own")
    p.add_argument("--seed", type=int, default=0, help="which rows (when fewer than all) and the sampling noise")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--inception-weights", dest="inception_weights",
                   help="InceptionV3 weights file, or 'random' (smoke tests); default: fetch once")
    p.add_argument("--clip", help="CLIP model (hub id or local directory) for the CLIP score")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch", type=int, default=16, help="images per sampling batch")
    p.add_argument("--kid-subsets", dest="kid_subsets", type=int, default=KID_SUBSETS)
    p.add_argument("--kid-subset-size", dest="kid_subset_size", type=int, default=KID_SUBSET_SIZE)
    p.add_argument("--grid-rows", dest="grid_rows", type=int, default=16, help="rows of samples.png")
    args = p.parse_args(argv)
    args.cfg = parse_cfg_list(args.cfg)
    for name, low in (("num", 2), ("steps", 1), ("batch", 1), ("kid_subsets", 1), ("kid_subset_size", 2),
                      ("grid_rows", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")
    if args.inception_weights not in (None, RANDOM) and not Path(args.inception_weights).is_file():
        raise UsageError(f"--inception-weights {args.inception_weights}: no such file; give the InceptionV3 "
                         "weights file (weights-inception-2015-12-05-6726825d.pth) or 'random'")
    if args.clip and args.clip.startswith((".", "/", "~")) and not Path(args.clip).expanduser().is_dir():
        raise UsageError(f"--clip {args.clip}: no such directory; give a hub id or a CLIP saved with save_pretrained")
    return args


# --------------------------------------------------------------------------------------------------
# Which rows
# --------------------------------------------------------------------------------------------------


def open_rows(args, ckpt: Path):
    """The run's config, the dataset (index only) and the chosen row ids; fails before any model loads."""
    from sd3.data.dataset import BucketDataset

    cfg = load_config(ckpt)
    data_dir = user_path(args.data) if args.data else resolve(cfg.data.dataset)
    same = data_dir.resolve() == resolve(cfg.data.dataset).resolve()
    # The held-out rows depend on the seed, val_rows and the usable buckets only (not on the batch size or
    # the rank count); batch 1 on one rank opens any dataset the run could train on.
    data_cfg = dataclasses.replace(cfg.data, dataset=str(data_dir), index=cfg.data.index if same else "",
                                   create_demo=False, batch_size=1)
    ds = BucketDataset(data_cfg, seed=cfg.train.seed, num_model_ranks=1, max_res=cfg.model.max_res,
                       multiple=cfg.pixel_multiple)
    if args.split == "holdout":
        if len(ds.holdout) == 0:
            raise UsageError(f"the run held no rows out of training (data.val_rows={cfg.data.val_rows}), so "
                             "--split holdout has nothing to draw from; pass --split all to evaluate on every row")
        pool, what = ds.holdout, f"held-out rows (data.val_rows={cfg.data.val_rows})"
    else:
        pool, what = ds.usable_rows(), "usable rows"
    if args.num > len(pool):
        raise UsageError(f"--num {args.num} is more than the {len(pool)} {what} of {data_dir}; lower --num"
                         + (" or use --split all" if args.split == "holdout" else ""))
    rows = pool if args.num == len(pool) else np.sort(generator(args.seed, salts.EVAL_ROWS).choice(
        pool, size=args.num, replace=False))
    return cfg, ds, rows, what


def batch_seed(seed: int, i: int) -> int:
    """Sampling noise of batch i: distinct per batch, the same at every guidance scale."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0] & 0x7FFF_FFFF)


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(image: Image.Image) -> Image.Image:
    scale = GRID_TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST)


def labelled_grid(rows: list[list[Image.Image]], captions: list[str], headers: list[str], *,
                  pad: int = 4, max_lines: int = 3) -> Image.Image:
    """One row of tiles per caption (real image, then one sample per scale), the caption under its row and
    a header over each column."""
    font = _font()
    line_h = 13
    width = pad + len(headers) * (GRID_TILE + pad)
    chars = max(10, int(width / 6.2))
    header_h = line_h + pad
    blocks = [textwrap.wrap(c or "(empty caption)", chars, max_lines=max_lines, placeholder=" ...") for c in captions]
    height = header_h + sum(GRID_TILE + pad + len(b) * line_h + pad for b in blocks) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for j, h in enumerate(headers):
        draw.text((pad + j * (GRID_TILE + pad), pad // 2), h, fill="black", font=font)
    y = header_h
    for tiles, block in zip(rows, blocks):
        for j, im in enumerate(tiles):
            t = _tile(im)
            grid.paste(t, (pad + j * (GRID_TILE + pad) + (GRID_TILE - t.width) // 2, y + (GRID_TILE - t.height) // 2))
        y += GRID_TILE + pad
        for line in block:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        y += pad
    return grid


def plot_sweep(results: list[dict], path: Path, *, title: str, clip_real: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["cfg"] for r in results]
    has_clip = results[0].get("clip_score") is not None
    fig, axes = plt.subplots(1, 3 if has_clip else 2, figsize=(4.2 * (3 if has_clip else 2), 3.4))
    axes[0].plot(scales, [r["fid"] for r in results], "o-")
    axes[0].set_ylabel("FID (lower is better)")
    axes[1].errorbar(scales, [r["kid"] for r in results], yerr=[r["kid_std"] for r in results], fmt="o-", capsize=3)
    axes[1].set_ylabel("KID (lower is better)")
    if has_clip:
        axes[2].plot(scales, [r["clip_score"] for r in results], "o-", label="samples")
        if clip_real is not None:
            axes[2].axhline(clip_real, color="grey", linestyle="--", label="real images")
        axes[2].set_ylabel("CLIP score (higher is better)")
        axes[2].legend()
    for ax in axes:
        ax.set_xlabel("guidance scale")
        ax.set_xticks(scales)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse(argv)
    ckpt = find_checkpoint(str(user_path(args.ckpt)), user_path(args.ckpt).parent)
    _, ds, rows, what = open_rows(args, ckpt)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    swept = len(args.cfg) > 1
    print(f"evaluating {ckpt} on {len(rows)} of the {what} of {ds.data_dir}, guidance {args.cfg}, "
          f"{args.steps} {args.sampler} steps, seed {args.seed}, on {device}", flush=True)

    from tqdm import tqdm

    from sd3.diffusion.pipeline import Pipeline
    from sd3.eval.scores import ClipScore, load_inception

    if args.inception_weights == RANDOM:
        print(f"\n!!! {RANDOM_WARNING} !!!\n", flush=True)
        print(f"WARNING: {RANDOM_WARNING}", file=sys.stderr, flush=True)
    inception = load_inception(args.inception_weights, device=device, seed=args.seed)
    clip = ClipScore.load(args.clip, device=device) if args.clip else None
    pipe = Pipeline.load(ckpt, device=str(device), ema=True, prepare=lambda cfg: stand_ins.ensure(cfg, dataset=False))

    real_batches = ds.holdout_batches(args.batch, rows=rows, dtype=torch.uint8) if args.split == "holdout" \
        else ds.row_batches(rows, args.batch, dtype=torch.uint8)
    n_real = sum(b.size for b in real_batches)
    if n_real < len(rows):
        print(f"note: {len(rows) - n_real} of the {len(rows)} rows could not be decoded and are left out", flush=True)
    if n_real < 2:
        raise EvaluationError(f"only {n_real} of the chosen rows decode: FID needs at least 2")

    bar = tqdm(total=n_real * (1 + len(args.cfg)), desc="evaluate", unit="img", dynamic_ncols=True)
    real = FeatureStats.empty(device=device)
    clip_real = []
    for b in real_batches:
        real.add(inception(b.images))
        if clip is not None:
            clip_real.append(clip(b.images, b.captions))
        bar.update(b.size)
    results, samples = [], {}
    for scale in args.cfg:
        fake = FeatureStats.empty(device=device)
        clip_fake = []
        samples[scale] = []
        for i, b in enumerate(real_batches):
            W, H = b.bucket
            images = pipe.generate(b.captions, width=W, height=H, steps=args.steps, guidance=scale,
                                   sampler=args.sampler, seed=batch_seed(args.seed, i), shift=args.shift).images
            samples[scale] += images
            x = pil_to_uint8(images)
            fake.add(inception(x))
            if clip is not None:
                clip_fake.append(clip(x, b.captions))
            bar.update(b.size)
        k_mean, k_std = kid(real.features, fake.features, subsets=args.kid_subsets,
                            subset_size=args.kid_subset_size, seed=args.seed)
        results.append({"cfg": scale, "fid": fid(real, fake), "kid": k_mean, "kid_std": k_std,
                        "clip_score": float(torch.cat(clip_fake).mean()) if clip is not None else None})
    bar.close()

    if inception.random_weights:
        print(f"!!! {RANDOM_WARNING} !!!")
    for r in results:
        prefix = f"cfg {r['cfg']:g}: " if swept else ""
        print(f"{prefix}fid: {r['fid']:.4f}")
        print(f"{prefix}kid: {r['kid']:.6f} +- {r['kid_std']:.6f}")
        if r["clip_score"] is not None:
            print(f"{prefix}clip_score: {r['clip_score']:.4f}")
    subset = kid_subset_size(n_real, n_real, args.kid_subset_size)
    clip_real_mean = float(torch.cat(clip_real).mean()) if clip is not None else None
    if clip is not None:
        print(f"reference, the real images with their captions: clip_score {clip_real_mean:.4f}")

    captions = [c for b in real_batches for c in b.captions]
    reals = [im for b in real_batches for im in _to_pil(b.images)]
    k = min(args.grid_rows, n_real)
    if k:
        grid = labelled_grid([[reals[i]] + [samples[s][i] for s in args.cfg] for i in range(k)], captions[:k],
                             ["real"] + [f"cfg {s:g}" for s in args.cfg])
        grid.save(out / "samples.png")
    weights = RANDOM if inception.random_weights else (args.inception_weights or "torch-fidelity (fetched)")
    title = f"{ckpt.parent.parent.name} {ckpt.name}: {n_real} images, {args.steps} {args.sampler} steps" + (
        "\nRANDOM Inception weights: not comparable with published FID/KID" if inception.random_weights else "")
    plot_sweep(results, out / "cfg_sweep.png", title=title, clip_real=clip_real_mean)
    report = {
        "checkpoint": str(ckpt), "step": int(ckpt.name.split("_")[-1]), "data": str(ds.data_dir),
        "split": args.split, "rows": [int(r) for b in real_batches for r in b.rows], "num": n_real,
        "steps": args.steps, "sampler": args.sampler, "shift": args.shift, "seed": args.seed,
        "inception_weights": str(weights), "comparable_with_published": not inception.random_weights,
        "clip_model": args.clip, "kid_subsets": args.kid_subsets, "kid_subset_size": subset,
        "results": results, "clip_score_real": clip_real_mean,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'metrics.json'}, {out / 'cfg_sweep.png'}" + (f", {out / 'samples.png'}" if k else "")
          + f" in {report['wall_s']:.0f} s")
    return 0


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(x.permute(1, 2, 0).cpu().numpy()) for x in images]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UsageError, CheckpointError, DataError, ConfigError, EvaluationError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        sys.exit(2)
