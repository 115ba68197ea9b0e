"""Train an SD3-style MMDiT with rectified flow.

    python src/train.py --preset tiny --run_dir runs/tiny --steps 600            # one process (CPU ok)
    torchrun --standalone --nproc_per_node=3 src/train.py --preset tiny          # 1 loader + 2 model ranks
    python src/train.py --preset sd3_256 --data.batch_size=120 --dry-run         # check a config
    sbatch runjob_SLURM.sh                                                       # a cluster

Any config field can be overridden with a dotted flag (`--train.lr=3e-4`); `--help` lists them all.
Under torchrun the rank map decides each process's role: loader ranks read, decode and encode;
model ranks train (DDP among themselves); at world size 1 one process does both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist

from sd3.checkpoint import find_checkpoint
from sd3.config import ConfigError, apply_overrides, help_text, preset, set_value, to_dict
from sd3.metrics import log_rank, print0, set_main
from sd3.runtime import StopSignal, init_runtime, rank_map_from_env


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], add_help=False,
        epilog="Dotted overrides such as --train.lr=3e-4 set any config field; --help lists them.")
    parser.add_argument("--preset", default="tiny", help="tiny, sd3_256, sd3_512 or sd3_1024")
    parser.add_argument("--run_dir", help="shortcut for --run_dir: where checkpoints and samples go")
    parser.add_argument("--steps", type=int, help="shortcut for --train.steps (optimizer steps)")
    parser.add_argument("--resume", help="'auto' (latest whole checkpoint of run_dir, if any) or a checkpoint dir")
    parser.add_argument("--init_from", help="a checkpoint whose weights (model and EMA) start this run")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the resolved config, a per-GPU memory estimate and the parameter count, then exit")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\nconfig fields (current preset values):\n" + help_text(preset(args.preset)))
        raise SystemExit(0)
    cfg = apply_overrides(preset(args.preset), overrides)
    if args.run_dir:
        set_value(cfg, "run_dir", args.run_dir)
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.resume and args.init_from:
        raise ConfigError("--resume continues a run and --init_from starts a new one from weights: give one")
    return args, cfg.validate()


def dry_run(cfg) -> None:
    from sd3.memory import estimate, format_report
    from sd3.model.mmdit import count_parameters

    print(json.dumps(to_dict(cfg), indent=2))
    print(format_report(estimate(cfg)))
    print(f"parameters: {count_parameters(cfg.model)}")  # the last line: scripts read it


def start_step_of(args, cfg, rt) -> tuple[int, Path | None]:
    """Where this run starts: model ranks resolve the checkpoint, the first one's step is broadcast
    so that every rank, loaders included, starts at the same step."""
    path = None
    if rt.ranks.is_model(rt.rank):
        path = find_checkpoint(args.resume, cfg.run_dir)
    step = int(path.name.split("_")[-1]) if path is not None else 0
    if rt.distributed:
        agreed = torch.tensor([step])
        dist.broadcast(agreed, src=rt.ranks.model_ranks[0], group=rt.ctrl_group)
        if rt.ranks.is_model(rt.rank) and int(agreed) != step:
            raise RuntimeError(f"rank {rt.rank} found checkpoint step {step} but the first model rank found "
                               f"{int(agreed)}: run_dir must be on a filesystem every node shares")
        step = int(agreed)
    return step, path


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if args.dry_run:
        dry_run(cfg)
        return 0
    ranks = rank_map_from_env(cfg)  # a bad map fails here, before any process group or model exists
    stop = StopSignal()
    rt = init_runtime(cfg, ranks)
    set_main(rt.is_logging)
    print0(ranks.describe())
    init_from = None
    if args.init_from:
        init_from = find_checkpoint(args.init_from, Path(args.init_from))
    start, resume = start_step_of(args, cfg, rt)
    if resume is not None:
        print0(f"resuming from {resume} (step {start})")
    accum = cfg.train.accumulation_steps
    first, end = start * accum, cfg.train.steps * accum  # micro-steps: the sampler's clock
    metrics = None
    try:
        if rt.role == "both":
            metrics = run_colocated(cfg, rt, stop, first, end, start, resume, init_from)
        elif rt.ranks.is_loader(rt.rank):
            from sd3.loader import run_loader

            run_loader(cfg, rt, start_step=first, end_step=end)
        else:
            metrics = run_model_rank(cfg, rt, stop, start, resume, init_from)
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if metrics is not None and rt.is_logging:
        report(cfg, metrics)
    return 0


def run_colocated(cfg, rt, stop, first, end, start, resume, init_from) -> dict:
    from sd3.loader import BatchProducer
    from sd3.trainer import run_trainer
    from sd3.transport import LocalBatches

    producer = BatchProducer(cfg, device=rt.device, model_indices=[0], num_model_ranks=1)
    print0(producer.dataset.describe())
    try:
        source = LocalBatches(producer, first, end)
        return run_trainer(cfg, rt, stop, source, start_step=start, resume=resume, init_from=init_from,
                           autoencoder=lambda: producer.ae)
    finally:
        producer.close()


def run_model_rank(cfg, rt, stop, start, resume, init_from) -> dict:
    from sd3.encoders import load_autoencoder
    from sd3.loader import ensure_stand_in_encoders
    from sd3.trainer import run_trainer
    from sd3.transport import Receiver

    loader = rt.ranks.loader_of(rt.rank)
    source = Receiver(loader, group=None, device=rt.device, depth=cfg.data.prefetch, timeout_s=cfg.ranks.timeout_s)

    def autoencoder():
        """Loaded at the first sample grid, after the loader's startup messages: by then its encoders
        loaded (or it reported why not)."""
        ensure_stand_in_encoders(cfg)
        return load_autoencoder(cfg.encoders, rt.device)

    metrics = run_trainer(cfg, rt, stop, source, start_step=start, resume=resume, init_from=init_from,
                          autoencoder=autoencoder)
    # Tell the loader this rank is done, then take whatever it already sent until its END.
    dist.send(torch.tensor([metrics["step"]]), loader, group=rt.ctrl_group)
    source.drain()
    return metrics


def report(cfg, metrics: dict) -> None:
    ckpt = metrics.get("checkpoint")
    print0(f"\nfinished at step {metrics['step']}" + (" (stopped early: rerun with --resume auto)"
                                                     if metrics["stopped_early"] else ""))
    print0(f"checkpoint:  {ckpt}")
    if metrics.get("sample_grid"):
        print0(f"sample grid: {metrics['sample_grid']}")
    prompt = cfg.log.sample_prompts[0] if cfg.log.sample_prompts else "a photograph"
    print0(f"sample with: python infer.py --ckpt {ckpt} --prompt {json.dumps(prompt)} "
           f"--width {cfg.model.max_res} --height {cfg.model.max_res} --out samples/")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        import os

        log_rank(int(os.environ.get("RANK", "0")), "error", f"{type(error).__name__}: {error}")
        raise
