"""The disaggregated runtime with real processes: torchrun on gloo, loaders feeding DDP model ranks.

Every test starts real `torchrun` processes and puts a hard timeout around them."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd3.checkpoint.read import list_checkpoints
from tests.dist_util import free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
pytestmark = pytest.mark.slow


def launch(args: list[str], *, nproc: int = 3, env: dict | None = None, extra_torchrun=(), **kw):
    cmd = [*TORCHRUN, *(extra_torchrun or ["--standalone"]), f"--nproc_per_node={nproc}", "src/train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def run(args, **kw) -> tuple[int, str]:
    timeout = kw.pop("timeout", 240)
    return finish(launch(args, **kw), timeout)


def weights(run_dir: Path, name="model.safetensors") -> dict:
    return load_file(list_checkpoints(run_dir)[-1][1] / name)


def test_loader_feeds_two_model_ranks_and_resume_is_the_same_run(tiny_args, tmp_path):
    """1 loader + 2 DDP model ranks. 4 straight steps == 2 steps, then --resume auto for 2 more. In bf16
    (CPU autocast, bf16 encoders: what a GPU run does); the demo and the single-process resume tests run fp32."""
    common = ["--train.accumulation_steps=2", "--train.ema_every=1", "--train.activation_checkpointing=true",
              "--train.precision=bf16", "--encoders.dtype=bfloat16"]
    rc, out = run(tiny_args(tmp_path / "straight", "--steps", "4", *common))
    assert rc == 0, out[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", out, flags=re.M)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert "loader 0 -> model ranks 1, 2 (model indices 0, 1)" in out
    assert "4 x 2 x 2 samples per optimizer step" in out          # batch per rank x model ranks x accumulation
    assert "data wait" in out and "MB/step" in out
    rc, out = run(tiny_args(tmp_path / "split", "--steps", "2", *common))
    assert rc == 0, out[-3000:]
    rc, out = run(tiny_args(tmp_path / "split", "--steps", "4", "--resume", "auto", *common))
    assert rc == 0, out[-3000:]
    assert "resuming from" in out
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(tmp_path / "straight", name), weights(tmp_path / "split", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> str:
    """Read the output until `text` appears (the process keeps running)."""
    seen, start = [], time.time()
    while time.time() - start < timeout:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


def workers_of(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "SIGUSR1 to one model rank"])
def test_a_signal_stops_every_rank_with_a_whole_checkpoint(tiny_args, tmp_path, how):
    """SLURM's SIGTERM reaches torchrun (which forwards it); the USR1 warning may reach one worker
    first: either way every rank stops at a step boundary, the first model rank checkpoints, all exit,
    and --resume auto continues from there."""
    run_dir = tmp_path / "run"
    proc = launch(tiny_args(run_dir, "--steps", "400", "--log.save_every=1000"))
    early = wait_for(proc, "step 3/400")
    if how.startswith("SIGTERM"):
        os.kill(proc.pid, signal.SIGTERM)
    else:
        model_rank = sorted(workers_of(proc))[1]     # torchrun starts ranks 0, 1, 2 in order
        os.kill(model_rank, signal.SIGUSR1)
    rc, out = finish(proc, timeout=120)
    out = early + out
    assert "stopping at step" in out, out[-3000:]
    # torchrun reports a SIGTERM as failure even when every worker stopped cleanly (elastic counts the signal).
    assert rc == (1 if how.startswith("SIGTERM") else 0), out[-3000:]
    (step, ckpt), = list_checkpoints(run_dir)
    assert 3 <= step < 400
    assert (run_dir / "PREEMPTED").read_text().startswith(f"stopped at step {step} of 400")
    rc, out = run(tiny_args(run_dir, "--steps", str(step + 2), "--resume", "auto"))
    assert rc == 0 and f"resuming from {ckpt} (step {step})" in out, out[-3000:]
    assert list_checkpoints(run_dir)[-1][0] == step + 2


def test_a_loader_that_cannot_start_stops_its_model_ranks_with_its_message(tiny_args, tmp_path):
    start = time.time()
    rc, out = run(tiny_args(None, "--steps", "5", "--encoders.text=('nowhere/gemma', 'nowhere/bert')",
                            "--encoders.create_tiny=false",
                            "--ranks.timeout_s=60"), timeout=120)
    assert rc != 0
    assert "loader rank 0 failed: ConfigError: encoders.text[0]='nowhere/gemma'" in out, out[-3000:]
    assert time.time() - start < 100


def test_a_loader_failing_mid_run_stops_its_model_ranks(tiny_args, tmp_path):
    """An exception inside the loader after a few batches (injected through sitecustomize)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import sd3.dist.loader as loader\n"
        "original = loader.BatchProducer.next\n"
        "def next(self):\n"
        "    self.calls = getattr(self, 'calls', 0) + 1\n"
        "    if self.calls > 3:\n"
        "        raise RuntimeError('disk vanished under the loader')\n"
        "    return original(self)\n"
        "loader.BatchProducer.next = next\n")
    env = {"PYTHONPATH": os.pathsep.join([str(inject), str(ROOT / "src")])}
    rc, out = run(tiny_args(None, "--steps", "50"), env=env, timeout=120)
    assert rc != 0
    assert "loader rank 0 failed: RuntimeError: disk vanished under the loader" in out, out[-3000:]


