"""How recognisable a demo run's samples are: one sample per demo caption, scored against the demo photos.

    python tests/benchmarks/demo_quality.py --ckpt runs/demo [--steps S] [--cfg G] [--sampler euler]
        [--shift S] [--seeds 0,1,2] [--captions auto|short|long] [--compare 16] [--grid out.png] [--raw]

Loads the run's EMA weights (`--raw`: the trained ones) through `sd3.diffusion.pipeline.Pipeline`, samples every
caption of `sd3.data.demo.DEMO_CAPTIONS` at the model's `max_res` square, once per seed, and scores each
sample against every square crop of every demo photo (`tests/demo_scoring.py`): whether its nearest photo
(pixel MSE, both pooled to `--compare` x `--compare`) is its own, its PSNR to its own photo's closest crop
at full size, and its margin (pooled MSE to the nearest other photo minus to its own; positive is good).
`--captions auto` takes the captions the run trained on (short when `data.short_caption_prob` >= 0.5).

`--cfg`, `--steps`, `--sampler` and `--shift` take comma-separated lists: every combination is sampled
from the one loaded model, each summary line then prefixed with its settings. By default the run's own
sample-grid settings (`log.sample_cfg`, `log.sample_steps`) and its training shift. Under load, run it with
OMP_NUM_THREADS=1: two threads on a busy 2-core machine sample many times slower. Prints one line per caption
(nearest photo per seed, mean PSNR, mean margin), then `nearest_photo_accuracy: X`, `mean_psnr_db: X` and
`mean_margin: X` (means over captions and seeds). The first line gives the same figures for real photos
(each square crop against the others), what a perfect model would reach: PSNR rewards blur (a flat
image of the photo's mean colour scores higher than a real crop), so read it with the accuracy and margin.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from sd3.checkpoint.read import find_checkpoint, load_config  # noqa: E402
from sd3.config.presets import DEMO_CAPTIONS  # noqa: E402
from sd3.diffusion.sample import SAMPLERS  # noqa: E402
from sd3.encode import stand_ins  # noqa: E402
from sd3.eval.scores import pil_to_uint8  # noqa: E402
from sd3.paths import resolve, user_path  # noqa: E402
from tests.demo_scoring import photo_crops, score_samples  # noqa: E402


def _list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (step_*) or run directory")
    parser.add_argument("--steps", type=_list(int), help="sampler steps (list); default: the run's log.sample_steps")
    parser.add_argument("--cfg", type=_list(float), help="guidance scales (list); default: the run's log.sample_cfg")
    parser.add_argument("--sampler", type=_list(str), default=["euler"], help=f"samplers (list): {', '.join(SAMPLERS)}")
    parser.add_argument("--shift", type=_list(float), default=[None],
                        help="schedule shifts (list); default: the one the run trained with")
    parser.add_argument("--seeds", type=_list(int), default=[0, 1, 2], help="sampling seeds, averaged")
    parser.add_argument("--captions", choices=("auto", "short", "long"), default="auto")
    parser.add_argument("--compare", type=int, default=16, help="side the nearest-photo comparison pools to")
    parser.add_argument("--data", help="demo dataset folder (default: the run's data.dataset)")
    parser.add_argument("--grid", help="also save the first seed's samples of the first setting as a grid here")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    args = parser.parse_args(argv)
    bad = [s for s in args.sampler if s not in SAMPLERS]
    if bad:
        parser.error(f"--sampler {bad[0]!r}: choose from {', '.join(SAMPLERS)}")
    if not args.seeds or min(args.steps or [1]) < 1 or args.compare < 1:
        parser.error("give at least one seed, --steps >= 1 and --compare >= 1")
    path = user_path(args.ckpt)
    if not path.exists():
        parser.error(f"--ckpt {args.ckpt}: no such file or directory")
    args.ckpt = find_checkpoint(str(path), path.parent)
    return args


def reference(crops: dict, compare: int) -> None:
    """The figures a perfect model would get: each square crop of a photo scored as a sample against the
    photos' other crops (itself left out), so a run's figures can be read against them."""
    scores = []
    for name, own in crops.items():
        for i in range(own.shape[0]):
            others = {n: torch.cat([c[:i], c[i + 1:]]) if n == name else c for n, c in crops.items()}
            scores += score_samples(own[i:i + 1], own=[name], crops=others, compare=compare)
    accuracy = statistics.mean(s.nearest == s.own for s in scores)
    psnr, margin = statistics.mean(s.psnr_db for s in scores), statistics.mean(s.margin for s in scores)
    print(f"reference, a real crop of the photo: nearest_photo_accuracy {accuracy:.3f} mean_psnr_db {psnr:.2f} "
          f"mean_margin {margin:+.4f}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from sd3.diffusion.pipeline import Pipeline, make_grid

    cfg = load_config(args.ckpt)
    short = args.captions == "short" or (args.captions == "auto" and cfg.data.short_caption_prob >= 0.5)
    names = list(DEMO_CAPTIONS)
    prompts = [DEMO_CAPTIONS[n][1 if short else 0] for n in names]
    res = cfg.model.max_res
    crops = photo_crops(resolve(args.data or cfg.data.dataset), res=res)
    pipe = Pipeline.load(args.ckpt, device="cpu", ema=not args.raw,
                         prepare=lambda c: stand_ins.ensure(c, dataset=False))
    print(f"checkpoint {args.ckpt} ({'raw' if args.raw else 'EMA'} weights), {len(names)} "
          f"{'short' if short else 'long'} captions at {res}x{res}, seeds {args.seeds}, "
          f"compared at {args.compare}x{args.compare}")

    reference(crops, args.compare)
    cfgs, steps_list = args.cfg or [cfg.log.sample_cfg], args.steps or [cfg.log.sample_steps]
    combos = list(itertools.product(cfgs, steps_list, args.sampler, args.shift))
    for k, (guidance, steps, sampler, shift) in enumerate(combos):
        started = time.perf_counter()
        per_seed = []
        for seed in args.seeds:
            images = pipe.generate(prompts, width=res, height=res, steps=steps, guidance=guidance, sampler=sampler,
                                   seed=seed, shift=shift).images
            if k == 0 and seed == args.seeds[0] and args.grid:
                Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
                make_grid(images, columns=5, captions=prompts).save(args.grid)
            per_seed.append(score_samples(pil_to_uint8(images).float() / 255, own=names, crops=crops,
                                          compare=args.compare))
        shift_used = pipe.shift_at(res, res) if shift is None else shift
        label = f"cfg {guidance:g} steps {steps} {sampler} shift {shift_used:g}"
        prefix = f"{label}: " if len(combos) > 1 else ""
        print(f"--- {label} ({time.perf_counter() - started:.1f} s)")
        for i, name in enumerate(names):
            scores = [s[i] for s in per_seed]
            print(f"{prefix}{name:10s} hits {sum(s.nearest == name for s in scores)}/{len(scores)} "
                  f"nearest {','.join(s.nearest for s in scores):32s} "
                  f"psnr {statistics.mean(s.psnr_db for s in scores):5.2f} dB "
                  f"margin {statistics.mean(s.margin for s in scores):+.4f}")
        flat = [s for scores in per_seed for s in scores]
        print(f"{prefix}nearest_photo_accuracy: {statistics.mean(s.nearest == s.own for s in flat):.3f}")
        print(f"{prefix}mean_psnr_db: {statistics.mean(s.psnr_db for s in flat):.2f}")
        print(f"{prefix}mean_margin: {statistics.mean(s.margin for s in flat):+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
