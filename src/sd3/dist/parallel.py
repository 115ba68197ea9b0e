"""Everything that wraps the model from outside: activation checkpointing, compile, and data
parallelism over the model ranks (DDP, or FSDP2 / HSDP sharding).

The model file knows none of this (torchtitan's `parallelize` pattern): the trainer builds a plain
MMDiT, loads weights into it, then calls `parallelize` and trains the returned module. The order is
torchtitan's: activation checkpointing, then per-block compile, then sharding (each block its own FSDP
unit, the root last), so each block's all-gather overlaps the previous block's compute.

Under `fsdp`/`hsdp` every parameter becomes a DTensor holding this rank's shard; `local`, `full_tensor`
and `shard_like` move between shards and whole tensors for the EMA, the checkpoints and the copies that
sample and validate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from sd3.config import ConfigError, TrainConfig
from sd3.dist.rankmap import RankMap

SHARDED = ("fsdp", "hsdp")
_WRAPPED = "_checkpoint_wrapped_module."


# --------------------------------------------------------------------------------------------------
# The shape of the data-parallel group
# --------------------------------------------------------------------------------------------------


def shard_groups(cfg: TrainConfig, ranks: RankMap, local_world_size: int) -> list[tuple[int, ...]]:
    """The model ranks split into the groups that shard the model among themselves (global ranks, in
    order): one group of all model ranks under `fsdp`, `hsdp_shard_size` consecutive ones (or one
    node's) under `hsdp`, none under `ddp`. Raises ConfigError, naming the fix, for a shape that does not
    fit the launched ranks; call it before anything heavy."""
    models = ranks.model_ranks
    n = len(models)
    if cfg.parallel == "ddp":
        return []
    if n < 2:
        raise ConfigError(f"train.parallel={cfg.parallel} shards the model over the model ranks, but this run has "
                          f"{n}: use --train.parallel=ddp, or launch more model ranks")
    if cfg.parallel == "fsdp":
        return [models]
    if cfg.hsdp_shard_size:
        size = cfg.hsdp_shard_size
        groups = [models[i:i + size] for i in range(0, n, size)]
        what = f"train.hsdp_shard_size={size}"
    else:
        nodes: dict[int, list[int]] = {}
        for rank in models:
            nodes.setdefault(rank // local_world_size, []).append(rank)
        groups = [tuple(g) for g in nodes.values()]
        what = f"one node's model ranks ({', '.join(str(len(g)) for g in groups)} per node)"
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or len(groups) < 2 or sizes == {1}:
        raise ConfigError(
            f"train.parallel=hsdp needs the {n} model ranks split into at least 2 equal shard groups of at least "
            f"2 ranks, but {what} gives {[len(g) for g in groups]}: set --train.hsdp_shard_size to a divisor of {n} "
            f"between 2 and {n // 2}, or use --train.parallel=fsdp (one group) or ddp")
    return [tuple(g) for g in groups]


def build_mesh(cfg: TrainConfig, groups: list[tuple[int, ...]], shard_group: dist.ProcessGroup,
               replicate_group: dist.ProcessGroup | None, device_type: str) -> DeviceMesh:
    """This model rank's mesh from process groups every rank has already created (a mesh made with
    `init_device_mesh` would span the loader ranks too): 1-D ('shard',) for fsdp, 2-D ('replicate',
    'shard') for hsdp, whose rows are the shard groups."""
    if cfg.parallel == "fsdp":
        return DeviceMesh.from_group(shard_group, device_type, mesh_dim_names=("shard",))
    return DeviceMesh.from_group([replicate_group, shard_group], device_type, mesh=torch.tensor(groups),
                                 mesh_dim_names=("replicate", "shard"))


# --------------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------------


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


def apply_fsdp(model: nn.Module, cfg: TrainConfig, mesh: DeviceMesh, *, inference: bool = False) -> None:
    """Shard every block (patch-mixer blocks too), then the root (embedders, final layer). Under bf16 the
    gathered weights are bf16 for compute and gradients are reduced in fp32; the sharded master weights
    and the optimizer state stay fp32. A model for inference only (no backward) frees every gathered
    block after its forward. Works on a model on the meta device (then `to_empty`)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.precision == "bf16" else MixedPrecisionPolicy()
    for block in (*model.mixer, *model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=inference or cfg.reshard_after_forward)
    # The root's parameters are used last in the forward and first in the backward: never resharded
    # after the forward in training (as torchtitan).
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=inference)


def parallelize(model: nn.Module, cfg: TrainConfig, *, group: dist.ProcessGroup | None,
                device: torch.device, mesh: DeviceMesh | None = None) -> nn.Module:
    """Apply the configured wrappers. DDP over `group` (the model ranks) when there is more than one: it
    broadcasts rank 0's weights at construction, so every model rank starts identical. fsdp/hsdp over
    `mesh`: the model is sharded in place and returned (every model rank built the same weights)."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model, cfg.compile_backend)
    if cfg.parallel in SHARDED:
        if mesh is None:
            raise ValueError(f"train.parallel={cfg.parallel} needs the model ranks' device mesh")
        apply_fsdp(model, cfg, mesh)
        return model
    if group is None or dist.get_world_size(group) == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        gradient_as_bucket_view=True,   # gradients live in the all-reduce buckets: one copy fewer
    )


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of `model` back to its sharded parameters. A forward without a backward (validation,
    sampling) leaves a unit that does not reshard after its forward (the root) holding whole parameters, and
    `named_parameters` then yields those, not the shards the optimizer steps."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over the model ranks in the backward passes inside, or not (the micro-batches
    before the last of an optimizer step): DDP's `no_sync`, FSDP's `set_requires_gradient_sync`."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
        return
    if enabled or not isinstance(model, DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients to `max_norm` in total; returns the total norm before clipping (a plain tensor,
    the same on every model rank). Sharded gradients: the norm of the whole gradient, not of the shard."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


# --------------------------------------------------------------------------------------------------
# Shards and whole tensors
# --------------------------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A parameter's name as the plain model has it (activation checkpointing inserts a level)."""
    return name.replace(_WRAPPED, "")


def local(t: Tensor) -> Tensor:
    """This rank's part of `t`: the shard of a DTensor (sharing its storage), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole of `t`; for a DTensor an all-gather that every rank of its mesh must join."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (the whole tensor, on every rank) cut like `like`: a DTensor with the same mesh and
    placements when `like` is one (no communication: each rank keeps its own piece), else `full`."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements,
                             src_data_rank=None)
