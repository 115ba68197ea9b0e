"""RankMap: which ranks load, which ranks train, and which loader feeds which model ranks.

A loader rank reads, decodes and encodes images and captions and sends the tensors to the model ranks
it feeds; model ranks train the MMDiT together (DDP or FSDP in a group that excludes the loaders). The map is
given in the seed's format, `{loader_rank: [model_ranks]}`, or generated per node:

    RankMap.generate(world_size=32, local_world_size=8, loaders_per_node=2, models_per_loader=3)
    # node n (ranks 8n .. 8n+7): 8n -> [8n+2, 8n+3, 8n+4], 8n+1 -> [8n+5, 8n+6, 8n+7]  (the seed's map)

World size 1 is colocated: rank 0 encodes and trains in one process (the seed's issue #1, "Can it
work with 1 GPU?"). Every check runs when the map is built, before any model or encoder is loaded,
and every error names the offending rank(s) and the fix.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sd3.config import ConfigError, RankConfig


class RankMapError(ConfigError):
    """The rank map does not fit the launched world. The message names the rank(s) and the fix."""


@dataclass(frozen=True)
class RankMap:
    world_size: int
    loader_to_model: tuple[tuple[int, tuple[int, ...]], ...]
    """(loader, model ranks it feeds in map order), sorted by loader rank: a canonical form, so two
    maps that assign the same ranks compare equal however their dicts were ordered."""

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: RankConfig, *, world_size: int, local_world_size: int | None = None) -> RankMap:
        """The map for this launch: `cfg.loader_to_model` when given, else generated per node.

        world_size: processes in the job (torchrun's WORLD_SIZE); local_world_size: processes per node
        (LOCAL_WORLD_SIZE, torchrun's --nproc_per_node; defaults to world_size, one node)."""
        if cfg.loader_to_model is not None:
            return cls.from_loader_to_model(cfg.loader_to_model, world_size=world_size)
        return cls.generate(
            world_size=world_size,
            local_world_size=world_size if local_world_size is None else local_world_size,
            loaders_per_node=cfg.loaders_per_node,
            models_per_loader=cfg.models_per_loader,
        )

    @classmethod
    def from_loader_to_model(cls, mapping: Mapping[Any, Any], *, world_size: int) -> RankMap:
        """Validate a seed-format map `{loader_rank: [model_ranks]}` against the world.

        World size 1 accepts only `{0: [0]}`, the colocated map itself: any other map names ranks that
        were not launched, and silently ignoring it would hide a launch mistake."""
        _check_world_size(world_size)
        loader_map = _parse(mapping)
        shown = _show(loader_map)
        if world_size == 1:
            if loader_map != {0: (0,)}:
                raise RankMapError(
                    f"rank map: world size 1 runs colocated (rank 0 loads and trains), but "
                    f"loader_to_model={shown} names other ranks; drop --ranks.loader_to_model (or set it "
                    "to None or {0: [0]}), or launch as many processes as the map names"
                )
            return cls(world_size=1, loader_to_model=((0, (0,)),))
        problems = _problems(loader_map, world_size)
        if problems:
            where = f"(loader_to_model={shown}, world size {world_size})"
            if len(problems) == 1:
                raise RankMapError(f"rank map: {problems[0]} {where}")
            listed = "\n".join(f"  - {p}" for p in problems)
            raise RankMapError(f"rank map {where} has {len(problems)} problems:\n{listed}")
        return cls(world_size=world_size, loader_to_model=tuple(sorted(loader_map.items())))

    @classmethod
    def generate(
        cls, *, world_size: int, local_world_size: int, loaders_per_node: int, models_per_loader: int
    ) -> RankMap:
        """The seed's layout for any node count: on every node the first `loaders_per_node` ranks load
        and each feeds the next `models_per_loader` ranks. World size 1 is colocated."""
        _check_world_size(world_size)
        if world_size == 1:
            return cls(world_size=1, loader_to_model=((0, (0,)),))
        L, M, G = loaders_per_node, models_per_loader, local_world_size
        if L < 1 or M < 1:
            raise RankMapError(
                f"rank map: --ranks.loaders_per_node={L} and --ranks.models_per_loader={M} must both be "
                "at least 1 (or give the map itself with --ranks.loader_to_model)"
            )
        if G < 1 or world_size % G:
            raise RankMapError(
                f"rank map: world size {world_size} is not a whole number of nodes of {G} processes "
                f"(--nproc_per_node={G}); launch the same --nproc_per_node on every node"
            )
        if G != L * (1 + M):
            raise RankMapError(
                f"rank map: --nproc_per_node={G} does not fit --ranks.loaders_per_node={L} x "
                f"(1 + --ranks.models_per_loader={M}) = {L * (1 + M)} processes per node; "
                f"{_fits(G, L, M)}, or give the map itself with --ranks.loader_to_model"
            )
        pairs = []
        for base in range(0, world_size, G):           # one node's ranks: base .. base + G - 1
            for i in range(L):
                first = base + L + i * M
                pairs.append((base + i, tuple(range(first, first + M))))
        return cls(world_size=world_size, loader_to_model=tuple(pairs))

    # -- queries ------------------------------------------------------------------------------------

    @property
    def colocated(self) -> bool:
        """One process loads and trains (world size 1)."""
        return self.world_size == 1

    @property
    def loaders(self) -> tuple[int, ...]:
        return tuple(loader for loader, _ in self.loader_to_model)

    @property
    def model_ranks(self) -> tuple[int, ...]:
        """Sorted global ranks of the model processes: the ranks of the model group. torch sorts the ranks
        given to `dist.new_group`, so a rank's position here is its rank inside that group."""
        return tuple(sorted(m for _, models in self.loader_to_model for m in models))

    def role(self, rank: int) -> str:
        """'loader', 'model', or 'both' (colocated only)."""
        self._check_rank(rank)
        if self.colocated:
            return "both"
        return "loader" if rank in self.loaders else "model"

    def is_loader(self, rank: int) -> bool:
        return self.role(rank) in ("loader", "both")

    def is_model(self, rank: int) -> bool:
        return self.role(rank) in ("model", "both")

    def feeds(self, loader: int) -> tuple[int, ...]:
        """Model ranks this loader sends batches to, in map order."""
        for rank, models in self.loader_to_model:
            if rank == loader:
                return models
        self._check_rank(loader)
        raise RankMapError(f"rank map: rank {loader} is a model rank, not a loader (loaders: {self.loaders})")

    def loader_of(self, model_rank: int) -> int:
        """The loader that feeds this model rank."""
        for loader, models in self.loader_to_model:
            if model_rank in models:
                return loader
        self._check_rank(model_rank)
        raise RankMapError(f"rank map: rank {model_rank} is a loader, not a model rank "
                           f"(model ranks: {self.model_ranks})")

    def loader_index(self, loader: int) -> int:
        """Position of this loader among the loaders (0 .. number of loaders - 1)."""
        if loader not in self.loaders:
            self.feeds(loader)  # raises the error that names the rank
        return self.loaders.index(loader)

    def model_index(self, model_rank: int) -> int:
        """Position of this model rank among the model ranks: its rank inside the model group."""
        if model_rank not in self.model_ranks:
            self.loader_of(model_rank)  # raises the error that names the rank
        return self.model_ranks.index(model_rank)

    def describe(self) -> str:
        """A summary line, then one line per loader, for the start-of-run log."""
        if self.colocated:
            return "rank map: world size 1, colocated: rank 0 loads and trains"
        lines = [f"rank map: world size {self.world_size}, {len(self.loaders)} loaders, "
                 f"{len(self.model_ranks)} model ranks"]
        for loader, models in self.loader_to_model:
            indices = ", ".join(str(self.model_index(m)) for m in models)
            lines.append(f"  loader {loader} -> model ranks {', '.join(map(str, models))} "
                         f"(model indices {indices})")
        return "\n".join(lines)

    def to_dict(self) -> dict[int, list[int]]:
        """Seed format `{loader_rank: [model_ranks]}` (config.json; `from_loader_to_model` reads it back)."""
        return {loader: list(models) for loader, models in self.loader_to_model}

    def _check_rank(self, rank: int) -> None:
        if not (isinstance(rank, int) and 0 <= rank < self.world_size):
            raise RankMapError(f"rank map: rank {rank!r} is outside the world [0, {self.world_size})")


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_world_size(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise RankMapError(
            f"rank map: world size {world_size!r} must be a positive int (torchrun's WORLD_SIZE)"
        )


def _as_rank(value: Any, what: str, shown: Any) -> int:
    """An int rank (numpy ints welcome) or an error naming the value; bools and strings are refused."""
    if isinstance(value, bool):
        raise RankMapError(f"rank map: {what} {value!r} is a bool, not a rank (loader_to_model={shown}); "
                           "write ranks as ints, e.g. {0: [1, 2]}")
    try:
        return operator.index(value)
    except TypeError:
        raise RankMapError(
            f"rank map: {what} {value!r} is not an int (loader_to_model={shown}); write ranks as ints, "
            "e.g. --ranks.loader_to_model='{0: [1, 2]}'"
        ) from None


def _parse(mapping: Mapping[Any, Any]) -> dict[int, tuple[int, ...]]:
    """Check the shape of the map (a dict of int -> list of ints) and normalise it."""
    if not isinstance(mapping, Mapping):
        raise RankMapError(f"rank map: loader_to_model={mapping!r} is not a dict; give "
                           "{loader_rank: [model_ranks]}, e.g. --ranks.loader_to_model='{0: [1, 2]}'")
    out: dict[int, tuple[int, ...]] = {}
    for key, models in mapping.items():
        loader = _as_rank(key, "loader key", dict(mapping))
        if loader in out:  # e.g. {0: [..], np.int64(0): [..]}
            raise RankMapError(f"rank map: loader {loader} appears twice as a key "
                               f"(loader_to_model={dict(mapping)}); merge its lists")
        if isinstance(models, (str, bytes)) or not isinstance(models, (list, tuple)):
            raise RankMapError(
                f"rank map: loader {loader} maps to {models!r}, not a list of model ranks "
                f"(loader_to_model={dict(mapping)}); write e.g. {{{loader}: [{loader + 1}]}}"
            )
        out[loader] = tuple(_as_rank(m, f"model rank of loader {loader}", dict(mapping)) for m in models)
    return out


def _problems(loader_map: dict[int, tuple[int, ...]], world_size: int) -> list[str]:
    """Every way the map fails the world, each naming the rank(s) and the fix."""
    problems = []
    world = f"[0, {world_size})"
    if not loader_map:
        example = {0: list(range(1, world_size))}
        return [f"there are no loaders; give at least one, e.g. {example}, or leave "
                "--ranks.loader_to_model unset to generate the map per node"]
    fed_by: dict[int, list[int]] = {}
    for loader, models in loader_map.items():
        if not 0 <= loader < world_size:
            problems.append(f"loader rank {loader} is outside the world {world}; use ranks in {world} "
                            "or launch more processes (--nnodes x --nproc_per_node)")
        if not models:
            problems.append(f"loader {loader} feeds no model rank (idle); give it model ranks or make it a "
                            "model rank of another loader")
        seen = set()
        for m in models:
            if m in seen:
                problems.append(f"model rank {m} is listed twice for loader {loader}; list it once")
                continue
            seen.add(m)
            fed_by.setdefault(m, []).append(loader)
            if not 0 <= m < world_size:
                problems.append(f"model rank {m} (fed by loader {loader}) is outside the world {world}; use "
                                f"ranks in {world} or launch more processes (--nnodes x --nproc_per_node)")
    for m, loaders in sorted(fed_by.items()):
        if len(loaders) > 1:
            problems.append(f"model rank {m} is fed by loaders {' and '.join(map(str, loaders))}; keep it in "
                            "one loader's list")
        if m in loader_map:
            problems.append(f"rank {m} is listed as a loader and as a model rank (fed by loader "
                            f"{loaders[0]}); give every rank one role (only world size 1 is colocated)")
    assigned = set(loader_map) | set(fed_by)
    idle = [r for r in range(world_size) if r not in assigned]
    if idle:
        ranks = ("rank " if len(idle) == 1 else "ranks ") + ", ".join(map(str, idle))
        one = len(idle) == 1
        problems.append(f"{ranks} {'has' if one else 'have'} no role (neither a loader nor fed by one); "
                        f"add {'it' if one else 'them'} to a loader's list or launch "
                        f"fewer processes (--nproc_per_node x --nnodes = {world_size})")
    return problems


def _fits(G: int, L: int, M: int) -> str:
    """Suggest the settings that make a generated map fit: nproc for the current L, M, or L, M for G."""
    options = [f"--nproc_per_node={L * (1 + M)}"]
    for loaders in range(1, G // 2 + 1):  # every (L, M) with L * (1 + M) == G and M >= 1
        if G % loaders == 0:
            models = G // loaders - 1
            if loaders == L:
                options.append(f"--ranks.models_per_loader={models}")
            elif models == M:
                options.append(f"--ranks.loaders_per_node={loaders}")
            else:
                options.append(f"--ranks.loaders_per_node={loaders} --ranks.models_per_loader={models}")
    if len(options) == 1:
        return f"use {options[0]}"
    return "use " + ", or ".join(options)


def _show(loader_map: dict[int, tuple[int, ...]]) -> str:
    return "{" + ", ".join(f"{k}: {list(v)}" for k, v in loader_map.items()) + "}"
