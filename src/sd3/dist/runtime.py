"""Process-level setup: which rank this is, its device, its process groups, and stop signals."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from sd3.config import Config
from sd3.dist.parallel import SHARDED, build_mesh, shard_groups
from sd3.dist.rankmap import RankMap


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ranks: RankMap
    model_group: dist.ProcessGroup | None
    """The model ranks (DDP); None at world size 1."""
    ctrl_group: dist.ProcessGroup | None
    """Every rank, always gloo: the start handshake and stop requests travel here on the CPU, apart
    from the data (an NCCL receive posted for a message that comes late would block the data stream)."""
    model_ctrl_group: dist.ProcessGroup | None = None
    """The model ranks, always gloo: the per-step stop vote, on CPU tensors (never a GPU sync)."""
    mesh: DeviceMesh | None = None
    """train.parallel=fsdp/hsdp, on model ranks: the device mesh the model is sharded over."""
    checkpoint_group: dist.ProcessGroup | None = None
    """train.parallel=fsdp/hsdp: the model ranks again, always gloo, for sharded checkpoints alone (their
    collectives run on a background thread beside training's, and carry Python objects)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_logging(self) -> bool:
        """The first model rank logs, samples and writes checkpoints."""
        return self.rank == self.ranks.model_ranks[0]

    @property
    def role(self) -> str:
        return self.ranks.role(self.rank)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but CUDA is not available; use --train.device=cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def rank_map_from_env(cfg: Config) -> RankMap:
    """Validate the rank map, and the sharding over its model ranks, against torchrun's environment
    before anything heavy."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = RankMap.from_config(cfg.ranks, world_size=world, local_world_size=_local_world_size())
    shard_groups(cfg.train, ranks, _local_world_size())
    return ranks


def init_runtime(cfg: Config, ranks: RankMap) -> Runtime:
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.train.device, local_rank)
    if ranks.world_size == 1:
        return Runtime(rank, 1, local_rank, device, ranks, None, None, None)
    backend = cfg.ranks.backend if cfg.ranks.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("ranks.backend='nccl' needs CUDA; use --ranks.backend=gloo on CPU")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.ranks.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    # Every rank creates every group, in this order: a rank that skipped one would hang the job.
    model_group = dist.new_group(list(ranks.model_ranks))
    ctrl_group = dist.new_group(list(range(ranks.world_size)), backend="gloo")
    model_ctrl_group = dist.new_group(list(ranks.model_ranks), backend="gloo")
    checkpoint_group = dist.new_group(list(ranks.model_ranks), backend="gloo") if cfg.train.parallel in SHARDED else None
    mesh = None
    if cfg.train.parallel == "hsdp":
        groups = shard_groups(cfg.train, ranks, _local_world_size())
        shard = [dist.new_group(list(g)) for g in groups]
        replicate = [dist.new_group([g[i] for g in groups]) for i in range(len(groups[0]))]
        row = next((i for i, g in enumerate(groups) if rank in g), None)
        if row is not None:
            mesh = build_mesh(cfg.train, groups, shard[row], replicate[groups[row].index(rank)], device.type)
    elif cfg.train.parallel == "fsdp" and ranks.is_model(rank):
        mesh = build_mesh(cfg.train, [ranks.model_ranks], model_group, None, device.type)
    return Runtime(rank, ranks.world_size, local_rank, device, ranks, model_group, ctrl_group, model_ctrl_group,
                   mesh, checkpoint_group)


class StopSignal:
    """SIGTERM (SLURM, torchrun), SIGUSR1 (the early warning) and Ctrl-C (SIGINT) ask for a stop at the next
    step boundary, with a checkpoint. Handlers only set a flag; repeated signals are harmless (SLURM and
    torchrun each send SIGTERM; a terminal's Ctrl-C reaches a rank from the terminal and from torchrun).
    A second Ctrl-C, pressed `AGAIN_S` or more after the first, stops at once (KeyboardInterrupt), without
    a checkpoint. Installed with signal.signal, which also replaces the 'ignore USR1' that the SLURM script
    gives torchrun (and, through it, us)."""

    AGAIN_S = 1.0
    """SIGINTs closer together than this are one Ctrl-C (delivered twice), not a second press."""

    def __init__(self):
        self.received: str | None = None
        self.announce = True
        """Whether this process says at once that a Ctrl-C was taken (one rank of a run says it)."""
        self._first_interrupt: float | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
                if self.announce:  # os.write: safe inside a signal handler, unlike print
                    os.write(2, b"Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once, "
                                b"without one)\n")
            elif now - self._first_interrupt >= self.AGAIN_S:
                raise KeyboardInterrupt("a second Ctrl-C")
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None
