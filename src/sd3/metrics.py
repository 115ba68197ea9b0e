"""What a run reports: console lines, a progress bar, wandb, and the figures behind them.

Only the first model rank logs; the numbers it logs are averaged over every model rank by the
trainer before they get here.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from sd3.config import LogConfig

_IS_MAIN = True


def set_main(is_main: bool) -> None:
    global _IS_MAIN
    _IS_MAIN = is_main


def print0(*args, **kwargs) -> None:
    """print on the rank that logs (the first model rank), nowhere else."""
    if _IS_MAIN:
        print(*args, **kwargs, flush=True)


def log_rank(rank: int, role: str, message: str) -> None:
    """A line from any rank, tagged (for errors and loader notes that every rank may need to say)."""
    print(f"[rank {rank} {role}] {message}", file=sys.stderr, flush=True)


class TimeBins:
    """Loss per t-bin (minRF; PRX logs the same): where along the path the model is still wrong.

    Accumulates on the loss's device: no host sync until the log step reads it."""

    def __init__(self, bins: int = 5, device: torch.device | str = "cpu"):
        self.bins = bins
        self.sum = torch.zeros(bins, dtype=torch.float64, device=device)
        self.count = torch.zeros(bins, dtype=torch.float64, device=device)

    def add(self, t: Tensor, loss: Tensor) -> None:
        idx = (t.detach() * self.bins).long().clamp_(0, self.bins - 1)
        self.sum.index_add_(0, idx, loss.detach().double())
        self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def state(self) -> Tensor:
        return torch.cat([self.sum, self.count])

    def summary(self, state: Tensor) -> dict[str, float]:
        sums, counts = state[: self.bins], state[self.bins :]
        out = {}
        for i in range(self.bins):
            if counts[i] > 0:
                out[f"loss_t/{i / self.bins:.1f}-{(i + 1) / self.bins:.1f}"] = float(sums[i] / counts[i])
        return out

    def reset(self) -> None:
        self.sum.zero_()
        self.count.zero_()


def mfu(flops_per_s: float, peak_tflops: float, gpus: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the configured peak of the model GPUs."""
    return flops_per_s / (peak_tflops * 1e12 * gpus)


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}"]
    if "val/loss" in metrics:
        parts.append(f"val {metrics['val/loss']:.4f}")
    parts += [f"lr {metrics['lr']:.2e}", f"gnorm {metrics['grad_norm']:.3f}",
              f"{metrics['images_per_s']:.1f} img/s", f"mfu {100 * metrics['mfu']:.2f}%",
              f"data wait {100 * metrics['data_wait']:.1f}%"]
    if metrics.get("loader_encode_ms"):
        parts.append(f"encode {metrics['loader_encode_ms']:.0f} ms")
    if metrics.get("wire_mb_per_step"):
        parts.append(f"{metrics['wire_mb_per_step']:.2f} MB/step")
    if metrics.get("bad_rows"):
        parts.append(f"{int(metrics['bad_rows'])} corrupt or unreadable rows replaced")
    if metrics.get("skipped_steps"):
        parts.append(f"skipped {int(metrics['skipped_steps'])} non-finite")
    return " | ".join(parts)


class Logger:
    """Console + wandb on the logging rank. wandb honours WANDB_MODE (offline, disabled) and reads
    WANDB_API_KEY from the environment; a resumed run continues the same wandb run id."""

    def __init__(self, cfg: LogConfig, *, run_dir: Path, config: dict, run_id: str | None, enabled: bool):
        self.enabled = enabled
        self.wandb = None
        self.run_id = run_id
        if not (enabled and cfg.wandb) or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or Path(run_dir).name,
                                id=run_id, resume="allow", dir=str(run_dir), config=config)
        self.run_id = self.wandb.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if _finite(v)}, step=step)

    def image(self, step: int, key: str, path: Path, caption: str = "") -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)
