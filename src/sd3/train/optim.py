"""AdamW with weight decay only where it belongs, and the learning-rate schedule.

The schedule is a pure function of the optimizer step (never of micro-steps, never an object with
its own counter), so resuming cannot offset it (the seed stepped it per micro-step and offset it
twice on resume)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sd3.config import TrainConfig

# Input embedders: their weights map data into the model and are not decayed (as embeddings are in
# language models); the seed decayed everything, norms and scalars included.
EMBEDDERS = ("img_in.", "txt_in.", "time_in.", "pooled_in.")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of blocks and the final layer; not norms, biases, scalars or embedders."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedder = name.startswith(EMBEDDERS)
        (decay if p.ndim >= 2 and not embedder else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW (CUDA and CPU alike): one kernel per parameter group, and it can skip a step on the
    device (`optimizer.found_inf`), which the trainer uses for non-finite gradients without a host sync."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
