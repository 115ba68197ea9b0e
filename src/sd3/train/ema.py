"""Exponential moving average of the model weights (fp32, on the model's device by default)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, every `every` optimizer steps.

    Keyed by the raw model's parameter names, so it survives wrappers applied later (DDP,
    activation checkpointing, compile keep the same parameter objects)."""

    def __init__(self, model: nn.Module, *, decay: float, every: int = 1, device: str | torch.device | None = None):
        self.decay, self.every = decay, every
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Call after optimizer step `step` (1-based); updates when step is a multiple of `every`."""
        if step % self.every:
            return False
        current = [p.detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        return True

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, s in zip(self.names, self.shadow):
            s.copy_(state[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model` (a module with the same parameter names)."""
        params = dict(model.named_parameters())
        for name, s in zip(self.names, self.shadow):
            params[name].copy_(s)
