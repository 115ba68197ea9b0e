"""Sharded checkpoints (fsdp/hsdp): every model rank writes its own part, and every guarantee of a checkpoint
of whole tensors still holds: verified before use (a damaged shard named), the walk-back, pruning that keeps
the newest good ones, a full disk reported with nothing half-written. And any process reads one whole.

The quick tests shard over a one-rank process group in this process; the slow one writes with two ranks in
fresh processes, with a rank whose disk fills."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from sd3.checkpoint.read import (
    CheckpointError,
    find_checkpoint,
    is_sharded,
    list_checkpoints,
    load_part,
    load_sharded,
    load_train_state,
    load_weights,
    verify,
)
from sd3.checkpoint.write import CheckpointWriter, NoSpaceError
from sd3.config import TrainConfig, preset
from sd3.dist.parallel import apply_fsdp, reshard
from sd3.model.mmdit import MMDiT
from sd3.train.ema import EMA
from sd3.train.optim import build_optimizer
from sd3.train.trainer import optimizer_state
from tests.dist_util import run_ranks
from tests.fault_util import ROOT, damage


class Sharded:
    """A tiny MMDiT sharded over the default process group, trained a step, and a writer of its checkpoints."""

    def __init__(self, run_dir: Path, keep_last: int = 5):
        self.cfg = preset("tiny")
        self.cfg.model.depth, self.cfg.model.width, self.cfg.model.heads = 2, 32, 2
        torch.manual_seed(0)
        self.model = MMDiT(self.cfg.model)
        mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu", mesh_dim_names=("shard",))
        apply_fsdp(self.model, TrainConfig(parallel="fsdp"), mesh)
        self.ema = EMA(self.model, decay=0.5)
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.writer = CheckpointWriter(run_dir, keep_last=keep_last)
        self.run_dir = run_dir

    def save(self, step: int, blocking: bool = True, change: bool = True) -> Path:
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.01 * step * change)
        self.ema.update(1)
        reshard(self.model)
        tensors, groups = optimizer_state(self.model, self.optimizer)
        return self.writer.save_sharded(
            step, parts={"model": get_model_state_dict(self.model), "ema": self.ema.sharded_state(),
                         "optimizer": tensors},
            cfg=self.cfg, train_state={"step": step, "optimizer_groups": groups}, group=dist.group.WORLD,
            writes=dist.get_rank() == 0, blocking=blocking)

    def whole(self) -> dict[str, torch.Tensor]:
        """Copies (on one rank the whole state shares the parameters' storage)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in state.items()}


@pytest.fixture
def sharded(tmp_path):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        run = Sharded(tmp_path)
        for step in (10, 20, 30):
            run.save(step)
        yield run
    finally:
        dist.destroy_process_group()


def shards(path: Path, part: str) -> list[Path]:
    return sorted((path / part).glob("*.safetensors"))


def test_a_sharded_checkpoint_is_whole_verified_and_reads_like_any_other(sharded):
    path = list_checkpoints(sharded.run_dir)[-1][1]
    assert is_sharded(path) and [s for s, _ in list_checkpoints(sharded.run_dir)] == [10, 20, 30]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and {"config.json", "train_state.pt"} <= set(manifest["files"])
    assert all(f"{part}/{s.name}" in manifest["files"] for part in ("model", "ema", "optimizer")
               for s in shards(path, part))
    verify(path)
    whole = sharded.whole()
    model = load_part(path, "model")
    assert model.keys() == whole.keys() and all(torch.equal(model[k], whole[k]) for k in whole)
    plain = MMDiT(sharded.cfg.model)                      # what inference does: no process group needed
    load_weights(path, plain, ema=True)
    ema = load_part(path, "ema")
    assert all(torch.equal(p, ema[n]) for n, p in plain.state_dict().items())
    assert any("exp_avg" in k for k in load_part(path, "optimizer"))
    assert not [p for p in (sharded.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("part, how, message", [
    ("ema", "flip", r"ema/shard-00001-\S+\.safetensors does not match the checksum it was written with"),
    ("model", "truncate", r"model/shard-00001-\S+\.safetensors is [\d,]+ bytes but was written with"),
    ("optimizer", "delete", r"incomplete: missing optimizer/shard-00001-\S+\.safetensors"),
])
def test_a_damaged_shard_is_named_and_resume_walks_back_past_it(sharded, part, how, message):
    found = list_checkpoints(sharded.run_dir)
    damage(shards(found[-1][1], part)[0], how)
    said = []
    assert find_checkpoint("auto", sharded.run_dir, log=said.append) == found[-2][1]
    assert len(said) == 1 and "skipping checkpoint step_00000030" in said[0]
    assert re.search(message, said[0]), said
    with pytest.raises(CheckpointError, match=message):
        find_checkpoint(str(found[-1][1]), sharded.run_dir)


def test_a_sharded_checkpoint_without_its_manifest_or_with_a_stray_shard_does_not_verify(sharded):
    found = list_checkpoints(sharded.run_dir)
    (found[-1][1] / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing manifest\.json \(the save did not finish\)"):
        verify(found[-1][1])
    shutil.copy(shards(found[-2][1], "ema")[0], found[-2][1] / "ema" / "shard-00002-model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=r"ema/shard-00002-\S+ is not in its manifest\.json"):
        verify(found[-2][1])


def test_a_sharded_checkpoint_that_does_not_fit_the_model_is_refused_in_one_line(sharded):
    path = list_checkpoints(sharded.run_dir)[-1][1]
    with pytest.raises(CheckpointError) as refused:
        load_sharded(path, "model", {"img_in.weight": torch.zeros(3, 3)}, dist.group.WORLD)
    text = str(refused.value)
    assert "model/ does not load into this model" in text and "Size mismatch" in text and "img_in.weight" in text
    assert "\n" not in text and "another model config" in text


def test_pruning_keeps_the_newest_verified_sharded_checkpoints(sharded):
    sharded.writer.keep_last = 2
    damage(shards(list_checkpoints(sharded.run_dir)[-1][1], "model")[0], "truncate")
    sharded.save(40)
    assert [s for s, _ in list_checkpoints(sharded.run_dir)] == [20, 30, 40]   # 30 is damaged: 20 stays
    sharded.save(50)
    assert [s for s, _ in list_checkpoints(sharded.run_dir)] == [40, 50]


def test_a_background_save_writes_what_the_weights_were_when_it_was_asked(sharded):
    """The parts are copied to host memory before save_sharded returns: training changing the weights at once
    changes nothing in the checkpoint."""
    before = sharded.whole()
    ema_before = sharded.ema.state_dict()
    path = sharded.save(40, blocking=False, change=False)
    with torch.no_grad():
        for p in sharded.model.parameters():
            p.mul_(0.0)                                              # the next "step", while it writes
    sharded.writer.wait()
    verify(path)
    saved = load_part(path, "model")
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in before)
    assert any(v.abs().sum() > 0 for v in saved.values())
    assert load_part(path, "ema").keys() == ema_before.keys()


def test_a_failed_background_save_is_reported_by_wait_and_leaves_nothing(sharded, monkeypatch):
    root = sharded.run_dir / "checkpoints"
    before = sorted(p.name for p in root.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    sharded.save(40, blocking=False)
    for _ in range(200):
        if sharded.writer.failed():
            break
        threading.Event().wait(0.02)
    assert sharded.writer.failed()
    with pytest.raises(NoSpaceError, match=r"not enough disk space for checkpoint step_00000040"):
        sharded.writer.wait()
    assert sorted(p.name for p in root.iterdir()) == before


def test_a_full_disk_stops_a_sharded_save_with_nothing_half_written(sharded, monkeypatch):
    root = sharded.run_dir / "checkpoints"
    before = sorted(p.name for p in root.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(NoSpaceError, match=r"not enough disk space for checkpoint step_00000040 .* MiB are free"):
        sharded.save(40)
    assert sorted(p.name for p in root.iterdir()) == before


# -- two ranks, in fresh processes ---------------------------------------------------------------------------


def _two_ranks(rank: int, world: int, run_dir: str) -> dict:
    """Save at 10 and 20, then at 30 with rank 1's disk full while it writes its shards."""
    import torch.distributed.checkpoint.filesystem as fs

    run = Sharded(Path(run_dir))
    out = {}
    for step in (10, 20):
        run.save(step)
    whole, ema = run.whole(), run.ema.state_dict()   # collectives: every rank
    out["whole"] = safetensors.torch.save(whole) if rank == 0 else b""  # bytes: no tensors through a queue
    out["ema"] = safetensors.torch.save(ema)
    if rank == 1:
        def full(self, path, mode):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        fs.FileSystem.create_stream = full
    try:
        run.save(30)
        out["error"] = None
    except Exception as error:
        out["error"] = f"{type(error).__name__}: {error}"
    return out


@pytest.mark.slow
def test_two_ranks_write_their_shards_and_a_full_disk_on_one_stops_both(tmp_path):
    results = run_ranks(_two_ranks, 2, str(tmp_path), timeout=120)
    assert all(status == "ok" for status, _ in results.values()), results
    (_, r0), (_, r1) = results[0], results[1]
    for r in (r0, r1):
        assert r["error"] and r["error"].startswith("NoSpaceError") and "step_00000030" in r["error"], r["error"]
    found = list_checkpoints(tmp_path)
    assert [s for s, _ in found] == [10, 20]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    path = found[-1][1]
    verify(path)
    assert len(shards(path, "model")) == 2                    # one per rank
    model, ema = load_part(path, "model"), load_part(path, "ema")
    for got, want in ((model, safetensors.torch.load(r0["whole"])), (ema, safetensors.torch.load(r0["ema"]))):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- export: one checkpoint of whole tensors -----------------------------------------------------------------


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src" / "export_checkpoint.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_export_writes_a_checkpoint_of_whole_tensors_that_resumes_under_ddp(sharded, tmp_path, tiny_args):
    ckpt = list_checkpoints(sharded.run_dir)[-1][1]
    done = export("--ckpt", str(sharded.run_dir), "--out", str(tmp_path / "whole"))
    assert done.returncode == 0 and f"of {ckpt}" in done.stdout.replace("\n", ""), done.stderr
    out = tmp_path / "whole"
    verify(out)
    assert not is_sharded(out)
    for part in ("model", "ema"):
        got, want = load_part(out, part), load_part(ckpt, part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The optimizer state, keyed by parameter index as a ddp run saves it, loads into a plain optimizer.
    plain = MMDiT(sharded.cfg.model)
    optimizer = build_optimizer(plain, sharded.cfg.train)
    optimizer.load_state_dict(load_train_state(out)["optimizer"])
    flat = load_part(ckpt, "optimizer")
    for name, p in plain.named_parameters():
        assert torch.equal(optimizer.state[p]["exp_avg"], flat[f"state.{name}.exp_avg"]), name
    assert load_train_state(out)["step"] == 30

    done = export("--ckpt", str(ckpt), "--out", str(tmp_path / "light"), "--weights-only")
    assert done.returncode == 0, done.stderr
    verify(tmp_path / "light")
    assert "optimizer" not in load_train_state(tmp_path / "light")
    assert (tmp_path / "light" / "model.safetensors").stat().st_size == (out / "model.safetensors").stat().st_size
    run = subprocess.run([sys.executable, "src/train.py", *tiny_args(None, "--resume", str(tmp_path / "light"))],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "holds weights only (exported with --weights-only): start a new run from it " \
        "with --init_from" in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("case, message", [
    ("exists", r"--out \S+ exists; give a new directory"),
    ("whole", r"already holds whole tensors: infer\.py, evaluate\.py, --init_from and --resume read it as it is"),
])
def test_export_refuses_in_one_line(sharded, tmp_path, case, message):
    ckpt = list_checkpoints(sharded.run_dir)[-1][1]
    out = tmp_path / "out"
    out.mkdir()
    if case == "whole":
        done = export("--ckpt", str(ckpt), "--out", str(tmp_path / "a"), "--weights-only")
        assert done.returncode == 0, done.stderr
        ckpt, out = tmp_path / "a", tmp_path / "b"
    done = export("--ckpt", str(ckpt), "--out", str(out))
    assert done.returncode == 2 and re.search(message, done.stderr) and done.stderr.count("\n") == 1, done.stderr


def test_the_temporaries_of_a_killed_sharded_save_are_removed_by_the_next(sharded):
    """A job killed mid-save leaves a hidden folder of shards; the previous checkpoints are untouched and the
    next save removes it."""
    root = sharded.run_dir / "checkpoints"
    stale = root / ".step_00000040.tmp-999999-deadbeef"            # a pid that is not running
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    assert find_checkpoint("auto", sharded.run_dir) == root / "step_00000030"
    sharded.save(40)
    assert not stale.exists() and [s for s, _ in list_checkpoints(sharded.run_dir)] == [10, 20, 30, 40]
