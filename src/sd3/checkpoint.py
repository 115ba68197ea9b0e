"""Checkpoints: one directory per saved step, written whole or not at all.

    <run_dir>/checkpoints/step_00001000/
        model.safetensors   the trained weights (fp32)
        ema.safetensors     the EMA weights (fp32): what inference uses
        config.json         the full resolved config: inference needs nothing else
        train_state.pt      optimizer state, step, RNG, run ids (plain tensors and numbers:
                            loads with torch.load(weights_only=True))

A directory is written under a temporary name and renamed when every file is on disk, so a
directory named step_* is always whole; the last `keep_last` are kept. Saving snapshots the state
to CPU on the caller's thread (fast), then writes the files on a background thread so training
goes on; `wait()` joins it (before the next save, and before exit).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sd3.config import Config, load_json, save_json

STEP_DIR = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "ema.safetensors", "config.json", "train_state.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model. The message names the path."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Whole checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(arg: str | None, run_dir: str | Path) -> Path | None:
    """`--resume auto` -> the run's latest whole checkpoint (None when it has none); a path -> that checkpoint."""
    if not arg:
        return None
    if arg == "auto":
        return latest_checkpoint(run_dir)
    path = Path(arg)
    if path.is_dir() and not (path / "config.json").exists() and latest_checkpoint(path) is not None:
        path = latest_checkpoint(path)  # a run directory: take its latest checkpoint
    check_whole(path)
    return path


def check_whole(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (give a step_* directory or a run directory)")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


def _snapshot(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies (safetensors needs contiguous, unshared tensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints of one run in the background, one at a time."""

    def __init__(self, run_dir: str | Path, keep_last: int):
        self.root = checkpoint_dir(run_dir)
        self.keep_last = keep_last
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, *, model: nn.Module, ema_state: dict[str, Tensor], cfg: Config,
             train_state: dict, blocking: bool = False) -> Path:
        self.wait()
        final = self.root / f"step_{step:08d}"
        payload = (_snapshot(model.state_dict()), _snapshot(ema_state), cfg, _to_cpu(train_state))
        self._thread = threading.Thread(target=self._write, args=(final, *payload), daemon=False,
                                        name=f"checkpoint-{step}")
        self._thread.start()
        if blocking:
            self.wait()
        return final

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint under {self.root} failed: {error}") from error

    def _write(self, final: Path, model_sd, ema_sd, cfg, train_state) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(model_sd, tmp / "model.safetensors")
            save_file(ema_sd, tmp / "ema.safetensors")
            save_json(cfg, tmp / "config.json")
            torch.save(train_state, tmp / "train_state.pt")
            for f in tmp.iterdir():  # durable before the rename makes it visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        except BaseException as error:  # reported by wait() on the training thread
            self._error = error

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root.parent)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp-*"):  # left by a run killed mid-write
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def load_train_state(path: Path, map_location="cpu") -> dict:
    return torch.load(path / "train_state.pt", map_location=map_location, weights_only=True)


def load_weights(path: Path, model: nn.Module, *, ema: bool) -> None:
    """Load `ema.safetensors` or `model.safetensors` into `model`, strictly (names and shapes)."""
    check_whole(path)
    state = load_file(path / ("ema.safetensors" if ema else "model.safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this model ({error}); was it trained with another "
                              "model config? Its config.json holds the one it needs") from error


def load_config(path: Path) -> Config:
    check_whole(path)
    return load_json(path / "config.json")
