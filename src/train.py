"""Train an SD3-style MMDiT with rectified flow.

    .venv/bin/python src/train.py --preset tiny --run_dir runs/tiny             # one process (CPU ok)
    .venv/bin/torchrun --standalone --nproc_per_node=3 src/train.py --preset tiny   # 1 loader + 2 model ranks
    .venv/bin/python src/train.py --preset sd3_256 --data.batch_size=120 --dry-run  # check a config
    sbatch runjob_SLURM.sh                                                         # a cluster

Any config field can be overridden with a dotted flag (`--train.lr=3e-4`); `--help` lists them all.
Under torchrun the rank map decides each process's role: loader ranks read, decode and encode;
model ranks train (DDP among themselves); at world size 1 one process does both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sd3.checkpoint.read import CheckpointError, checkpoint_dir, find_checkpoint, load_config, resumable
from sd3.checkpoint.write import write_marker
from sd3.config import ConfigError, apply_overrides, help_text, preset, set_value, to_dict
from sd3.config.changes import check_changes
from sd3.console import close_log, log_rank, open_log, print0, set_main
from sd3.dist.runtime import StopSignal, init_runtime, rank_map_from_env
from sd3.encode import stand_ins
from sd3.lock import RunDirLocked, RunLock
from sd3.paths import command, resolve, shown
from sd3.train.trainer import FAILED, PREEMPTED, PeerFailed, RunResult


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], add_help=False,
        epilog="Dotted overrides such as --train.lr=3e-4 set any config field; --help lists them.")
    parser.add_argument("--preset", default="tiny", help="tiny, sd3_256, sd3_512, sd3_1024 or sd3_large")
    parser.add_argument("--run_dir", help="shortcut for --run_dir: where checkpoints and samples go")
    parser.add_argument("--steps", type=int, help="shortcut for --train.steps (optimizer steps)")
    parser.add_argument("--resume", help="'auto' (latest whole checkpoint of run_dir, if any) or a checkpoint dir")
    parser.add_argument("--init_from", help="a checkpoint whose weights (model and EMA) start this run")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the resolved config, a per-GPU memory estimate and the parameter count, then exit")
    parser.add_argument("--model_ranks", type=int,
                        help="with --dry-run: the number of model ranks to estimate for (default: the rank map's; "
                             "one node's when the map is generated per node)")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        try:
            parser.print_help()
            print("\nconfig fields (current preset values):\n" + help_text(preset(args.preset)), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted; no error at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    cfg = apply_overrides(preset(args.preset), overrides)
    if args.run_dir:
        set_value(cfg, "run_dir", args.run_dir)
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.resume and args.init_from:
        raise ConfigError("--resume continues a run and --init_from starts a new one from weights: give one")
    cfg.validate()
    if resolve(cfg.run_dir).exists() and not resolve(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir!r} is a file, not a folder: give the folder for this run's "
                          "checkpoints and samples")
    return args, cfg


def dry_run(cfg, model_ranks: int | None = None) -> None:
    from sd3.model.mmdit import count_parameters
    from sd3.train.memory import can_shard, estimate, format_report, model_rank_count, shard_count

    n = model_ranks or model_rank_count(cfg)
    shards = shard_count(cfg, cfg.train.parallel, n)
    if not can_shard(cfg.train.parallel, shards, n):
        raise ConfigError(f"--dry-run at {n} model ranks: train.parallel={cfg.train.parallel} cannot shard over them "
                          f"(shard groups of {shards}); give --model_ranks a count it divides into groups of >= 2, "
                          "or another --train.parallel")
    print(json.dumps(to_dict(cfg), indent=2))
    print(format_report(estimate(cfg, stand_in_configs=stand_ins.stand_in_configs, model_ranks=n)))
    print(f"parameters: {count_parameters(cfg.model)}")  # the last line: scripts read it


def start_step_of(args, cfg, rt) -> tuple[int, Path | None]:
    """Where this run starts: the first model rank finds the checkpoint (the newest that verifies, saying
    what it skipped) and broadcasts its step, so every rank, loaders included, starts at the same step;
    the other model ranks check they see the same checkpoint (a shared filesystem)."""
    first = rt.ranks.model_ranks[0]
    path, failure = None, None
    if rt.rank == first:
        try:
            path = find_checkpoint(args.resume, resolve(cfg.run_dir), log=print0)
            if path is not None and not resumable(path):
                raise CheckpointError(f"{shown(path)} holds weights only (exported with --weights-only): start a "
                                      f"new run from it with --init_from {shown(path)}")
            if path is not None:  # before any weights load: a shape that cannot change is refused here
                note = check_changes(load_config(path), cfg, checkpoint=shown(path), how="resume")
                if note:
                    print0(note)
        except (CheckpointError, ConfigError) as error:
            if not rt.distributed:
                raise
            # Say so in the broadcast (-1) rather than leave the others to a "connection closed" traceback;
            # FAILED gets this rank's reason first.
            write_failed(resolve(cfg.run_dir), rt, error)
            failure = error
    step = int(path.name.split("_")[-1]) if path is not None else 0
    if rt.distributed:
        agreed = torch.tensor([-1 if failure else step])
        dist.broadcast(agreed, src=first, group=rt.ctrl_group)
        step = int(agreed)
        if failure is not None:
            raise failure
        if step < 0:
            raise CheckpointError(f"model rank {first} could not resume from a checkpoint (its message says why)")
        if rt.ranks.is_model(rt.rank) and rt.rank != first and step:
            path = checkpoint_dir(resolve(cfg.run_dir)) / f"step_{step:08d}"
            if not path.is_dir():
                raise RuntimeError(f"rank {rt.rank} does not see {path}, the checkpoint the first model rank "
                                   "resumes from: run_dir must be on a filesystem every node shares")
    return step, path


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if args.dry_run:
        dry_run(cfg, args.model_ranks)
        return 0
    ranks = rank_map_from_env(cfg)  # a bad map fails here, before any process group or model exists
    stop = StopSignal()
    rt = init_runtime(cfg, ranks)
    set_main(rt.is_logging)
    stop.announce = rt.is_logging
    run_dir = resolve(cfg.run_dir)
    try:
        lock = take_run_lock(run_dir, rt)  # before anything is written to the run directory
    except RunDirLocked:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()
        raise
    try:
        return run(args, cfg, rt, stop, run_dir)
    finally:  # last: the markers and the report are this run's too
        if lock is not None:
            lock.release()


def run(args, cfg, rt, stop, run_dir: Path) -> int:
    """The run itself, on every rank, once this run holds the run directory."""
    open_log(run_dir / "train.log")
    if rt.is_logging:
        clear_markers(run_dir)
    print0(rt.ranks.describe())
    try:
        if rt.role != "model":  # loaders need the data and the encoders; model ranks load the autoencoder later
            stand_ins.ensure(cfg, log=print0 if rt.role == "both" else lambda m: log_rank(rt.rank, "loader", m))
        init_from = find_checkpoint(args.init_from, Path(args.init_from)) if args.init_from else None
        if init_from is not None:  # every rank decides alike: the same files, the same config
            note = check_changes(load_config(init_from), cfg, checkpoint=shown(init_from), how="start from")
            if note:
                print0(note)
        start, resume = start_step_of(args, cfg, rt)
        if resume is not None:
            print0(f"resuming from {resume} (step {start})")
        accum = cfg.train.accumulation_steps
        first, end = start * accum, cfg.train.steps * accum  # micro-steps: the sampler's clock
        result = None
        if rt.role == "both":
            result = run_colocated(cfg, rt, stop, first, end, start, resume, init_from)
        elif rt.ranks.is_loader(rt.rank):
            from sd3.dist.loader import run_loader

            run_loader(cfg, rt, start_step=first, end_step=end)
        else:
            result = run_model_rank(cfg, rt, stop, start, resume, init_from)
    except BaseException as error:
        # A loader's failure arrives as SystemExit(1) from its cause. A second Ctrl-C (KeyboardInterrupt) is
        # a stop, not a failure. PeerFailed is the echo of another model rank's failure, which that rank
        # writes itself: were this rank first to the file, FAILED would say "model rank 1 could not go on".
        cause = error.__cause__ if isinstance(error, SystemExit) and error.__cause__ else error
        if not isinstance(cause, (KeyboardInterrupt, SystemExit, PeerFailed)):
            write_failed(run_dir, rt, error)
        raise
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if result is not None and rt.is_logging:
        if result.stopped_early:   # a stop that completed: the checkpoint is whole and the loader said END
            write_marker(run_dir, PREEMPTED, f"stopped at step {result.step} of {cfg.train.steps} on "
                                             f"{stop.received or 'a signal to another rank'}")
        report(cfg, result)
    close_log()
    return 0


def run_colocated(cfg, rt, stop, first, end, start, resume, init_from) -> RunResult:
    from sd3.dist.loader import BatchProducer
    from sd3.dist.sources import LocalSource
    from sd3.train.trainer import run_trainer

    producer = BatchProducer(cfg, device=rt.device, model_indices=[0], num_model_ranks=1)
    print0(producer.dataset.describe())
    source = LocalSource(producer, first, end)
    try:
        return run_trainer(cfg, rt, stop, source, start_step=start, resume=resume, init_from=init_from,
                           autoencoder=lambda: producer.ae)
    finally:
        source.finish(start)


FAILED_DRAIN_S = 10.0
"""How long a failed model rank waits for its loader's END before it exits anyway. When every model rank
fails together (a failed checkpoint write stops them all) the END comes within a batch."""


def run_model_rank(cfg, rt, stop, start, resume, init_from) -> RunResult:
    from sd3.dist.sources import RemoteSource
    from sd3.encode.encoders import load_autoencoder
    from sd3.train.trainer import run_trainer

    source = RemoteSource(rt.ranks.loader_of(rt.rank), ctrl_group=rt.ctrl_group, device=rt.device,
                          depth=cfg.data.prefetch, timeout_s=cfg.ranks.timeout_s)

    def autoencoder():
        """Loaded at the first sample grid, after the loader's startup messages: by then its encoders
        loaded (or it reported why not)."""
        stand_ins.ensure(cfg, dataset=False, log=print0)
        return load_autoencoder(cfg.encoders, rt.device)

    try:
        result = run_trainer(cfg, rt, stop, source, start_step=start, resume=resume, init_from=init_from,
                             autoencoder=autoencoder)
    except BaseException:
        # Tell the loader this rank is done, so it stops producing and ends the conversation; if the
        # loader is what failed, there is nobody to tell. Bounded: a model rank still blocked in a collective
        # with this one is done only once this one exits (without the bound the job hung until the timeout).
        with contextlib.suppress(Exception):
            source.finish(-1, within=FAILED_DRAIN_S)
        raise
    source.finish(result.step)  # a loader that died on the way is an error, not a clean stop
    return result


def take_run_lock(run_dir: Path, rt) -> RunLock | None:
    """The first model rank (the one that writes the run's files) takes the run directory's lock and tells
    every rank whether the run may go on; the others hold nothing. Raises RunDirLocked on every rank when
    another run holds the directory."""
    lock, refusal = None, None
    if rt.is_logging:
        try:
            lock = RunLock.take(run_dir, log=print0)
        except RunDirLocked as error:
            refusal = str(error)
    if rt.distributed:
        answer = [refusal]
        dist.broadcast_object_list(answer, src=rt.ranks.model_ranks[0], group=rt.ctrl_group)
        if answer[0] is not None and refusal is None:
            raise RunDirLocked(f"{run_dir} is in use by another run (model rank {rt.ranks.model_ranks[0]} says which)")
    if refusal is not None:
        raise RunDirLocked(refusal)
    return lock


def clear_markers(run_dir: Path) -> None:
    """A PREEMPTED or FAILED left by an earlier run describes that run, not this one."""
    for name in (PREEMPTED, FAILED):
        (run_dir / name).unlink(missing_ok=True)


def write_failed(run_dir: Path, rt, error: BaseException) -> None:
    """`<run_dir>/FAILED`: one line, the first failure of this run (later ones are its consequences)."""
    role = "loader" if rt.ranks.is_loader(rt.rank) and rt.role != "both" else "model"
    cause = error.__cause__ if isinstance(error, SystemExit) and error.__cause__ else error
    text = f"rank {rt.rank} ({role}): {type(cause).__name__}: {cause}".splitlines()[0]
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / FAILED, "x") as f:
            f.write(text + "\n")


def report(cfg, result) -> None:
    print0(f"\nfinished at step {result.step}" + (" (stopped early: rerun with --resume auto)"
                                                 if result.stopped_early else ""))
    print0(f"checkpoint:  {shown(result.checkpoint)}")
    if result.sample_grid:
        print0(f"sample grid: {shown(result.sample_grid)}")
    print0(f"log:         {shown(resolve(cfg.run_dir) / 'train.log')}")
    prompt = cfg.log.sample_prompts[0] if cfg.log.sample_prompts else "a photograph"
    print0(f"sample with: {command('infer.py')} --ckpt {shlex.quote(shown(result.checkpoint))} "
           f"--prompt {shlex.quote(prompt)} --width {cfg.model.max_res} --height {cfg.model.max_res} --out samples/")


ERRORS_WITHOUT_TRACEBACK = ("Diverged", "PeerFailed", "CheckpointError", "NoSpaceError", "TransportError",
                            "LoaderFailed", "DataError", "RunDirLocked")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops at the step's end with a checkpoint)
        print0("stopped at once on a second Ctrl-C: the steps since the last checkpoint were not saved")
        sys.exit(130)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        log_rank(int(os.environ.get("RANK", "0")), "error", f"{type(error).__name__}: {error}")
        if type(error).__name__ in ERRORS_WITHOUT_TRACEBACK:  # the message says it all
            sys.exit(1)
        raise
