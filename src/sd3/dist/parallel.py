"""Everything that wraps the model from outside: activation checkpointing, compile, DDP.

The model file knows none of this (torchtitan's `parallelize` pattern): the trainer builds a plain
MMDiT, loads weights into it, then calls `parallelize` and trains the returned module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel

from sd3.config import TrainConfig


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in the backward pass (non-reentrant: exact gradients), the
    patch-mixer's blocks included.

    The wrapper keeps state_dict keys unchanged, so checkpoints do not depend on this setting."""
    for blocks in (model.mixer, model.blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block on its own (one graph reused by every block, short compile times).

    `Module.compile` compiles in place: the module stays where it is, so parameter names and state_dict
    keys are those of the uncompiled model (wrapping it in `torch.compile(block)` would prefix every key
    with `_orig_mod.` and make the checkpoints unloadable without compile)."""
    for block in (*model.mixer, *model.blocks):
        block.compile(backend=backend)


def parallelize(model: nn.Module, cfg: TrainConfig, *, group: dist.ProcessGroup | None,
                device: torch.device) -> nn.Module:
    """Apply the configured wrappers; DDP over `group` (the model ranks) when there is more than one.

    DDP broadcasts rank 0's weights at construction, so every model rank starts identical."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model, cfg.compile_backend)
    if group is None or dist.get_world_size(group) == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        gradient_as_bucket_view=True,   # gradients live in the all-reduce buckets: one copy fewer
    )
