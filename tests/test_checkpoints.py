"""Checkpoints that survive what disks and killed jobs do: verification, walking back, full disks,
re-saves and pruning that never lose the newest good checkpoint."""

from __future__ import annotations

import errno
import os
import re
import shutil

import pytest
import torch

import sd3.checkpoint.write as checkpoint_write
from sd3.checkpoint.read import CheckpointError, find_checkpoint, list_checkpoints, load_weights, verify
from sd3.checkpoint.write import CheckpointWriter, NoSpaceError
from sd3.config import preset
from sd3.model.mmdit import MMDiT
from sd3.train.ema import EMA
from sd3.train.optim import build_optimizer
from tests.fault_util import damage


@pytest.fixture
def run(tmp_path, small_model_cfg):
    """A run directory with checkpoints at steps 10, 20 and 30, and a function that saves more."""
    cfg = preset("tiny")
    cfg.model = small_model_cfg
    model = MMDiT(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    writer = CheckpointWriter(tmp_path, keep_last=5)

    def save(step, blocking=True):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return writer.save(step, model_state=model.state_dict(), ema_state=EMA(model, decay=0.5).state_dict(), cfg=cfg,
                           train_state={"step": step, "optimizer": optimizer.state_dict(), "wandb_id": ""},
                           blocking=blocking)

    for step in (10, 20, 30):
        save(step)
    return tmp_path, writer, save, model


@pytest.mark.parametrize("name, how, message", [
    ("model.safetensors", "truncate", r"model\.safetensors is [\d,]+ bytes but was written with"),
    ("ema.safetensors", "flip", r"ema\.safetensors does not match the checksum"),
    ("train_state.pt", "delete", r"missing train_state\.pt"),
])
def test_resume_auto_walks_back_to_the_newest_checkpoint_that_verifies(run, name, how, message):
    run_dir, _, _, _ = run
    newest = list_checkpoints(run_dir)[-1][1]
    damage(newest / name, how)
    said = []
    assert find_checkpoint("auto", run_dir, log=said.append) == list_checkpoints(run_dir)[-2][1]
    assert len(said) == 1 and "skipping checkpoint step_00000030" in said[0]
    assert re.search(message, said[0])
    with pytest.raises(CheckpointError, match=message):  # named explicitly, it must verify
        find_checkpoint(str(newest), run_dir)
    assert newest.exists()                                # nothing is deleted on the way


def test_no_verified_checkpoint_is_an_error_not_a_fresh_start(run):
    run_dir, _, _, _ = run
    for _, path in list_checkpoints(run_dir):
        damage(path / "model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* verifies \(3 found\)"):
        find_checkpoint("auto", run_dir, log=lambda _: None)
    assert find_checkpoint("auto", run_dir / "fresh") is None


def test_loading_a_damaged_file_names_it(run):
    run_dir, _, _, model = run
    path = list_checkpoints(run_dir)[-1][1]
    (path / "manifest.json").unlink()         # as a checkpoint from before manifests: sizes unknown
    damage(path / "model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match=r"step_00000030: model\.safetensors does not load"):
        load_weights(path, model, ema=False)


def test_stale_temporaries_of_killed_writers_are_removed_before_a_save(run):
    run_dir, _, save, _ = run
    root = run_dir / "checkpoints"
    stale = root / ".step_00000040.tmp-999999-deadbeef"  # a pid that is not running
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    save(40)
    assert not stale.exists() and [s for s, _ in list_checkpoints(run_dir)] == [10, 20, 30, 40]


def test_a_resave_keeps_the_old_checkpoint_until_the_new_one_is_whole(run, monkeypatch):
    run_dir, writer, save, _ = run
    before = (list_checkpoints(run_dir)[-1][1] / "model.safetensors").read_bytes()
    failing = lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))  # noqa: E731
    monkeypatch.setattr(checkpoint_write, "save_json", failing)
    save(30, blocking=False)
    with pytest.raises(CheckpointError, match="I/O error"):
        writer.wait()
    path = list_checkpoints(run_dir)[-1][1]
    assert path.name == "step_00000030" and (path / "model.safetensors").read_bytes() == before
    verify(path)
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_checkpoint_moved_aside_by_a_killed_resave_is_put_back(run):
    run_dir, _, save, _ = run
    root = run_dir / "checkpoints"
    os.replace(root / "step_00000030", root / ".step_00000030.old.tmp-999999-cafe0000")
    save(40)
    assert [s for s, _ in list_checkpoints(run_dir)] == [10, 20, 30, 40]


@pytest.mark.parametrize("how", ["disk_usage", "ENOSPC", "safetensors"])
def test_a_full_disk_says_so_and_leaves_nothing_partial(run, monkeypatch, how):
    run_dir, writer, save, _ = run
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    if how == "disk_usage":   # the check before writing
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    elif how == "safetensors":  # safetensors' own temporary file refused: its error carries the I/O error as text
        from safetensors import SafetensorError

        def refused(tensors, path, *a, **k):
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at "
                                  f"path \"{path}.tmp\"")

        monkeypatch.setattr(checkpoint_write, "save_file", refused)
    else:                     # the disk fills while writing (torch.save hides ENOSPC in its zip writer)
        def full(obj, path, *a, **k):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from OSError(
                errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", full)
    save(40, blocking=False)
    # The check before writing compares bytes; a refusal while this disk still has the bytes free is an
    # inode or quota limit, and says so rather than "needs 6 MiB, 50 MiB are free".
    message = (r"not enough disk space for checkpoint step_00000040 .* MiB are free" if how == "disk_usage" else
               r"no space for checkpoint step_00000040 .* refused to write .* out of inodes or over a quota")
    with pytest.raises(NoSpaceError, match=message):
        writer.wait()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    for _, path in list_checkpoints(run_dir):
        verify(path)


def test_pruning_keeps_the_newest_verified_checkpoints(run):
    """keep_last=2 with the newest-but-one damaged after it was written: the two newest that verify
    (50 and 30) stay, and so does the damaged 40 between them; only what is older than both goes."""
    run_dir, writer, save, _ = run
    writer.keep_last = 2
    save(40)
    assert [s for s, _ in list_checkpoints(run_dir)] == [30, 40]
    damage(list_checkpoints(run_dir)[-1][1] / "model.safetensors", "truncate")
    save(50)
    assert [s for s, _ in list_checkpoints(run_dir)] == [30, 40, 50]
    verify(list_checkpoints(run_dir)[0][1])
    save(60)
    assert [s for s, _ in list_checkpoints(run_dir)] == [50, 60]
