"""Finding, verifying and loading checkpoints (the layout is in `sd3.checkpoint`).

The manifest tells whether a directory is still whole after it was written (a truncated copy, a
damaged disk): every file's size, and on a full check its CRC-32. CRC-32 runs at about 6 GB/s here,
against 0.33 GB/s for writing and fsyncing the same bytes: under 10% of a save (python zlib, measured on
this project's 2-core machine).

`--resume auto` walks back from the newest checkpoint to the newest one that verifies, saying which it
skipped and why; a checkpoint named explicitly must verify or the run stops naming the bad file.

Both layouts read the same way: `load_part` gives a part's whole tensors from either (a sharded one is
put together on one process, without a process group), so inference, evaluation and `--init_from` do
not care how a run was trained. `load_sharded` reads a sharded part straight into this rank's shards.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException

from sd3.config import Config, load_json

STEP_DIR = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "ema.safetensors", "config.json", "train_state.pt")
"""The files of a checkpoint of whole tensors (written by one rank)."""
PARTS = ("model", "ema", "optimizer")
"""The folders of a sharded checkpoint: one safetensors file per model rank in each."""
SHARDED_FILES = ("config.json", "train_state.pt")
MANIFEST = "manifest.json"
SHARDED_LAYOUT = "sharded"
"""The manifest's `layout` of a sharded checkpoint (it lists every file, shards included)."""
WEIGHTS_ONLY = "weights_only"
"""Set in the manifest of a checkpoint without optimizer state (an export for inference): it cannot resume."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the model. The message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every step_* directory of a run, oldest first (whole when written; `verify` tells if still so)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def crc32_of(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def is_sharded(path: Path) -> bool:
    """Whether `path` is a sharded checkpoint (a folder per part, one file per model rank in each)."""
    return (path / PARTS[0]).is_dir()


def verify(path: Path, *, full: bool = True) -> None:
    """Raise CheckpointError naming the first missing, truncated or damaged file of checkpoint `path`
    (a shard by its part and file name).

    Sizes are always checked against the manifest; `full` also compares every file's CRC-32. A
    checkpoint of whole tensors written before manifests existed is accepted when its files are all
    there; a sharded one always has its manifest (written last: without it the save did not finish)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (give a step_* directory or a run directory)")
    sharded = is_sharded(path)
    required = SHARDED_FILES if sharded else FILES
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if not (path / MANIFEST).is_file():
        if sharded:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {MANIFEST} (the save did not finish)")
        return  # written before manifests (every file is there)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        entries = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({error})") from error
    names = sorted(entries) if sharded else FILES
    for name in required:
        if name not in entries:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {name}")
    for name in names:
        entry = entries[name]
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {name}")
        size = (path / name).stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {size:,} bytes but was written with "
                                  f"{entry['bytes']:,} (truncated or overwritten)")
        if full and f"{crc32_of(path / name):08x}" != entry["crc32"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match the checksum it was written with "
                                  "(damaged)")
    if sharded:
        extra = sorted(str(f.relative_to(path)) for part in PARTS for f in (path / part).glob("*")
                       if str(f.relative_to(path)) not in entries)
        if extra:
            raise CheckpointError(f"checkpoint {path}: {extra[0]} is not in its {MANIFEST} (a file of another save)")


def find_checkpoint(arg: str | None, run_dir: str | Path, *, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint a run starts from (or that inference loads).

    `'auto'`: the newest checkpoint of `run_dir` that verifies (each one skipped is logged with its
    reason); None when the run has none (a fresh start); an error when it has some and none verifies
    (a fresh start would silently throw the run away). A path: a step_* directory, or a run directory
    (its newest verified checkpoint), which must verify."""
    if not arg:
        return None
    if arg == "auto":
        return _newest_verified(run_dir, log=log, required=False)
    path = Path(arg)
    if path.is_dir() and not (path / "config.json").exists() and list_checkpoints(path):
        return _newest_verified(path, log=log, required=True)
    verify(path)
    return path


def _newest_verified(run_dir: str | Path, *, log: Callable[[str], None], required: bool) -> Path | None:
    found = list_checkpoints(run_dir)
    reasons = []
    for _, path in reversed(found):
        try:
            verify(path)
        except CheckpointError as error:
            log(f"skipping checkpoint {path.name}: {error}")
            reasons.append(str(error))
            continue
        return path
    if found:
        raise CheckpointError(f"no checkpoint of {run_dir} verifies ({len(found)} found): " + "; ".join(reasons) +
                              ". Restore one, or start over in a new --run_dir")
    if required:
        raise CheckpointError(f"{run_dir} holds no checkpoint")
    return None


def resumable(path: Path) -> bool:
    """Whether checkpoint `path` (verified) can resume a run: it holds the optimizer state."""
    manifest = path / MANIFEST
    return not (manifest.is_file() and json.loads(manifest.read_text()).get(WEIGHTS_ONLY, False))


def load_train_state(path: Path, map_location="cpu") -> dict:
    try:
        return torch.load(path / "train_state.pt", map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: train_state.pt does not load ({type(error).__name__}: "
                              f"{error})") from error


def load_tensors(path: Path, name: str) -> dict[str, Tensor]:
    try:
        return load_file(path / name)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint {path}: {name} does not load ({error})") from error


def dcp_error(error: BaseException) -> str:
    """One line for an error of DCP: a CheckpointException carries each failed rank's error and traceback,
    and says the first rank's error alone here."""
    where = ""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = next(iter(error.failures.items()))
        where = f"on rank {rank} of its group, "
    lines = str(error).splitlines()
    return f"{where}{type(error).__name__}: {lines[0] if lines else ''}"


def _reader(path: Path, part: str) -> HuggingFaceStorageReader:
    if not (path / part).is_dir():
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {part}/")
    return HuggingFaceStorageReader(str(path / part))


def load_part(path: Path, part: str) -> dict[str, Tensor]:
    """Part `model`, `ema` or `optimizer` (sharded layout only) of a checkpoint as name -> whole tensor,
    on the CPU, from either layout. A sharded part is put together from every model rank's file here, on
    this process alone (DCP without a process group); only the safetensors headers and tensors are read."""
    if not is_sharded(path):
        return load_tensors(path, f"{part}.safetensors")
    try:
        reader = _reader(path, part)
        meta = reader.read_metadata().state_dict_metadata
        state = {name: torch.empty(m.size, dtype=m.properties.dtype) for name, m in meta.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # DCP's own error is a BaseException
        raise CheckpointError(f"checkpoint {path}: {part}/ does not load ({dcp_error(error)})") from error
    return state


def load_sharded(path: Path, part: str, state: dict[str, Tensor], group) -> None:
    """Read part `part` of a sharded checkpoint into `state` in place (name -> DTensor or tensor): each
    model rank reads only what its shards hold, whatever the number of ranks that wrote it (DCP reshards).
    Every rank of `group` must call it."""
    try:
        dcp.load(state, storage_reader=_reader(path, part), process_group=group)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # DCP's own error is a BaseException
        raise CheckpointError(f"checkpoint {path}: {part}/ does not load into this model ({dcp_error(error)}); was "
                              "it trained with another model config? Its config.json holds the one it needs") from error


def load_weights(path: Path, model: nn.Module, *, ema: bool) -> None:
    """Load the EMA or the trained weights of a checkpoint (either layout) into a plain `model`, strictly
    (names and shapes)."""
    verify(path, full=False)
    state = load_part(path, "ema" if ema else "model")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this model ({error}); was it trained with another "
                              "model config? Its config.json holds the one it needs") from error


def load_config(path: Path) -> Config:
    verify(path, full=False)
    return load_json(path / "config.json")
