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

    def _sharded(self, i: int) -> Tensor:
        """Entry `i` as a DTensor cut like its parameter (sharing the shadow's storage when the EMA lives on
        the model's device), or the shadow itself."""
        p, s = self.params[i], self.shadow[i]
        if not isinstance(p, DTensor):
            return s
        return DTensor.from_local(s.to(local(p).device), p.device_mesh, p.placements, shape=p.shape,
                                  stride=p.stride(), run_check=False)

    def _whole(self, i: int) -> Tensor:
        return full_tensor(self._sharded(i))

    def sharded_state(self) -> dict[str, Tensor]:
        """Name -> this rank's part as a DTensor: what a sharded checkpoint saves, and what
        `load_sharded_state` takes back after the checkpoint was read into it."""
        return {name: self._sharded(i) for i, name in enumerate(self.names)}

    @torch.no_grad()
    def load_sharded_state(self, state: dict[str, Tensor]) -> None:
        for name, s in zip(self.names, self.shadow):
            s.copy_(local(state[name]))

    def state_dict(self) -> dict[str, Tensor]:
        """Name -> whole fp32 tensor. Under fsdp/hsdp every model rank must call it (the tensors are gathered)."""
        return {name: self._whole(i) for i, name in enumerate(self.names)}

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
