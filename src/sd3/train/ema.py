"""Exponential moving average of the model weights (fp32, on the model's device by default)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from sd3.dist.parallel import clean_name, full_tensor, local, shard_like


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, every `every` optimizer steps.

    Keyed by the plain model's parameter names, so it survives the wrappers (DDP, activation
    checkpointing and compile keep the same parameter objects). Under fsdp/hsdp each rank keeps the EMA
    of its own shard only, beside it: no rank holds a whole copy while training. `state_dict` and
    `copy_to` make it whole (collectives every model rank joins); `load_state_dict` takes whole tensors
    and keeps this rank's part."""

    def __init__(self, model: nn.Module, *, decay: float, every: int = 1, device: str | torch.device | None = None):
        self.decay, self.every = decay, every
        named = [(clean_name(name), p) for name, p in model.named_parameters()]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [local(p).detach().to(device=device or local(p).device, dtype=torch.float32, copy=True)
                       for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Call after optimizer step `step` (1-based); updates when step is a multiple of `every`."""
        if step % self.every:
            return False
        current = [local(p).detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        return True

    def _whole(self, i: int) -> Tensor:
        p, s = self.params[i], self.shadow[i]
        if not isinstance(p, DTensor):
            return s
        shard = DTensor.from_local(s.to(local(p).device), p.device_mesh, p.placements, shape=p.shape,
                                   stride=p.stride())
        return full_tensor(shard)

    def state_dict(self, *, keep: bool = True) -> dict[str, Tensor] | None:
        """Name -> whole fp32 tensor. Under fsdp/hsdp every model rank must call it: the tensors are gathered
        into host memory one by one, and keep=False only takes part (returns None)."""
        if not any(isinstance(p, DTensor) for p in self.params):
            return dict(zip(self.names, self.shadow)) if keep else None
        state = {}
        for i, name in enumerate(self.names):
            whole = self._whole(i)
            if keep:
                state[name] = whole.cpu()
        return state if keep else None

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, p, s in zip(self.names, self.params, self.shadow):
            s.copy_(local(shard_like(state[name].reshape(p.shape), p)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None) -> None:
        """Write the EMA weights into `model`, a plain module with the same parameter names. Under
        fsdp/hsdp every model rank must call it (the weights are gathered); a rank that only takes part in
        the gathering passes None."""
        params = dict(model.named_parameters()) if model is not None else {}
        for i, name in enumerate(self.names):
            whole = self._whole(i)
            if model is not None:
                params[name].copy_(whole)
