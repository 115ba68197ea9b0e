"""Writing checkpoints (the layout is in `sd3.checkpoint`).

A directory is written under a hidden temporary name, fsynced and renamed when every file is on disk
(`sd3.atomic`), so a directory named step_* is whole when it appears. The writer removes temporaries of
killed runs before it saves, checks the free space first, and a save that fails for lack of space says
so and leaves no partial files. The last `keep_last` verified checkpoints are kept, so the newest good
one is never pruned.

Whole tensors (`save`, ddp): the state is snapshotted to CPU on the caller's thread (fast), then one rank
writes the files on a background thread so training goes on; `wait()` joins it and re-raises its error,
`failed()` polls it.

Shards (`save_sharded`, fsdp/hsdp): every model rank writes its own part of the weights, EMA and optimizer
state, in parallel, through torch.distributed.checkpoint (DCP) with its safetensors storage: one file per
rank and part, tensors and their offsets only (DCP's default format pickles its metadata; this one has
none to pickle). The step's hyperparameters and counters go in train_state.pt as with whole tensors. The
first model rank makes the temporary folder, checks the space for all, writes the manifest of every file
last and renames the folder, so the same guarantees hold.
"""

from __future__ import annotations

import errno
import json
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor

from sd3.atomic import TMP_MARK, atomic_path, atomic_write_text, publish, remove, stale_temporaries, temporary_sibling
from sd3.checkpoint.read import (
    FILES,
    MANIFEST,
    PARTS,
    SHARDED_FILES,
    SHARDED_LAYOUT,
    WEIGHTS_ONLY,
    CheckpointError,
    checkpoint_dir,
    crc32_of,
    dcp_error,
    list_checkpoints,
    verify,
)
from sd3.config import Config, save_json

_SLACK_BYTES = 1 << 20  # JSON, pickle framing and filesystem metadata on top of the tensors


class NoSpaceError(CheckpointError):
    """A save failed for lack of disk space (its partial files are removed)."""


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


def _tensor_bytes(obj) -> int:
    if isinstance(obj, DTensor):
        obj = obj.to_local()
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded")
"""How an I/O error reads when it arrives only as text (safetensors reports its Rust I/O errors in a
SafetensorError: "... I/O error: No space left on device (os error 28) ...")."""


