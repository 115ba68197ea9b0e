"""What a run reports: a progress bar, wandb, a run history file, and the figures behind them.

Only the first model rank logs; the numbers it logs are averaged over every model rank by the
trainer before they get here. Every `Logger.log` call also appends one line to
`<run_dir>/metrics.jsonl` (`.venv/bin/python src/plot_run.py RUN` plots it), wandb or not.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from sd3.atomic import atomic_write_text
from sd3.config import LogConfig


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
    if "mask_ratio" in metrics:
        parts.append(f"mask {metrics['mask_ratio']:.2f}")
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


HISTORY = "metrics.jsonl"


class History:
    """`<run_dir>/metrics.jsonl`: one JSON object per `log` call, `{"step": s, "images": n, <metrics>}`
    (`images`, the images trained on so far, when the images per step are known), appended and flushed
    line by line, so a killed run keeps every line it logged.

    A run that starts at step s (a resume, or a fresh start in a used run directory) first drops the lines
    past s, and any line cut short by a kill: they belong to steps this run is about to redo, and a plot
    must not double back. Non-finite values are written as null (JSON has no NaN)."""

    def __init__(self, run_dir: str | Path, *, start_step: int = 0, images_per_step: int | None = None):
        self.path = Path(run_dir) / HISTORY
        self.images_per_step = images_per_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = self._truncate(start_step) if self.path.exists() else 0
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the whole run)

    def _truncate(self, start_step: int) -> int:
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    ok = line.endswith("\n") and int(record["step"]) <= start_step
                except (ValueError, KeyError, TypeError):
                    ok = False
                if ok:
                    kept.append(line)
                else:
                    dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(kept))
        return dropped

    def write(self, step: int, metrics: dict) -> None:
        record: dict = {"step": int(step)}
        if self.images_per_step is not None:
            record["images"] = int(step) * self.images_per_step
        for key, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_history(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a run directory or the file), in step order.

    Lines cut short are skipped. A step logged again later (a file from a run that resumed without
    dropping its lines) replaces the earlier records from that step on, so a series never doubles back."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if records and step < records[-1]["step"]:
                records = [r for r in records if r["step"] < step]
            records.append(record)
    return records


class Logger:
    """Console + wandb + `<run_dir>/metrics.jsonl` (History) on the logging rank. wandb honours WANDB_MODE
    (offline, disabled) and reads WANDB_API_KEY from the environment; a resumed run continues the same
    wandb run id and the same history file (`start_step`: the step the run starts from)."""

    def __init__(self, cfg: LogConfig, *, run_dir: Path, config: dict, run_id: str | None, enabled: bool,
                 start_step: int = 0, images_per_step: int | None = None):
        self.enabled = enabled
        self.wandb = None
        self.run_id = run_id
        self.history = History(run_dir, start_step=start_step, images_per_step=images_per_step) if enabled else None
        if not (enabled and cfg.wandb) or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or Path(run_dir).name,
                                id=run_id, resume="allow", dir=str(run_dir), config=config)
        self.run_id = self.wandb.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.history is not None:
            self.history.write(step, metrics)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if _finite(v)}, step=step)

    def image(self, step: int, key: str, path: Path, caption: str = "") -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        if self.history is not None:
            self.history.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)
