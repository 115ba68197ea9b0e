"""What sharding the model ranks costs and saves: ddp against fsdp on CPU gloo, in the same processes.

    .venv/bin/python tests/benchmarks/bench_sharding.py [--ranks 2 4] [--steps 6] [--width 512 --depth 6]

For each rank count, two torchrun jobs of that many model ranks (no loaders: synthetic batches, the
trainer's `train_step`) train one model size under ddp and under fsdp from the same initial weights, one
job in each order, and report per rank:
- the training state it holds: bytes of its parameters, gradients and AdamW moments (its shards under
  fsdp), read off the real tensors after the steps (the EMA is one more copy of the parameters' size);
- the growth of its resident memory while the mode builds and trains (RSS after the steps minus RSS
  before building), from the job where the mode ran first (the allocator keeps what the first freed);
- the median step time over the steps after the first two.
Last lines: `estimate_state_ratio_<mode>_<N>: X` (that state against what `train.py --dry-run` estimates
for the same config and rank count: weights, gradients and moments; 1.000 is exact),
`fsdp_state_bytes_ratio_<N>: X` (fsdp / ddp state per rank; ideal 1/N) and
`fsdp_step_ratio_<N>: X` (fsdp / ddp median step time in the same processes; the geometric mean of the
two jobs). `--no-reshard` trains fsdp with train.reshard_after_forward=false.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One model rank: ddp, then fsdp, same weights, same batches."""
    import torch
    import torch.distributed as dist

    from sd3.config import preset
    from sd3.dist.batch import Batch
    from sd3.dist.parallel import build_mesh, local, parallelize
    from sd3.model.mmdit import MMDiT
    from sd3.train.memory import estimate
    from sd3.train.optim import build_optimizer
    from sd3.train.trainer import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    cfg = preset("tiny")
    cfg.model.width, cfg.model.depth, cfg.model.num_heads = args.width, args.depth, args.width // 64
    cfg.train.accumulation_steps, cfg.train.activation_checkpointing, cfg.train.precision = 1, True, "fp32"
    cfg.train.warmup, cfg.train.steps = 1, args.steps
    B, side = 4, cfg.model.max_res // cfg.latent_factor
    g = torch.Generator().manual_seed(rank)
    batches = [Batch(latents=torch.randn(B, cfg.model.in_channels, side, side, generator=g),
                     text=tuple(torch.randn(B, 32, d, generator=g) for d in cfg.model.text_dims),
                     text_mask=tuple(torch.ones(B, 32, dtype=torch.bool) for _ in cfg.model.text_dims),
                     pooled=torch.randn(B, cfg.model.pooled_dim, generator=g), step=i,
                     rows=torch.arange(B)) for i in range(args.steps)]
    results = {}
    for mode in args.order.split(","):
        gc.collect()
        before = rss_bytes()
        cfg.train.parallel = mode
        cfg.train.reshard_after_forward = not args.no_reshard
        torch.manual_seed(0)
        model = MMDiT(cfg.model)
        mesh = build_mesh(cfg.train, [tuple(range(world))], group, None, "cpu") if mode == "fsdp" else None
        train_model = parallelize(model, cfg.train, group=group, device=torch.device("cpu"), mesh=mesh)
        optimizer = build_optimizer(model, cfg.train)
        times = []
        for step in range(args.steps):
            dist.barrier(group)
            start = time.perf_counter()
            result = train_step(train_model, optimizer, iter([batches[step]]), step=step, cfg=cfg, rank_index=rank,
                                device=torch.device("cpu"))
            float(result.loss)
            times.append(time.perf_counter() - start)
        # Weights and gradients (as large as the weights, shard for shard; the step sets them to None at its
        # end), plus the AdamW moments as the optimizer holds them.
        weights = sum(local(p).numel() * 4 for p in model.parameters())
        moments = sum(local(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.ndim)
        state = 2 * weights + moments
        # What the dry run's estimate says this rank holds of the same: its weights, gradients and moments lines.
        lines = estimate(cfg, model_ranks=world).model
        estimated = sum(x.bytes for x in lines if x.label.startswith(("weights (", "gradients (", "AdamW moments")))
        results[mode] = {"state": state, "estimated": estimated, "rss": rss_bytes() - before,
                         "step_s": statistics.median(times[2:])}
        del model, train_model, optimizer, result
    dist.barrier(group)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--no-reshard", action="store_true", help="fsdp keeps gathered blocks until the backward")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--order", default="ddp,fsdp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"model: tiny preset at width {args.width}, depth {args.depth}; batch 4 per rank, fp32, activation "
          f"checkpointing, {args.steps} steps (median of the last {args.steps - 2}), 1 thread per rank, gloo"
          + (", fsdp without resharding after the forward" if args.no_reshard else ""))
    for n in args.ranks:
        jobs = [run_job(n, order, args) for order in ("ddp,fsdp", "fsdp,ddp")]
        first = {"ddp": jobs[0]["ddp"], "fsdp": jobs[1]["fsdp"]}
        for mode in ("ddp", "fsdp"):
            x = first[mode]
            steps = ", ".join(f"{job[mode]['step_s'] * 1e3:.0f}" for job in jobs)
            print(f"{n} ranks, {mode:4}: state per rank {x['state'] / 2**20:8.1f} MiB, RSS growth "
                  f"{x['rss'] / 2**20:8.1f} MiB, step {steps} ms (each job)")
        ratio = math.sqrt(math.prod(job["fsdp"]["step_s"] / job["ddp"]["step_s"] for job in jobs))
        for mode in ("ddp", "fsdp"):   # 1.000: the dry run's state per rank is what the rank holds
            print(f"estimate_state_ratio_{mode}_{n}: {first[mode]['state'] / first[mode]['estimated']:.3f}")
        print(f"fsdp_state_bytes_ratio_{n}: {first['fsdp']['state'] / first['ddp']['state']:.3f}")
        print(f"fsdp_step_ratio_{n}: {ratio:.3f}")


def run_job(n: int, order: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", "--order", order, "--steps", str(args.steps), "--width", str(args.width), "--depth",
           str(args.depth), *(["--no-reshard"] if args.no_reshard else [])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"the {n}-rank job failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])

if __name__ == "__main__":
    main()
