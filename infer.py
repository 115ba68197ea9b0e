"""Sample images from a checkpoint.

    python infer.py --ckpt runs/tiny --prompt "a cat on a windowsill" --prompt "a rocket" \
        --steps 30 --cfg 5 --sampler euler --width 64 --height 48 --seed 0 --batch 2 --out samples/ --gif

`--ckpt` is a checkpoint directory (step_*) or a run directory (its latest checkpoint). Writes one
PNG per image, `grid.png`, and with `--gif` a `denoise.gif` of the decoded estimate at every step.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from sd3 import stand_ins
from sd3.inference import Pipeline, make_grid, save_gif
from sd3.paths import user_path
from sd3.sample import SAMPLERS


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "prompt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (step_*) or run directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative", default="", help="negative prompt ('' = the trained unconditional)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance scale s in v_u + s (v_c - v_u)")
    parser.add_argument("--sampler", default="euler", choices=SAMPLERS)
    parser.add_argument("--shift", type=float, default=1.0, help="timestep shift (SD3 sec. 5.3.2); 1 = none")
    parser.add_argument("--width", type=int, help="pixels (default: the model's max_res)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's max_res)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--gif", action="store_true", help="also write denoise.gif")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--raw", action="store_true", help="use the trained weights instead of the EMA")
    args = parser.parse_args(argv)

    pipe = Pipeline.load(user_path(args.ckpt), device=args.device, ema=not args.raw,
                         prepare=lambda cfg: stand_ins.ensure(cfg, dataset=False))
    prompts = [p for p in args.prompt for _ in range(args.batch)]
    try:
        result = pipe.generate(prompts, negative=args.negative, width=args.width, height=args.height,
                               steps=args.steps, cfg=args.cfg, sampler=args.sampler, seed=args.seed,
                               shift=args.shift, frames=args.gif)
    except ValueError as error:  # a size the model cannot take, an unknown sampler
        parser.error(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(prompts, result.images)):
        image.save(out / f"{i:03d}_{slug(prompt)}.png")
    make_grid(result.images, columns=args.batch if len(args.prompt) > 1 else None).save(out / "grid.png")
    if args.gif:
        save_gif(result.frames, out / "denoise.gif", columns=args.batch if len(args.prompt) > 1 else None)
    w, h = result.images[0].size
    print(f"wrote {len(result.images)} image(s) of {w}x{h} and grid.png" + (" and denoise.gif" if args.gif else "")
          + f" to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