def test_a_failing_model_rank_ends_the_job(tiny_args, tmp_path):
    """A model rank that fails at its first step (an attention kernel this machine lacks: only model ranks
    run the model) takes the whole job down, its loader included, with its reason."""
    rc, out = run(tiny_args(None, "--steps", "5", "--model.attn_backend=xformers", "--train.device=cpu"), timeout=120)
    assert rc != 0
    assert "model.attn_backend='xformers' needs xformers installed" in out, out[-3000:]


def test_two_nodes_on_loopback(tiny_args, tmp_path):
    """Two torchrun launches form one world of 4: per node, one loader feeding one model rank."""
    port = free_port()
    rdzv = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=sd3test"]
    args = tiny_args(tmp_path / "run", "--steps", "3", "--ranks.loaders_per_node=1", "--ranks.models_per_loader=1")
    nodes = [launch(args, nproc=2, extra_torchrun=rdzv) for _ in range(2)]
    results = [finish(node, timeout=240) for node in nodes]
    out = "".join(o for _, o in results)
    assert all(rc == 0 for rc, _ in results), out[-3000:]
    assert "loader 0 -> model ranks 1" in out and "loader 2 -> model ranks 3" in out
    assert list_checkpoints(tmp_path / "run")[-1][0] == 3


def test_patch_masking_trains_under_ddp_with_checkpointing_and_bf16(tiny_args, tmp_path):
    """1 loader + 2 DDP model ranks, 75% patch masking behind a 1-block mixer, activation checkpointing, bf16:
    every parameter gets a gradient on every rank (DDP would stop on an unused one), the last step unmasked."""
    args = tiny_args(tmp_path / "run", "--steps", "4", "--model.mask_ratio=0.75", "--model.mixer_depth=1",
                     "--train.unmasked_steps=1", "--train.activation_checkpointing=true", "--train.precision=bf16",
                     "--encoders.dtype=bfloat16")
    rc, out = run(args)
    assert rc == 0, out[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+) \| mask", out, flags=re.M)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), out[-3000:]
    assert re.findall(r"\| mask ([0-9.]+) \|", out) == ["0.75"] * 3 + ["0.00"]
    assert "step 3: patch masking off, unmasked finetune for the last 1 steps" in out
    assert any(k.startswith("mixer.0.") for k in weights(tmp_path / "run"))


def test_in_training_evaluation_is_split_over_the_model_ranks(tiny_args, tmp_path):
    """Each model rank generates its share of the evaluation rows; the statistics are merged, so the
    figure covers all of them."""
    import json

    run_dir = tmp_path / "run"
    rc, out = run(tiny_args(run_dir, "--steps", "2", "--data.val_rows=6", "--log.eval_every=2", "--log.eval_num=5",
                            "--log.eval_steps=2", "--log.eval_inception=random"))
    assert rc == 0, out[-3000:]
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/fid" in x]
    assert len(evals) == 1 and evals[0]["eval/images"] == 5 and math.isfinite(evals[0]["eval/fid"])
    assert "step 2: eval fid" in out


def test_resume_with_another_model_shape_ends_every_rank_in_one_line(tiny_args, tmp_path):
    """The first model rank compares the checkpoint's config before any weights load; the other ranks learn
    it from the start-step broadcast and end too: no hang, no size-mismatch wall."""
    run_dir = tmp_path / "run"
    rc, out = run(tiny_args(run_dir, "--steps", "2"))
    assert rc == 0, out[-3000:]
    rc, out = run(tiny_args(run_dir, "--steps", "4", "--resume", "auto", "--model.width=96"), timeout=120)
    assert rc != 0
    assert "it was trained with another model shape (model.width 64 -> 96)" in out, out[-3000:]
    assert "size mismatch" not in out
    assert list_checkpoints(run_dir)[-1][0] == 2
