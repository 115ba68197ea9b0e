"""Training-step time with patch masking: mask ratio 0, 0.5 and 0.75 in one run, at two model shapes.

    python tests/benchmarks/bench_masking.py [--repeats 11] [--threads 2] [--shapes bench,sd3_256_small]

A step is what the trainer does per micro-batch: the kept tokens drawn, `flow_loss` (forward), backward and
the fused AdamW step, in fp32 on the CPU. Shapes:

- `bench`: tests/benchmarks/bench_model_step.py's (4 blocks, width 256, 4 heads of 64, batch 4, 256 image
  tokens from 32x32 latents at patch 2, 77 + 77 text tokens of width 2304 and 1024), plus a 1-block mixer;
- `sd3_256_small`: sd3_256 scaled down to the CPU (6 blocks, width 64 x depth = 384, heads of 64, batch 4)
  at sd3_256's token counts (256 image tokens, 77 + 77 text tokens), plus a 1-block mixer;
- `short_text`: `bench` with 16 + 16 text tokens, to show what the text stream costs (text is never dropped).

For each shape and mixer kind (joint image/text blocks, or image-only) the step is timed at mask 0, 0.5 and
0.75 with the mixer, and at mask 0 without it (the plain model). Runs are interleaved so drift in the machine
hits every variant alike; medians are compared. Printed per shape: each median, its ratio to the same model
unmasked and to the plain model, and the FLOP ratios of `train_flops_per_sample` beside them. The last lines,
for the `bench` shape and the default mixer (joint):

    masked_step_ratio_075: X             masked step (mixer included) / the same model's unmasked step
    masked_step_ratio_075_vs_no_mixer: Y masked step (mixer included) / the plain model's step
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from sd3.config import FlowConfig, ModelConfig
from sd3.diffusion.flow import Cond, draw_kept_tokens, flow_loss, kept_count, step_generator
from sd3.model.mmdit import MMDiT, train_flops_per_sample

RATIOS = (0.0, 0.5, 0.75)
BENCH = ModelConfig(in_channels=16, patch_size=2, depth=4, width=256, num_heads=4, text_dims=(2304, 1024),
                    pooled_dim=768, attn_backend="sdpa", mixer_depth=1)
SHAPES = {
    # name: (model config, batch, latent side, text tokens per stream)
    "bench": (BENCH, 4, 32, 77),
    "sd3_256_small": (dataclasses.replace(BENCH, depth=6, width=384, num_heads=6), 4, 32, 77),
    "short_text": (BENCH, 4, 32, 16),
}


def make_step(cfg: ModelConfig, ratio: float, *, batch: int, side: int, txt: int):
    """One training micro-step of a fresh model (zero-initialised parts perturbed, so every path works)."""
    torch.manual_seed(0)
    model = MMDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    cond = Cond(text=tuple(torch.randn(batch, txt, d, generator=g) for d in cfg.text_dims),
                text_mask=tuple(torch.ones(batch, txt, dtype=torch.bool) for _ in cfg.text_dims),
                pooled=torch.randn(batch, cfg.pooled_dim, generator=g))
    img_tokens = (side // cfg.patch_size) ** 2
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        kept = None if not ratio else draw_kept_tokens(seed=0, step=i, rank=0, batch_size=batch,
                                                       img_tokens=img_tokens, ratio=ratio)
        out = flow_loss(model, x0=x0, cond=cond, cfg=FlowConfig(), patch_size=cfg.patch_size,
                        generator=step_generator(0, i, 0), kept_tokens=kept)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = batch * train_flops_per_sample(cfg, img_tokens, (txt,) * len(cfg.text_dims),
                                           kept_tokens=kept_count(img_tokens, ratio) if ratio else None)
    return step, flops


def bench_shape(name: str, joint: bool, repeats: int, warmup: int) -> dict[str, float]:
    base, batch, side, txt = SHAPES[name]
    cfg = dataclasses.replace(base, mixer_joint=joint)
    variants = {"no mixer, mask 0.00": make_step(dataclasses.replace(cfg, mixer_depth=0), 0.0, batch=batch, side=side,
                                                  txt=txt)}
    variants.update({f"mixer, mask {r:.2f}": make_step(cfg, r, batch=batch, side=side, txt=txt) for r in RATIOS})
    for step, _ in variants.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, (step, _) in variants.items():
            start = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    plain, same = "no mixer, mask 0.00", "mixer, mask 0.00"
    kind = "joint" if joint else "image-only"
    print(f"{name}: {cfg.depth} blocks + {cfg.mixer_depth} {kind} mixer block, width {cfg.width}, batch {batch}, "
          f"{(side // cfg.patch_size) ** 2} image + {2 * txt} text tokens, {repeats} interleaved runs")
    for k, m in median.items():
        flops = variants[k][1]
        print(f"  {k}: median {m * 1e3:7.1f} ms/step | time vs same model unmasked {m / median[same]:.3f}, "
              f"vs plain model {m / median[plain]:.3f} | FLOPs vs same model unmasked "
              f"{flops / variants[same][1]:.3f}, vs plain {flops / variants[plain][1]:.3f}")
    return {"same": median["mixer, mask 0.75"] / median[same], "plain": median["mixer, mask 0.75"] / median[plain]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="bench,sd3_256_small,short_text",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--mixers", default="joint,image", help="joint, image or both (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    headline = None
    for name in shapes:
        for mixer in args.mixers.split(","):
            ratios = bench_shape(name, mixer == "joint", args.repeats, args.warmup)
            if name == "bench" and mixer == "joint":
                headline = ratios
    if headline is not None:
        print(f"masked_step_ratio_075: {headline['same']:.3f}")
        print(f"masked_step_ratio_075_vs_no_mixer: {headline['plain']:.3f}")


if __name__ == "__main__":
    main()
