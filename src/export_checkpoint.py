"""One checkpoint of whole tensors from a sharded one (a run trained under fsdp/hsdp).

    .venv/bin/python src/export_checkpoint.py --ckpt runs/big --out exports/big_step_00040000 [--weights-only]

`--ckpt` is a sharded checkpoint (step_*) or a run directory (its newest checkpoint that verifies). `--out`
becomes a checkpoint directory as a ddp run writes it: model.safetensors and ema.safetensors (fp32, every
tensor whole), config.json, train_state.pt and a manifest. It loads wherever any checkpoint does (infer.py,
evaluate.py, the notebook, --init_from) and resumes a run under any mode. `--weights-only` leaves out the
optimizer state (2/3 of the bytes): enough to sample, evaluate, share or start a new run with --init_from,
not to resume. infer.py and the others also read the sharded checkpoint as it is; export to hand weights
on, or to keep one file per part.

Runs on one process, on the CPU, without a process group. It holds the model, the EMA and, unless
--weights-only, twice the optimizer state in memory (about 6x the fp32 weights; 2x with --weights-only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

from sd3.atomic import atomic_path
from sd3.checkpoint.read import (
    CheckpointError,
    find_checkpoint,
    is_sharded,
    load_config,
    load_part,
    load_train_state,
    verify,
)
from sd3.checkpoint.write import write_whole
from sd3.model.mmdit import MMDiT
from sd3.paths import shown, user_path
from sd3.train.optim import build_optimizer
from sd3.train.trainer import FLAT


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="sharded checkpoint (step_*) or run directory")
    parser.add_argument("--out", required=True, help="the checkpoint directory to write (must not exist)")
    parser.add_argument("--weights-only", action="store_true",
                        help="leave out the optimizer state: to sample, evaluate or --init_from, not to resume")
    return parser.parse_args(argv)


def export(ckpt: Path, out: Path, *, weights_only: bool, log=print) -> None:
    """Write `out` from sharded checkpoint `ckpt` (verified first), whole or not at all."""
    verify(ckpt)
    cfg = load_config(ckpt)
    model_state, ema_state = load_part(ckpt, "model"), load_part(ckpt, "ema")
    saved = load_train_state(ckpt)
    groups = saved.pop("optimizer_groups")
    if not weights_only:
        log("putting the optimizer state together")
        with torch.device("meta"):
            model = MMDiT(cfg.model)
        model.load_state_dict(model_state, strict=True, assign=True)   # the loaded tensors become the parameters
        optimizer = build_optimizer(model, cfg.train)
        set_optimizer_state_dict(model, optimizer, {**groups, **load_part(ckpt, "optimizer")}, options=FLAT)
        saved["optimizer"] = optimizer.state_dict()
    with atomic_path(out, folder=True) as tmp:
        write_whole(tmp, model_state, ema_state, cfg, saved)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = user_path(args.out)
    try:
        ckpt = find_checkpoint(args.ckpt, user_path(args.ckpt), log=lambda m: print(m, file=sys.stderr))
    except CheckpointError as error:
        print(f"export_checkpoint: --ckpt {args.ckpt}: {error}", file=sys.stderr)
        return 2
    if not is_sharded(ckpt):
        print(f"export_checkpoint: {shown(ckpt)} already holds whole tensors: infer.py, evaluate.py, --init_from and "
              "--resume read it as it is", file=sys.stderr)
        return 2
    if out.exists():
        print(f"export_checkpoint: --out {args.out} exists; give a new directory", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export(ckpt, out, weights_only=args.weights_only)
    except CheckpointError as error:
        print(f"export_checkpoint: {error}", file=sys.stderr)
        return 1
    what = "weights and EMA" if args.weights_only else "weights, EMA and optimizer state"
    print(f"wrote {shown(out)} ({what} of {shown(ckpt)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