def _is_no_space(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if not isinstance(error, OSError) and any(text in str(error).lower() for text in _NO_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


class CheckpointWriter:
    """Writes checkpoints of one run in the background, one at a time."""

    def __init__(self, run_dir: str | Path, keep_last: int):
        self.root = checkpoint_dir(run_dir)
        self.keep_last = keep_last
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stager: DefaultStager | None = None

    def save(self, step: int, *, model_state: dict[str, Tensor], ema_state: dict[str, Tensor], cfg: Config,
             train_state: dict, blocking: bool = False) -> Path:
        """Checkpoint `step`: the weights and EMA (name -> whole tensor), the config and the train state.
        Returns the directory it will have once written (at once with blocking=True)."""
        self.wait()
        final = self.root / f"step_{step:08d}"
        payload = (_snapshot(model_state), _snapshot(ema_state), cfg, _to_cpu(train_state))
        self._thread = threading.Thread(target=self._write, args=(final, *payload), daemon=False,
                                        name=f"checkpoint-{step}")
        self._thread.start()
        if blocking:
            self.wait()
        return final

    def save_sharded(self, step: int, *, parts: dict[str, dict[str, Tensor]], cfg: Config, train_state: dict,
                     group: dist.ProcessGroup, writes: bool, blocking: bool = False) -> Path:
        """Checkpoint `step` in shards: every rank of `group` (the model ranks, a gloo group used for nothing
        else) calls it with its `parts` (`model`, `ema`, `optimizer`: name -> DTensor, or a tensor every
        rank holds alike) and writes its own share; the rank with `writes` (the first) also writes `cfg`,
        `train_state` and the manifest, and publishes the folder. When the checkpoint is not whole, every
        rank gets the error (the previous checkpoints stay as they were).

        In the background unless `blocking`: the parts are first copied to host memory (DCP's stager, its
        buffers reused from save to save), so training may change the weights at once; `wait()` joins the
        write and raises its error, `failed()` polls it. Returns the directory it will have once written."""
        self.wait()
        final = self.root / f"step_{step:08d}"
        if blocking:
            self._write_sharded(final, parts, cfg, train_state, group, writes)
            return final
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        staged = self._stager.stage(dict(parts))
        self._thread = threading.Thread(target=self._write_sharded_in_background,
                                        args=(final, staged, cfg, _to_cpu(train_state), group, writes),
                                        daemon=False, name=f"checkpoint-{step}")
        self._thread.start()
        return final

    def _write_sharded_in_background(self, *args) -> None:
        try:
            self._write_sharded(*args)
        except BaseException as error:  # reported by wait() on the training thread
            self._error = error

    def _write_sharded(self, final: Path, parts: dict, cfg: Config, train_state: dict, group: dist.ProcessGroup,
                       writes: bool) -> None:
        first = dist.get_global_rank(group, 0)
        need = torch.tensor([sum(_tensor_bytes(state) for state in parts.values())], dtype=torch.int64)
        dist.all_reduce(need, group=group)  # on gloo; every part's bytes once, replicas and all (an upper bound)
        need = int(need) + _tensor_bytes(train_state) + _SLACK_BYTES
        answer: list = [None]
        if writes:
            answer[0] = self._prepare(final, need)
        dist.broadcast_object_list(answer, src=first, group=group)
        if isinstance(answer[0], BaseException):
            raise answer[0]
        tmp = Path(answer[0])
        failure = None
        try:
            for part in PARTS:
                dcp.save(parts[part], storage_writer=HuggingFaceStorageWriter(str(tmp / part), save_distributed=True),
                         process_group=group)
            files = sorted(str(f.relative_to(tmp)) for part in PARTS for f in (tmp / part).iterdir())
            index, count = dist.get_rank(group), dist.get_world_size(group)
            mine = {name: _entry(tmp / name) for name in files[index::count]}  # the checksums, shared out
        except (Exception, CheckpointException) as error:  # DCP's error (a BaseException) is raised on every rank
            failure, mine = error, {}
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (dist.get_rank(), mine, None if failure is None else dcp_error(failure)),
                               group=group)
        answer = [None]
        if writes:
            answer[0] = self._publish_sharded(tmp, final, need, cfg, train_state, gathered, failure)
        dist.broadcast_object_list(answer, src=first, group=group)
        if isinstance(answer[0], BaseException):
            raise answer[0]

    def _prepare(self, final: Path, need: int) -> str | BaseException:
        """The writing rank's half before a sharded save: the temporary folder's path, or why not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_up()
            free = shutil.disk_usage(self.root).free
            if free < need:
                return NoSpaceError(self._no_space(final, need, free))
            tmp = temporary_sibling(final)
            tmp.mkdir()
            return str(tmp)
        except Exception as error:
            return CheckpointError(f"cannot write checkpoint {final.name} under {self.root}: {type(error).__name__}: "
                                   f"{error}")

    def _publish_sharded(self, tmp: Path, final: Path, need: int, cfg: Config, train_state: dict,
                         gathered: list, failure: BaseException | None) -> BaseException | None:
        """The writing rank's half after every rank wrote its shards: the files of one rank, the manifest
        last, the rename, pruning. Returns None, or the error every rank raises (the folder removed)."""
        try:
            errors = [(rank, text) for rank, _, text in gathered if text]
            if errors:
                rank, text = errors[0]
                raise CheckpointError(f"model rank {rank} could not write its shards of {final.name}: {text}") \
                    from failure
            save_json(cfg, tmp / "config.json")
            torch.save(_to_cpu(train_state), tmp / "train_state.pt")
            files = {name: _entry(tmp / name) for name in SHARDED_FILES}
            for _, mine, _ in gathered:
                files.update(mine)
            manifest = {"format": 2, "layout": SHARDED_LAYOUT, "files": dict(sorted(files.items()))}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            publish(tmp, final)
            self._prune()
            return None
        except Exception as error:
            remove(tmp)
            free = shutil.disk_usage(self.root).free
            if _is_no_space(error) or free < need:
                return NoSpaceError(self._no_space(final, need, free, refused=_is_no_space(error)))
            if isinstance(error, CheckpointError):
                return error
            return CheckpointError(f"writing checkpoint {final.name} under {self.root} failed: "
                                   f"{type(error).__name__}: {error}")

    def failed(self) -> bool:
        """Whether the last background save has ended in an error (`wait` raises it)."""
        return self._error is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"writing a checkpoint under {self.root} failed: {type(error).__name__}: "
                                  f"{error}") from error

    def _write(self, final: Path, model_sd, ema_sd, cfg, train_state) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_up()
            need = _tensor_bytes(model_sd) + _tensor_bytes(ema_sd) + _tensor_bytes(train_state) + _SLACK_BYTES
            free = shutil.disk_usage(self.root).free
            if free < need:
                raise NoSpaceError(self._no_space(final, need, free))
            try:
                with atomic_path(final, folder=True) as tmp:
                    write_whole(tmp, model_sd, ema_sd, cfg, train_state)
            except Exception as error:
                free = shutil.disk_usage(self.root).free
                # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
                if _is_no_space(error) or free < need:
                    raise NoSpaceError(self._no_space(final, need, free, refused=_is_no_space(error))) from error
                raise
            self._prune()
        except BaseException as error:  # reported by wait() on the training thread
            self._error = error

    def _no_space(self, final: Path, need: int, free: int, refused: bool = False) -> str:
        after = ("nothing partial was left behind and the previous checkpoints are intact. Free space (or lower "
                 "--log.keep_last), then rerun with --resume auto")
        if refused and free >= need:  # bytes are left, yet the filesystem said ENOSPC/EDQUOT: files or a quota
            return (f"no space for checkpoint {final.name} under {self.root}: the filesystem refused to write "
                    f"(no space left or quota exceeded) although {free / 2**20:,.1f} MiB are free and it needs "
                    f"{need / 2**20:,.1f} MiB: out of inodes or over a quota (check df -i and your quota); "
                    + after)
        return (f"not enough disk space for checkpoint {final.name} under {self.root}: it needs "
                f"{need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free; " + after)

    def _clean_up(self) -> None:
        """Before a save: put back a checkpoint left moved aside by a killed re-save, and remove the
        temporaries of killed writers (which would otherwise keep the disk full)."""
        for aside in self.root.glob(f".step_*.old{TMP_MARK}*"):
            final = self.root / aside.name[1:].split(".old")[0]
            if not final.exists():
                aside.rename(final)
        for stale in stale_temporaries(self.root, "step_"):
            remove(stale)

    def _prune(self) -> None:
        """Keep the newest `keep_last` checkpoints that verify (sizes); remove everything older."""
        found = list_checkpoints(self.root.parent)
        kept = []
        for step, path in reversed(found):
            try:
                verify(path, full=False)
            except CheckpointError:
                continue
            kept.append(step)
            if len(kept) == self.keep_last:
                break
        if len(kept) < self.keep_last:
            return
        for step, path in found:
            if step < kept[-1]:
                remove(path)


def write_whole(folder: Path, model_state: dict[str, Tensor], ema_state: dict[str, Tensor], cfg: Config,
                train_state: dict) -> None:
    """The files of a checkpoint of whole tensors, into an existing (temporary) folder, the manifest last
    (it says when the train state holds no optimizer: such a checkpoint cannot resume a run)."""
    save_file(model_state, folder / "model.safetensors")
    save_file(ema_state, folder / "ema.safetensors")
    save_json(cfg, folder / "config.json")
    torch.save(train_state, folder / "train_state.pt")
    files = {name: _entry(folder / name) for name in FILES}
    manifest = {"format": 1, "files": files} | ({} if "optimizer" in train_state else {WEIGHTS_ONLY: True})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _entry(path: Path) -> dict:
    """A file's manifest entry: its size and CRC-32."""
    return {"bytes": path.stat().st_size, "crc32": f"{crc32_of(path):08x}"}


def write_marker(run_dir: str | Path, name: str, text: str) -> Path:
    """A one-line marker file in the run directory (PREEMPTED, FAILED), written atomically."""
    path = Path(run_dir) / name
    atomic_write_text(path, text.rstrip("\n") + "\n")
    return path
