"""What an operator's faults do to a real job: torchrun on gloo, 1 loader + 2 model ranks, hard timeouts.

One test per fault an operator met on the CPU demo: a diverging run, a loader killed as the OOM killer
does (under the SLURM script), damaged checkpoints, a full disk, SIGTERM to every process of the job and
SIGUSR1 to the model ranks, the messages of a dead model rank, an empty dataset and a shard that breaks
mid-run, and stand-ins created only where asked. Each asserts what a user relies on: exit codes, the
message, the good checkpoints still there and whole, PREEMPTED only after a clean stop, no process left.
tests/benchmarks/bench_faults.py runs these and more, and reports times."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd3.checkpoint.read import load_part, verify
from tests.dist_util import free_port
from tests.fault_util import (
    ROOT,
    Job,
    asset_args,
    data_waits,
    hidden_files,
    inject,
    mount_allowed,
    on_small_disk,
    steps_of,
    tiny_args,
    torchrun,
    torchrun_killed_a_worker,
)
from tests.test_slurm import FAKE_SCANCEL, FAKE_SCONTROL, FAKE_SRUN, JOB_ID, _write_exe

pytestmark = pytest.mark.slow


def run(assets, run_dir, *extra, timeout=120, **kw) -> tuple[int, Job]:
    with Job(torchrun(tiny_args(assets, run_dir, *extra, dataset=kw.pop("dataset", None))), run_dir=run_dir,
             **kw) as job:
        rc = job.finish(timeout)
    assert not job.leftovers(), job.text[-3000:]
    return rc, job


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_1_a_diverging_run_stops_naming_the_last_good_step_and_keeps_the_good_checkpoints(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    rc, job = run(tiny_assets, run_dir, "--steps", "4", "--log.save_every=2", "--log.keep_last=2")
    assert rc == 0 and steps_of(run_dir) == [2, 4], job.text[-3000:]
    good = {step: (checkpoint(run_dir, step) / "model.safetensors").read_bytes() for step in (2, 4)}

    rc, job = run(tiny_assets, run_dir, "--steps", "40", "--log.save_every=2", "--log.keep_last=2",
                  "--resume", "auto", "--train.lr=1e4")
    assert rc != 0
    said = re.search(r"Diverged: (\d+) bad steps in a row .* since step (\d+), the last good step; no checkpoint "
                     r"of the bad stretch was written", job.text)
    assert said and int(said.group(1)) == 20 and int(said.group(2)) >= 4, job.text[-3000:]
    # Nothing of the bad stretch was saved, so keep_last=2 pruned nothing: both good ones are there, whole.
    assert steps_of(run_dir) == [2, 4]
    for step, data in good.items():
        verify(checkpoint(run_dir, step))
        assert (checkpoint(run_dir, step) / "model.safetensors").read_bytes() == data
    assert not (run_dir / "PREEMPTED").exists()
    assert "Diverged" in (run_dir / "FAILED").read_text() and not torchrun_killed_a_worker(job.text)

    # A learning rate that is not a number fails at config validation, before anything starts.
    out = subprocess.run([sys.executable, "src/train.py", *tiny_args(tiny_assets, run_dir, "--train.lr=inf")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == "config error: train.lr=inf must be a finite number"
    assert steps_of(run_dir) == [2, 4]


@pytest.fixture
def fake_slurm(tmp_path):
    """tests/test_slurm.py's fake SLURM (scontrol, srun, scancel) around the real runjob_SLURM.sh."""
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        _write_exe(fake / "bin" / name, text)
    _write_exe(fake / "bin" / "scancel", FAKE_SCANCEL, python=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "NPROC_", "OMP_"))}
    env.update({
        "PATH": os.pathsep.join([str(fake / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]),
        "FAKE_SLURM_DIR": str(fake), "FAKE_HOSTS": "localhost", "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NAME": "faults", "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_PER_TASK": "2", "NPROC_PER_NODE": "3", "RDZV_PORT": str(free_port()), "PRESET": "tiny",
        "RUN_DIR": str(tmp_path / "run"),
    })
    return env, fake


def test_2_a_loader_killed_like_the_oom_killer_fails_the_job_without_requeue(tiny_assets, tmp_path, fake_slurm):
    """SIGKILL to the loader under runjob_SLURM.sh: the model ranks say it exited (not a timeout: the
    tiny preset waits 120 s, the job must end long before), everything ends, the job is not requeued."""
    env, fake = fake_slurm
    run_dir = tmp_path / "run"
    cmd = ["bash", str(ROOT / "runjob_SLURM.sh"), *asset_args(tiny_assets), "--steps=4000", "--log.save_every=1000"]
    with Job(cmd, env=env, run_dir=run_dir) as job:
        job.wait_for(r"step 3/4000")
        job.signal_rank(0, signal.SIGKILL)
        rc = job.finish(timeout=90)
    assert rc != 0, job.text[-3000:]
    assert "loader rank 0 exited or crashed" in job.text and "no message from loader rank 0" not in job.text, \
        job.text[-5000:]
    assert f"a rank failed (exit {rc}): not requeueing" in job.text
    assert re.search(r"reason \(.*FAILED\): rank [12] \(model\): TransportError: loader rank 0 exited or crashed",
                     job.text), job.text[-3000:]
    calls = (fake / "calls.log").read_text()
    assert "scontrol requeue" not in calls and "scancel" not in calls
    assert not (run_dir / "PREEMPTED").exists()
    assert not job.leftovers() and sorted(job.exited) == [0, 1, 2]


def test_3_resume_auto_walks_back_past_damaged_checkpoints(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    rc, job = run(tiny_assets, run_dir, "--steps", "6", "--log.save_every=2", "--log.keep_last=3")
    assert rc == 0 and steps_of(run_dir) == [2, 4, 6], job.text[-3000:]
    model6 = checkpoint(run_dir, 6) / "model.safetensors"
    with open(model6, "r+b") as f:
        f.truncate(model6.stat().st_size // 2)
    (checkpoint(run_dir, 4) / "train_state.pt").unlink()

    rc, job = run(tiny_assets, run_dir, "--steps", "8", "--resume", str(checkpoint(run_dir, 6)))
    assert rc != 0
    assert re.search(r"\[rank 1 error\] CheckpointError: checkpoint .*step_00000006: model\.safetensors is "
                     r"[\d,]+ bytes but was written with [\d,]+ \(truncated", job.text), job.text[-3000:]
    assert "model.safetensors is" in (run_dir / "FAILED").read_text()

    rc, job = run(tiny_assets, run_dir, "--steps", "8", "--log.save_every=2", "--log.keep_last=3", "--resume", "auto")
    assert rc == 0, job.text[-3000:]
    assert re.search(r"skipping checkpoint step_00000006: .*model\.safetensors is [\d,]+ bytes", job.text)
    assert re.search(r"skipping checkpoint step_00000004: .*missing train_state\.pt", job.text)
    assert f"resuming from {checkpoint(run_dir, 2)} (step 2)" in job.text
    assert "step 8/8" in job.text
    assert steps_of(run_dir) == [4, 6, 8]       # trained on; the damaged ones were saved again, whole
    for step in (4, 6, 8):
        verify(checkpoint(run_dir, step))
    assert not (run_dir / "FAILED").exists()


def test_4_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tiny_assets, tmp_path):
    """The run directory on a 10 MiB tmpfs: the first checkpoint (about 5.8 MB) fits, the second does not."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    if (why := mount_allowed(disk)) is not None:
        pytest.skip(why)
    copy.mkdir()
    cmd = on_small_disk(torchrun(tiny_args(tiny_assets, disk, "--steps", "20", "--log.save_every=3")),
                        disk=disk, options="size=10M", copy_to=copy)
    with Job(cmd) as job:
        rc = job.finish(timeout=120)
    assert rc != 0
    said = re.search(r"NoSpaceError: not enough disk space for checkpoint step_00000006 under .*: it needs "
                     r"([\d.]+) MiB, ([\d.]+) MiB are free", job.text)
    assert said and float(said.group(1)) > float(said.group(2)), job.text[-3000:]
    assert steps_of(copy) == [3] and hidden_files(copy) == []
    verify(checkpoint(copy, 3))
    assert "NoSpaceError" in (copy / "FAILED").read_text() and not (copy / "PREEMPTED").exists()
    assert not job.leftovers() and sorted(job.exited) == [0, 1, 2]


@pytest.mark.parametrize("how", ["SIGTERM to every process", "SIGUSR1 to the model ranks"])
def test_5_a_signal_ends_every_rank_cleanly_with_a_whole_checkpoint(tiny_assets, tmp_path, how):
    """As slurmstepd/scancel do (every process of the step at once), and as the time-limit warning
    forwarded to the step does: a whole new checkpoint, PREEMPTED, every process gone without torchrun
    having to SIGKILL anyone (it does after 30 s). (Under fsdp the stop ends through the same finish(), with a
    sharded checkpoint: tests/test_sharding.py.)"""
    run_dir = tmp_path / "run"
    name = "SIGTERM" if how.startswith("SIGTERM") else "SIGUSR1"
    with Job(torchrun(tiny_args(tiny_assets, run_dir, "--steps", "4000", "--log.save_every=1000")),
             run_dir=run_dir) as job:
        job.wait_for(r"step 5/4000")
        job.wait_for_ranks(3)
        if name == "SIGTERM":
            job.signal_tree(signal.SIGTERM)
        else:
            job.signal_rank(1, signal.SIGUSR1)
            job.signal_rank(2, signal.SIGUSR1)
        rc = job.finish(timeout=60)
    assert rc == (1 if name == "SIGTERM" else 0), job.text[-3000:]   # torchrun fails itself on SIGTERM
    (step,) = steps_of(run_dir)
    assert 5 <= step < 4000 and checkpoint(run_dir, step).name in job.checkpoints
    verify(checkpoint(run_dir, step))
    assert (run_dir / "PREEMPTED").read_text() == f"stopped at step {step} of 4000 on {name}\n"
    assert not (run_dir / "FAILED").exists()
    assert not torchrun_killed_a_worker(job.text), job.text[-3000:]
    assert not job.leftovers() and sorted(job.exited) == [0, 1, 2]


SLOW_LOADER = """
import time
import sd3.dist.loader as loader
original = loader.BatchProducer.next
def next(self):
    time.sleep(0.15)        # a loader slower than its model ranks: they wait for data
    return original(self)
loader.BatchProducer.next = next
"""


RAISE_ON_RANK_2 = """
import os
import sd3.train.trainer as trainer
original = trainer.train_step
def train_step(*a, step, **k):
    if step == 3 and os.environ.get("RANK") == "2":
        raise RuntimeError("injected failure on model rank 2")
    return original(*a, step=step, **k)
trainer.train_step = train_step
"""


def test_6_messages_name_the_dead_rank_the_empty_dataset_and_the_broken_rows(tiny_assets, tmp_path):
    """One run with a slow loader: a shard truncated mid-run (its rows are counted and replaced), the
    data-wait figure stays a fraction, then model rank 2 is SIGKILLed and the loader names rank 2. Then
    an empty dataset, and a model rank that raises on its own (the job ends with its message, long
    before the 300 s a silent peer would be waited for)."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(tiny_assets / "demo" / "64"), str(data)], check=True)
    run_dir = tmp_path / "run"
    cmd = torchrun(tiny_args(tiny_assets, run_dir, "--steps", "4000", "--log.save_every=1000", dataset=data))
    with Job(cmd, env=inject(tmp_path / "inject", SLOW_LOADER), run_dir=run_dir) as job:
        job.wait_for(r"step 3/4000")
        shard = data / "demo-01.parquet"
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 4)
        job.wait_for(r"\| \d+ corrupt or unreadable rows replaced")
        job.wait_for_ranks(3)
        job.signal_rank(2, signal.SIGKILL)
        rc = job.finish(timeout=90)
    assert rc != 0
    assert "[rank 0 loader] failed: TransportError: model rank 2 exited or crashed" in job.text, job.text[-3000:]
    assert "model rank 1 exited" not in job.text
    waits = data_waits(job.log_lines())
    assert len(waits) >= 3 and all(0 <= w <= 1 for w in waits), waits
    assert statistics.median(waits) > 0.5, waits   # the loader is the bottleneck, and the figure shows it
    assert not job.leftovers()

    empty = tmp_path / "empty"
    empty.mkdir()
    import pyarrow.parquet as pq

    from tests.data_helpers import SEED_SCHEMA

    pq.write_table(SEED_SCHEMA.empty_table(), empty / "part-00000.parquet")
    subprocess.run([sys.executable, "src/create_indices.py", "--data", str(empty)], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    rc, job = run(tiny_assets, tmp_path / "run_empty", "--steps", "3", dataset=empty)
    assert rc != 0
    assert re.search(r"\[rank 1 error\] LoaderFailed: loader rank 0 failed: DataError: data.dataset=.*empty' is "
                     r"empty: its index lists 0 rows in 1 shard", job.text), job.text[-3000:]

    run_dir = tmp_path / "run_raises"
    rc, job = run(tiny_assets, run_dir, *("--steps", "4000", "--log.save_every=1000", "--ranks.timeout_s=300"),
                  env=inject(tmp_path / "inject_raise", RAISE_ON_RANK_2), timeout=90)
    assert rc != 0
    assert "[rank 2 error] RuntimeError: injected failure on model rank 2" in job.text, job.text[-3000:]
    assert "injected failure on model rank 2" in (run_dir / "FAILED").read_text()
    assert not (run_dir / "PREEMPTED").exists()


STAND_INS_HERE = """
import os
import sd3.encode.stand_ins
sd3.encode.stand_ins.STAND_IN_DIR = os.environ["TEST_STAND_IN_DIR"]   # the repository's data/tiny_encoders, moved
"""


def test_7_stand_ins_are_created_only_where_asked_and_said_to_be_random(tiny_assets, tmp_path):
    """The stand-in folder is moved to tmp_path (so the test writes nothing in the repository); the run
    starts from an empty working directory."""
    home, cwd = tmp_path / "tiny_encoders", tmp_path / "cwd"
    cwd.mkdir()
    env = {**inject(tmp_path / "inject", STAND_INS_HERE), "TEST_STAND_IN_DIR": str(home)}
    text = f"--encoders.text=('{home / 'gemma'}', '{home / 'bert'}')"
    data = f"--data.dataset={tiny_assets / 'demo' / '64'}"
    base = ["--preset", "tiny", "--steps", "2", data, text, "--model.width=64", "--model.num_heads=2",
            "--model.depth=2", "--data.batch_size=4", "--log.sample_steps=2"]

    with Job(torchrun([*base, "--run_dir", str(tmp_path / "a"), "--encoders.pooled=facebook/metaclip-l14-400m"]),
             env=env, cwd=cwd) as job:
        rc = job.finish(timeout=120)
    assert rc != 0
    assert "LoaderFailed: loader rank 0 failed: ConfigError: encoders.pooled='facebook/metaclip-l14-400m' is not " \
           "a local directory" in job.text, job.text[-3000:]
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in home.iterdir()) == ["bert", "gemma"]     # the text stand-ins asked for
    assert not [p for p in tmp_path.rglob("*metaclip*")]

    with Job(torchrun([*base, "--run_dir", str(tmp_path / "b"), f"--encoders.pooled={home / 'clip'}"]),
             env=env, cwd=cwd) as job:
        rc = job.finish(timeout=120)
    assert rc == 0, job.text[-3000:]
    assert f"created random-init stand-in encoders at {home / 'clip'}: they make the pipeline run, not good " \
           "images" in job.text
    assert list(cwd.iterdir()) == []


def test_8_a_second_run_on_a_held_run_directory_stops_at_once_and_a_killed_runs_lock_is_taken_over(tiny_assets,
                                                                                                 tmp_path):
    """A double launch (a second terminal, a requeued job whose predecessor still runs): the second run ends
    on every rank naming the holder and writes nothing; the first trains on untouched. A run killed with
    SIGKILL leaves its lock behind, and the next run takes it over, saying so."""
    run_dir = tmp_path / "run"
    with Job(torchrun(tiny_args(tiny_assets, run_dir, "--steps", "4000", "--log.save_every=1000")),
             run_dir=run_dir) as first:
        first.wait_for(r"step 3/4000")
        with Job(torchrun(tiny_args(tiny_assets, run_dir, "--steps", "4000")), run_dir=run_dir) as second:
            rc = second.finish(timeout=90)
        assert rc != 0 and sorted(second.exited) == [0, 1, 2], second.text[-3000:]
        assert re.search(r"is in use by another run \(pid \d+ on \S+, started ", second.text), second.text[-3000:]
        said = [line for line in second.text.splitlines() if line.startswith("[rank ")]
        assert sorted(line.split()[1] for line in said) == ["0", "1", "2"], second.text[-3000:]  # a line each
        assert all("RunDirLocked" in line for line in said), said
        first.wait_for(r"step 8/4000")                       # still training
        first.signal_tree(signal.SIGTERM)
        assert first.finish(timeout=60) == 1                 # torchrun fails itself on SIGTERM
    (step,) = steps_of(run_dir)
    verify(checkpoint(run_dir, step))
    assert (run_dir / "PREEMPTED").exists() and not (run_dir / "FAILED").exists()
    assert "in use by another run" not in (run_dir / "train.log").read_text()   # the second wrote nothing there
    assert not (run_dir / "LOCK").exists()                   # released on the way out

    with Job(torchrun(tiny_args(tiny_assets, run_dir, "--steps", "4000", "--resume", "auto")),
             run_dir=run_dir) as killed:
        killed.wait_for(rf"step {step + 2}/4000")
        killed.signal_tree(signal.SIGKILL)
        killed.finish(timeout=60)
    assert (run_dir / "LOCK").exists()
    rc, job = run(tiny_assets, run_dir, "--steps", str(step + 2), "--resume", "auto")
    assert rc == 0, job.text[-3000:]
    assert re.search(r"took over the lock of a run that is gone \(pid \d+ on \S+, started \S+: no such process\)",
                     job.text), job.text[-3000:]
    assert not (run_dir / "LOCK").exists()


def test_9_ctrl_c_stops_with_a_checkpoint_that_resumes_exactly_and_a_second_stops_at_once(tiny_assets, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to torchrun's process group; torchrun passes it on to every
    rank): the step ends, a whole checkpoint, one line, no traceback, and --resume auto continues as if
    nothing happened. A second Ctrl-C a few seconds later stops at once, without a checkpoint."""
    run_dir, steps = tmp_path / "run", ["--steps", "12", "--log.save_every=1000"]
    with Job(torchrun(tiny_args(tiny_assets, run_dir, *steps)), run_dir=run_dir) as job:
        job.wait_for(r"step 4/12")
        job.wait_for_ranks(3)
        os.killpg(job.proc.pid, signal.SIGINT)
        job.finish(timeout=60)
    (step,) = steps_of(run_dir)
    assert step < 12, job.text[-3000:]
    verify(checkpoint(run_dir, step))
    assert f"stopping at step {step} on SIGINT" in job.text, job.text[-3000:]
    assert "KeyboardInterrupt" not in job.text and not torchrun_killed_a_worker(job.text), job.text[-3000:]
    assert (run_dir / "PREEMPTED").read_text() == f"stopped at step {step} of 12 on SIGINT\n"
    assert not (run_dir / "FAILED").exists() and not job.leftovers()

    rc, _ = run(tiny_assets, run_dir, *steps, "--resume", "auto")
    assert rc == 0
    rc, _ = run(tiny_assets, tmp_path / "straight", *steps)
    assert rc == 0
    resumed, straight = (load_part(checkpoint(d, 12), "model") for d in (run_dir, tmp_path / "straight"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)

    # Twice: the first asks for the stop, the second (pressed later) ends every rank at once.
    slow = inject(tmp_path / "inject", SLOW_LOADER.replace("0.15", "1.0"))
    with Job(torchrun(tiny_args(tiny_assets, tmp_path / "twice", "--steps", "4000", "--log.save_every=1000")),
             env=slow, run_dir=tmp_path / "twice") as job:
        job.wait_for(r"step 2/4000")
        job.wait_for_ranks(3)
        for rank in (0, 1, 2):
            job.signal_rank(rank, signal.SIGINT)
        time.sleep(1.5)
        for rank in (0, 1, 2):
            job.signal_rank(rank, signal.SIGINT)
        rc = job.finish(timeout=60)
    assert rc != 0 and not job.leftovers() and steps_of(tmp_path / "twice") == []
    assert "stopped at once on a second Ctrl-C: the steps since the last checkpoint were not saved" in job.text, \
        job.text[-3000:]
    assert not (tmp_path / "twice" / "FAILED").exists(), (tmp_path / "twice" / "FAILED").read_text()
