"""Sample images from a checkpoint.

    .venv/bin/python infer.py --ckpt runs/demo --prompt "a cat on a windowsill" --prompt "a rocket" \
        --steps 30 --cfg 5 --sampler euler --width 64 --height 48 --seed 0 --batch 2 --out samples/ --gif

`--ckpt` is a checkpoint directory (step_*) or a run directory (its newest checkpoint), relative to the
current directory or to the repository root. Writes one PNG per image, `grid.png` (each tile with its
prompt) and, with `--gif`, `denoise.gif`: at every step each image's state x_t beside its clean estimate
x0 = x_t - t v. Bad arguments are refused at once, before any model loads.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sd3.checkpoint.read import CheckpointError, find_checkpoint, list_checkpoints, load_config
from sd3.diffusion.sample import SAMPLERS
from sd3.encode import stand_ins
from sd3.paths import user_path


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "prompt"


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (step_*) or run directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative", default="", help="negative prompt ('' = the trained unconditional)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the run's sample-grid steps, "
                        "log.sample_steps: 30 in every preset)")
    parser.add_argument("--cfg", type=float,
                        help="guidance scale s in v_u + s (v_c - v_u); 0 samples the unconditional model (default: "
                        "the run's sample-grid scale, log.sample_cfg: 5 for the sd3 presets, lower for the demo)")
    parser.add_argument("--sampler", default="euler", choices=SAMPLERS)
    parser.add_argument("--shift", type=float, help="timestep shift (SD3 sec. 5.3.2); default: the run's own")
    parser.add_argument("--width", type=int, help="pixels (default: the model's max_res)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's max_res)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--gif", action="store_true", help="also write denoise.gif")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--raw", action="store_true", help="use the trained weights instead of the EMA")
    return parser, parser.parse_args(argv)


def checkpoint_of(parser, text: str) -> Path:
    """The checkpoint --ckpt names, or a one-line refusal that says what is there instead."""
    path = user_path(text)
    if not path.exists():
        parser.error(f"--ckpt {text}: no such file or directory")
    runs = sorted(p for p in path.iterdir() if p.is_dir() and list_checkpoints(p)) if path.is_dir() else []
    if runs and not list_checkpoints(path) and not (path / "config.json").exists():
        parser.error(f"--ckpt {text} holds runs, not a checkpoint; pick one: "
                     + ", ".join(str(Path(text) / r.name) for r in runs))
    try:
        return find_checkpoint(str(path), path.parent, log=lambda m: print(m, file=sys.stderr))
    except CheckpointError as error:
        parser.error(f"--ckpt {text}: {error}")


def check(parser, args) -> Path:
    """Every refusal that needs no model: arguments, the checkpoint, the size, the prompts' lengths."""
    import torch

    from sd3.encode.encoders import prompt_warnings
    from sd3.model.mmdit import check_image_size

    if args.batch < 1:
        parser.error(f"--batch {args.batch}: give at least 1 image per prompt")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1 sampling step")
    empty = [i for i, p in enumerate(args.prompt, 1) if not p.strip()]
    if empty:
        parser.error(f"--prompt number {empty[0]} is empty; to sample the unconditional model, give any prompt "
                     "with --cfg 0")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but CUDA is not available here; use --device cpu")
    ckpt = checkpoint_of(parser, args.ckpt)
    cfg = load_config(ckpt)
    factor = cfg.latent_factor
    try:
        check_image_size(cfg.model, factor, args.width or cfg.model.max_res, args.height or cfg.model.max_res)
    except ValueError as error:
        parser.error(str(error))
    stand_ins.ensure(cfg, dataset=False)
    for line in prompt_warnings(cfg.encoders, args.prompt):
        print(f"warning: {line}", file=sys.stderr)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    ckpt = check(parser, args)

    from sd3.diffusion.pipeline import Pipeline, make_grid, save_gif

    pipe = Pipeline.load(ckpt, device=args.device, ema=not args.raw)
    prompts = [p for p in args.prompt for _ in range(args.batch)]
    steps = pipe.cfg.log.sample_steps if args.steps is None else args.steps      # the run's own sample settings
    guidance = pipe.cfg.log.sample_cfg if args.cfg is None else args.cfg
    result = pipe.generate(prompts, negative=args.negative, width=args.width, height=args.height, steps=steps,
                           guidance=guidance, sampler=args.sampler, seed=args.seed, shift=args.shift, frames=args.gif)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(prompts, result.images)):
        image.save(out / f"{i:03d}_{slug(prompt)}.png")
    columns = args.batch if len(args.prompt) > 1 else None
    make_grid(result.images, columns=columns, captions=prompts).save(out / "grid.png")
    if args.gif:
        save_gif(result.frames, out / "denoise.gif")
    w, h = result.images[0].size
    print(f"wrote {len(result.images)} image(s) of {w}x{h} and grid.png" + (" and denoise.gif" if args.gif else "")
          + f" to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
