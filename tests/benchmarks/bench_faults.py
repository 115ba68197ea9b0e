"""Fault injection: the faults an operator tries on the CPU demo, each run for real against its expected outcome.

    nice -n 10 python tests/benchmarks/bench_faults.py [--only NAME,NAME] [--list] [--keep]

Every fault runs a real job: `torchrun --standalone --nproc_per_node=3 src/train.py --preset tiny` (1 loader
rank + 2 model ranks on gloo, a smaller model than the demo's so a run takes seconds), or
`python src/train.py` for config errors, or `runjob_SLURM.sh` under tests/test_slurm.py's fake SLURM. It
hurts the job (signals to one rank or to every process of the job as slurmstepd sends them, SIGKILL,
bad configs, damaged checkpoints and shards, a full disk on a tmpfs, exceptions and hangs injected
through a sitecustomize module) and checks what a user relies on: the exit status, the message, the
checkpoints still whole, PREEMPTED only after a clean stop, FAILED holding the reason, no process left,
and torchrun never having to SIGKILL a worker that was asked to stop.

Prints one line per fault (name, expected, observed, ok), then the measured times of the signal stops,
and last `faults_tried: N` and `faults_ok: N`. Exit status 1 when a fault did not end as expected.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from sd3.checkpoint.read import CheckpointError, verify  # noqa: E402
from tests.data_helpers import SEED_SCHEMA  # noqa: E402
from tests.dist_util import free_port  # noqa: E402
from tests.fault_util import (  # noqa: E402
    Job,
    asset_args,
    build_assets,
    damage,
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
from tests.test_slurm import FAKE_SCANCEL, FAKE_SCONTROL, FAKE_SRUN, JOB_ID, _write_exe  # noqa: E402

LONG = ("--steps", "4000", "--log.save_every=1000")
"""A run that only ends when it is stopped."""


class Check:
    """What one fault showed: facts for the observed column, and the expectations that failed."""

    def __init__(self):
        self.facts: list[str] = []
        self.missed: list[str] = []

    def note(self, fact: str) -> None:
        self.facts.append(fact)

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.missed.append(what)
        return ok

    def said(self, text: str, pattern: str, what: str | None = None) -> str:
        """Expect `pattern` (a regular expression) in the output; note the line it is in, shortened."""
        match = re.search(pattern, text)
        if self.expect(match is not None, f"no {what or repr(pattern)} in the output"):
            line = text[text.rfind("\n", 0, match.start()) + 1:].split("\n", 1)[0]
            line = line[line.find(match.group(0)[:20]):] if match.group(0)[:20] in line else match.group(0)
            self.note(repr(_short(line, 110)))
            return match.group(0)
        return ""

    def not_said(self, text: str, pattern: str, what: str) -> None:
        self.expect(re.search(pattern, text) is None, f"{what} in the output")


SCRATCH = ""
"""The scratch folder, shown as $TMP in the observed column."""


def _short(text: str, n: int) -> str:
    text = " ".join(text.replace(SCRATCH, "$TMP").split()) if SCRATCH else " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


class Bench:
    """Shared assets (built once) and a scratch folder per fault."""

    def __init__(self, root: Path):
        self.root = root
        self.assets = build_assets(root / "assets")
        self.times: list[str] = []
        # A finished 4-step run with checkpoints at 2 and 4: copied by the faults that need checkpoints.
        self._trained: Path | None = None

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def job(self, run_dir: Path, *extra: str, env=None, nproc: int = 3, dataset: Path | None = None,
            cwd: Path | None = None) -> Job:
        kw = {"cwd": cwd} if cwd else {}
        return Job(torchrun(tiny_args(self.assets, run_dir, *extra, dataset=dataset), nproc=nproc), env=env,
                   run_dir=run_dir, **kw)

    def run(self, chk: Check, run_dir: Path, *extra: str, timeout: float = 150, **kw) -> tuple[int, Job]:
        with self.job(run_dir, *extra, **kw) as job:
            rc = job.finish(timeout)
        ended(chk, job, rc)
        return rc, job

    def trained(self, name: str) -> Path:
        """A copy of a finished run with checkpoints every 2 steps (trained once)."""
        if self._trained is None:
            self._trained = self.dir("_trained")
            chk = Check()
            rc, job = self.run(chk, self._trained / "run", "--steps", "6", "--log.save_every=2",
                               "--log.keep_last=3")
            if rc != 0 or steps_of(self._trained / "run") != [2, 4, 6]:
                raise RuntimeError(f"the reference run failed:\n{job.text[-3000:]}")
        target = self.root / name / "run"
        shutil.copytree(self._trained / "run", target)
        return target

    def dataset_copy(self, name: str) -> Path:
        target = self.root / name / "data"
        shutil.copytree(self.assets / "demo" / "64", target)
        return target

    def python(self, *args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})


def ended(chk: Check, job: Job, rc: int) -> None:
    """Facts every job should show: its exit status, and no process of it left behind."""
    chk.note(f"exit {rc}")
    left = job.leftovers()
    chk.expect(not left, f"processes left: {left}")


def markers(chk: Check, run_dir: Path, *, preempted: bool, failed: str | None) -> None:
    has_p, has_f = (run_dir / "PREEMPTED").exists(), (run_dir / "FAILED").exists()
    chk.expect(has_p == preempted, "PREEMPTED " + ("missing" if preempted else "written on a failure"))
    if failed is None:
        chk.expect(not has_f, "FAILED written")
    elif chk.expect(has_f, "no FAILED"):
        text = (run_dir / "FAILED").read_text()
        chk.expect(re.search(failed, text) is not None, f"FAILED says {_short(text, 80)!r}")
    chk.note(("PREEMPTED" if has_p else "no PREEMPTED") + (", FAILED" if has_f else ""))


def whole(chk: Check, run_dir: Path, expected: list[int] | None = None) -> list[int]:
    steps = steps_of(run_dir)
    chk.note(f"checkpoints {steps}")
    if expected is not None:
        chk.expect(steps == expected, f"checkpoints {steps}, expected {expected}")
    for step in steps:
        try:
            verify(run_dir / "checkpoints" / f"step_{step:08d}")
        except CheckpointError as error:
            chk.expect(False, f"step {step} does not verify: {error}")
    chk.expect(not hidden_files(run_dir / "checkpoints"), f"temporaries left: {hidden_files(run_dir)}")
    return steps


def no_sigkill(chk: Check, job: Job) -> None:
    chk.expect(not torchrun_killed_a_worker(job.text), "torchrun had to SIGKILL a worker")


FAULTS: list[tuple[str, str, Callable[[Bench, Check], None]]] = []


def fault(name: str, expected: str):
    def add(fn):
        FAULTS.append((name, expected, fn))
        return fn
    return add


# --------------------------------------------------------------------------------------------------
# Bad configuration: one line, exit 2, before anything heavy
# --------------------------------------------------------------------------------------------------


def config_fault(name: str, args: tuple[str, ...], message: str):
    @fault(name, f"exit 2, {message!r}")
    def check(bench: Bench, chk: Check) -> None:
        run_dir = bench.dir(name) / "run"
        out = bench.python(*tiny_args(bench.assets, run_dir, *args))
        chk.note(f"exit {out.returncode}")
        chk.expect(out.returncode == 2, "exit status is not 2")
        chk.said(out.stderr, re.escape(message))
        chk.expect(len(out.stderr.strip().splitlines()) == 1, "more than one line on stderr")
        chk.expect(not run_dir.exists(), "the run directory was created")


config_fault("config_lr_inf", ("--train.lr=inf",), "train.lr=inf must be a finite number")
config_fault("config_lr_nan", ("--train.lr=nan",), "train.lr=nan must be a finite number")
config_fault("config_lr_negative", ("--train.lr=-1",), "train.lr=-1.0 must be positive")
config_fault("config_unknown_key", ("--train.lrr=1e-4",), "unknown config key --train.lrr; did you mean --train.lr")
config_fault("config_batch_not_a_number", ("--data.batch_size=many",), "--data.batch_size='many': expected int")
config_fault("config_batch_zero", ("--data.batch_size=0",), "data.batch_size=0 must be positive")
config_fault("config_resume_and_init_from", ("--resume", "auto", "--init_from", "x"),
             "--resume continues a run and --init_from starts a new one")


@fault("config_run_dir_is_a_file", "exit 2, 'is a file, not a folder'")
def _(bench: Bench, chk: Check) -> None:
    path = bench.dir("config_run_dir_is_a_file") / "file"
    path.write_text("not a folder")
    out = bench.python(*tiny_args(bench.assets, path, "--steps", "2"))
    chk.note(f"exit {out.returncode}")
    chk.expect(out.returncode == 2, "exit status is not 2")
    chk.said(out.stderr, r"run_dir=.* is a file, not a folder")


def config_exits(chk: Check, job: Job) -> None:
    """Workers exit 2 on a config error; torchrun tears down those still importing (exit -15 for them)."""
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", job.text)]
    chk.expect(2 in codes and set(codes) <= {2, -15}, f"worker exit codes {codes}")
    chk.note(f"worker exit codes {sorted(set(codes))}")
    no_sigkill(chk, job)


@fault("rankmap_bad_map", "the ranks exit 2 naming the map, nothing created")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("rankmap_bad_map") / "run"
    rc, job = bench.run(chk, run_dir, "--ranks.loader_to_model={0:[1,5]}")
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"config error: rank map \(loader_to_model=\{0: \[1, 5\]\}, world size 3\) has 2 problems")
    config_exits(chk, job)
    chk.expect(not run_dir.exists(), "the run directory was created")


@fault("rankmap_nproc_mismatch", "the ranks exit 2, the fix named")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("rankmap_nproc_mismatch") / "run"
    rc, job = bench.run(chk, run_dir, "--steps", "2", nproc=4)
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"--nproc_per_node=4 does not fit .* use --nproc_per_node=3")
    config_exits(chk, job)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def loader_fails(chk: Check, job: Job, rc: int, pattern: str) -> None:
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"\[rank 1 error\] LoaderFailed: loader rank 0 failed: " + pattern)


@fault("data_missing_folder", "the model ranks stop with the loader's 'is not a folder'")
def _(bench: Bench, chk: Check) -> None:
    rc, job = bench.run(chk, bench.dir("data_missing_folder") / "run", "--steps", "2",
                        dataset=bench.root / "nowhere")
    loader_fails(chk, job, rc, r"DataError: data.dataset=.* is not a folder")


@fault("data_missing_index", "'not found; build it with .venv/bin/python src/create_indices.py'")
def _(bench: Bench, chk: Check) -> None:
    data = bench.dataset_copy("data_missing_index")
    (data / "bucket_index.safetensors").unlink()
    rc, job = bench.run(chk, bench.root / "data_missing_index" / "run", "--steps", "2", dataset=data)
    loader_fails(chk, job, rc, r"DataError: .*not found; build it with \S*python\S* \S*src/create_indices\.py")


@fault("data_shard_removed_after_indexing", "'does not match the shards ... 1 missing'")
def _(bench: Bench, chk: Check) -> None:
    data = bench.dataset_copy("data_shard_removed_after_indexing")
    (data / "demo-02.parquet").unlink()
    rc, job = bench.run(chk, bench.root / "data_shard_removed_after_indexing" / "run", "--steps", "2", dataset=data)
    loader_fails(chk, job, rc, r"DataError: .*does not match the shards.*1 missing \(demo-02\.parquet\)")


def empty_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(SEED_SCHEMA.empty_table(), folder / "part-00000.parquet")
    subprocess.run([sys.executable, str(ROOT / "src" / "create_indices.py"), "--data", str(folder)], check=True,
                   capture_output=True, timeout=60)
    return folder


@fault("data_empty_dataset", "'is empty: its index lists 0 rows'")
def _(bench: Bench, chk: Check) -> None:
    data = empty_dataset(bench.root / "data_empty_dataset" / "data")
    rc, job = bench.run(chk, bench.root / "data_empty_dataset" / "run", "--steps", "2", dataset=data)
    loader_fails(chk, job, rc, r"DataError: data.dataset=.* is empty: its index lists 0 rows in 1 shard")


@fault("data_corrupt_image_rows", "exit 0, the corrupt rows counted as replaced")
def _(bench: Bench, chk: Check) -> None:
    data = bench.dataset_copy("data_corrupt_image_rows")
    shard = data / "demo-00.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    for i in range(0, len(images), 3):                     # every third image: truncated bytes
        images[i] = images[i][: len(images[i]) // 3]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, shard, row_group_size=64)
    subprocess.run([sys.executable, str(ROOT / "src" / "create_indices.py"), "--data", str(data)], check=True,
                   capture_output=True, timeout=60)
    rc, job = bench.run(chk, bench.root / "data_corrupt_image_rows" / "run", "--steps", "30", dataset=data)
    chk.expect(rc == 0, "the run did not finish")
    counts = [int(n) for n in re.findall(r"\| (\d+) corrupt or unreadable rows replaced", job.text)]
    chk.expect(bool(counts) and max(counts) > 0, "no corrupt rows counted")
    chk.note(f"{max(counts, default=0)} corrupt or unreadable rows replaced")
    chk.said(job.text, r"step 30/30")


@fault("data_shard_truncated_mid_run", "the run goes on, unreadable rows counted in the log line")
def _(bench: Bench, chk: Check) -> None:
    data = bench.dataset_copy("data_shard_truncated_mid_run")
    run_dir = bench.root / "data_shard_truncated_mid_run" / "run"
    with bench.job(run_dir, "--steps", "60", dataset=data) as job:
        job.wait_for(r"step 3/60")
        with open(data / "demo-01.parquet", "r+b") as f:
            f.truncate(5000)
        rc = job.finish(120)
    ended(chk, job, rc)
    chk.expect(rc == 0, "the run did not finish")
    chk.said(job.text, r"\d+ corrupt or unreadable rows replaced")
    chk.said(job.text, r"shard .*demo-01\.parquet could not be read")


@fault("data_shard_deleted_mid_run", "the run reaches its last step (the open file still reads, or rows counted)")
def _(bench: Bench, chk: Check) -> None:
    data = bench.dataset_copy("data_shard_deleted_mid_run")
    run_dir = bench.root / "data_shard_deleted_mid_run" / "run"
    with bench.job(run_dir, "--steps", "60", dataset=data) as job:
        job.wait_for(r"step 3/60")
        (data / "demo-03.parquet").unlink()   # the reader keeps shards open: an unlinked file still reads
        rc = job.finish(120)
    ended(chk, job, rc)
    chk.expect(rc == 0, "the run did not finish")
    chk.said(job.text, r"step 60/60")
    counts = [int(n) for n in re.findall(r"\| (\d+) corrupt or unreadable rows replaced", job.text)]
    chk.note(f"{max(counts, default=0)} rows counted as unreadable")


SLOW_LOADER = """
import time
import sd3.dist.loader as loader
original = loader.BatchProducer.next
def next(self):
    time.sleep(0.15)
    return original(self)
loader.BatchProducer.next = next
"""


@fault("data_wait_slow_loader", "every data-wait figure in [0, 1], high when the loader is slow")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("data_wait_slow_loader")
    rc, job = bench.run(chk, base / "run", "--steps", "25", env=inject(base / "inject", SLOW_LOADER))
    waits = data_waits(job.log_lines())
    chk.expect(rc == 0, "the run did not finish")
    chk.expect(len(waits) == 25 and all(0 <= w <= 1 for w in waits), f"data waits out of [0, 1]: {waits}")
    chk.expect(bool(waits) and statistics.median(waits) > 0.5, "the slow loader does not show")
    if waits:
        chk.note(f"data wait {100 * min(waits):.1f}%..{100 * max(waits):.1f}% (median "
                 f"{100 * statistics.median(waits):.1f}%)")


# --------------------------------------------------------------------------------------------------
# Encoders and stand-ins
# --------------------------------------------------------------------------------------------------

STAND_INS_HERE = """
import os
import sd3.encode.stand_ins
sd3.encode.stand_ins.STAND_IN_DIR = os.environ["BENCH_STAND_IN_DIR"]   # the repository's data/tiny_encoders, moved
"""


def stand_in_run(bench: Bench, name: str, pooled: str) -> tuple[int, Job, Path, Path]:
    base = bench.dir(name)
    home, cwd = base / "tiny_encoders", base / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**inject(base / "inject", STAND_INS_HERE), "BENCH_STAND_IN_DIR": str(home)}
    args = ["--preset", "tiny", "--run_dir", str(base / "run"), "--steps", "2",
            f"--data.dataset={bench.assets / 'demo' / '64'}",
            f"--encoders.text=('{home / 'gemma'}', '{home / 'bert'}')", f"--encoders.pooled={pooled.format(home=home)}",
            "--model.width=64", "--model.num_heads=2", "--model.depth=2", "--data.batch_size=4",
            "--log.sample_steps=2"]
    with Job(torchrun(args), env=env, cwd=cwd) as job:
        rc = job.finish(150)
    return rc, job, home, cwd


@fault("encoders_hub_id_offline", "fails naming encoders.pooled and the id; nothing in the working directory")
def _(bench: Bench, chk: Check) -> None:
    rc, job, home, cwd = stand_in_run(bench, "encoders_hub_id_offline", "facebook/metaclip-l14-400m")
    ended(chk, job, rc)
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"loader rank 0 failed: ConfigError: encoders\.pooled='facebook/metaclip-l14-400m' is not "
                       r"a local directory")
    chk.not_said(job.text, r"pass --encoders\.create_tiny=true for", "the misleading create_tiny hint")
    chk.expect(not list(cwd.iterdir()), f"created in the working directory: {list(cwd.iterdir())}")
    chk.expect(not list(bench.root.rglob("*metaclip*")), "a stand-in was created for the hub id")
    chk.note(f"working directory empty, stand-ins made: {sorted(p.name for p in home.iterdir())}")


@fault("encoders_stand_ins_announced", "the start-of-run log says stand-ins were created, random")
def _(bench: Bench, chk: Check) -> None:
    rc, job, _, cwd = stand_in_run(bench, "encoders_stand_ins_announced", "{home}/clip")
    ended(chk, job, rc)
    chk.expect(rc == 0, "the run failed")
    chk.said(job.text, r"created random-init stand-in encoders at .*clip: they make the pipeline run, not good "
                       r"images")
    chk.expect(not list(cwd.iterdir()), "created in the working directory")


@fault("encoders_missing_local_path", "fails naming encoders.text[0] and the path; nothing created there")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("encoders_missing_local_path")
    rc, job = bench.run(chk, base / "run", "--steps", "2",
                        f"--encoders.text=('{base / 'nowhere' / 'gemma'}', '{bench.assets / 'enc' / 'bert'}')")
    loader_fails(chk, job, rc, r"ConfigError: encoders\.text\[0\]=.*nowhere/gemma")
    chk.expect(not (base / "nowhere").exists(), "a stand-in was created at the mistyped path")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def walk_back(name: str, file: str, how: str, reason: str):
    @fault(name, f"--resume auto skips step 6 ({reason}), resumes from 4 and trains on")
    def check(bench: Bench, chk: Check) -> None:
        run_dir = bench.trained(name)
        damage(run_dir / "checkpoints" / "step_00000006" / file, how)
        rc, job = bench.run(chk, run_dir, "--steps", "8", "--log.save_every=2", "--log.keep_last=3",
                            "--resume", "auto")
        chk.expect(rc == 0, "the run failed")
        chk.said(job.text, r"skipping checkpoint step_00000006: .*" + reason)
        chk.said(job.text, r"resuming from .*step_00000004 \(step 4\)")
        whole(chk, run_dir, [4, 6, 8])


walk_back("ckpt_truncated_model", "model.safetensors", "truncate", r"model\.safetensors is [\d,]+ bytes but")
walk_back("ckpt_missing_train_state", "train_state.pt", "delete", r"missing train_state\.pt")
walk_back("ckpt_flipped_byte", "ema.safetensors", "flip", r"ema\.safetensors does not match the checksum")


@fault("ckpt_resume_dir_damaged", "fails naming the bad file, one line per rank, FAILED names it")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.trained("ckpt_resume_dir_damaged")
    target = run_dir / "checkpoints" / "step_00000006"
    damage(target / "model.safetensors", "truncate")
    rc, job = bench.run(chk, run_dir, "--steps", "8", "--resume", str(target))
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"\[rank 1 error\] CheckpointError: checkpoint .*step_00000006: model\.safetensors is")
    chk.said(job.text, r"\[rank 2 error\] CheckpointError: model rank 1 could not find the checkpoint")
    chk.not_said(job.text, r"Connection closed by peer", "gloo's connection error")
    markers(chk, run_dir, preempted=False, failed=r"model\.safetensors is")


@fault("ckpt_none_verifies", "an error naming every reason, not a fresh start")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.trained("ckpt_none_verifies")
    for step in (2, 4, 6):
        damage(run_dir / "checkpoints" / f"step_{step:08d}" / "train_state.pt", "delete")
    rc, job = bench.run(chk, run_dir, "--steps", "8", "--resume", "auto")
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"no checkpoint of .* verifies \(3 found\)")
    chk.expect(steps_of(run_dir) == [2, 4, 6], "checkpoints changed")


@fault("ckpt_resume_missing_dir", "fails: 'does not exist'")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("ckpt_resume_missing_dir")
    rc, job = bench.run(chk, base / "run", "--steps", "2", "--resume", str(base / "nowhere"))
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"checkpoint .*nowhere does not exist")


@fault("ckpt_init_from_other_model", "fails before loading: 'trained with another model shape (model.depth ...)'")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.trained("ckpt_init_from_other_model")
    rc, job = bench.run(chk, bench.root / "ckpt_init_from_other_model" / "new", "--steps", "2", "--model.depth=3",
                        "--init_from", str(run_dir / "checkpoints" / "step_00000006"))
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"it was trained with another model shape \(model.depth \d+ -> 3\)")


@fault("ckpt_stale_temporary", "a killed writer's temporary is removed at the next save")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.trained("ckpt_stale_temporary")
    stale = run_dir / "checkpoints" / ".step_00000008.tmp-999999-deadbeef"   # pid 999999 is not running
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 2**20)
    rc, _ = bench.run(chk, run_dir, "--steps", "8", "--log.save_every=2", "--log.keep_last=3", "--resume", "auto")
    chk.expect(rc == 0, "the run failed")
    chk.expect(not stale.exists(), "the stale temporary is still there")
    whole(chk, run_dir, [4, 6, 8])


def full_disk(bench: Bench, chk: Check, name: str, options: str) -> tuple[int, Job, Path]:
    base = bench.dir(name)
    disk, copy = base / "disk", base / "copy"
    disk.mkdir()
    copy.mkdir()
    cmd = on_small_disk(torchrun(tiny_args(bench.assets, disk, "--steps", "20", "--log.save_every=3")),
                        disk=disk, options=options, copy_to=copy)
    with Job(cmd) as job:
        rc = job.finish(150)
    ended(chk, job, rc)
    chk.expect(rc != 0, "exited 0")
    chk.expect(sorted(job.exited) == [0, 1, 2], "not every rank was seen to end")
    return rc, job, copy


@fault("ckpt_full_disk", "'not enough disk space' (needed vs free), nothing partial, step 3 whole, exit != 0")
def _(bench: Bench, chk: Check) -> None:
    if (why := mount_allowed(bench.root / "probe_mount")) is not None:
        chk.note(f"skipped: {why}")
        return
    _, job, copy = full_disk(bench, chk, "ckpt_full_disk", "size=10M")
    chk.said(job.text, r"not enough disk space for checkpoint step_00000006 .*: it needs [\d.]+ MiB, [\d.]+ MiB "
                       r"are free")
    whole(chk, copy, [3])
    markers(chk, copy, preempted=False, failed="NoSpaceError")


@fault("ckpt_out_of_inodes", "a disk that refuses new files mid-save: 'no space', nothing partial, step 3 whole")
def _(bench: Bench, chk: Check) -> None:
    if (why := mount_allowed(bench.root / "probe_mount")) is not None:
        chk.note(f"skipped: {why}")
        return
    # Plenty of bytes, too few inodes: the second save fails creating its third file (ENOSPC while
    # writing, past the free-space check), as a quota on files does.
    _, job, copy = full_disk(bench, chk, "ckpt_out_of_inodes", "size=64M,nr_inodes=12")
    chk.said(job.text, r"NoSpaceError: .*step_00000006")
    whole(chk, copy, [3])
    markers(chk, copy, preempted=False, failed="NoSpaceError")


# --------------------------------------------------------------------------------------------------
# Training goes bad
# --------------------------------------------------------------------------------------------------


@fault("diverge_lr_1e4", "exit != 0 naming the last good step; checkpoints 2, 4 kept whole; FAILED, no PREEMPTED")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("diverge_lr_1e4") / "run"
    rc, _ = bench.run(Check(), run_dir, "--steps", "4", "--log.save_every=2", "--log.keep_last=2")
    rc, job = bench.run(chk, run_dir, "--steps", "40", "--log.save_every=2", "--log.keep_last=2", "--resume", "auto",
                        "--train.lr=1e4")
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"\d+ bad steps in a row .* since step \d+, the last good step")
    whole(chk, run_dir, [2, 4])
    markers(chk, run_dir, preempted=False, failed="Diverged")
    no_sigkill(chk, job)


@fault("model_rank_raises", "exit != 0, its error in FAILED, the others stop, no PREEMPTED")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("model_rank_raises")
    code = ("import os\nimport sd3.train.trainer as trainer\noriginal = trainer.train_step\n"
            "def train_step(*a, step, **k):\n"
            "    if step == 5 and os.environ.get('RANK') == '2':\n"
            "        print('raising the injected failure', flush=True)\n"
            "        raise RuntimeError('injected failure on model rank 2')\n"
            "    return original(*a, step=step, **k)\n"
            "trainer.train_step = train_step\n")
    rc, job = bench.run(chk, base / "run", *LONG, env=inject(base / "inject", code))
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"\[rank 2 error\] RuntimeError: injected failure on model rank 2")
    markers(chk, base / "run", preempted=False, failed="injected failure on model rank 2")
    raised = next((t for t, line in job.lines if "raising the injected failure" in line), None)
    if raised is not None and job.exited:
        gone = max(job.exited.values()) - raised
        chk.note(f"all gone {gone:.1f} s after the raise")
        bench.times.append(f"model rank 2 raised: every process gone {gone:.1f} s later")


@fault("model_rank_sigkill", "the loader names model rank 2 (not 1); exit != 0; all gone")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("model_rank_sigkill") / "run"
    with bench.job(run_dir, *LONG) as job:
        job.wait_for(r"step 5/4000")
        job.wait_for_ranks(3)
        t = time.monotonic()
        job.signal_rank(2, signal.SIGKILL)
        rc = job.finish(90)
    ended(chk, job, rc)
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"\[rank 0 loader\] failed: TransportError: model rank 2 exited or crashed")
    chk.not_said(job.text, r"model rank 1 exited", "rank 1 named as dead")
    chk.said(job.text, r"\[rank 1 error\] TransportError: another model rank exited or crashed")
    gone = max(job.exited.values()) - t
    chk.note(f"all gone {gone:.1f} s after the kill")
    bench.times.append(f"model rank 2 SIGKILLed: every process gone {gone:.1f} s later")


@fault("loader_sigkill", "'loader rank 0 exited or crashed' (not a timeout), exit != 0, no PREEMPTED, all gone")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("loader_sigkill") / "run"
    with bench.job(run_dir, *LONG) as job:
        job.wait_for(r"step 5/4000")
        job.wait_for_ranks(3)
        t = time.monotonic()
        job.signal_rank(0, signal.SIGKILL)
        rc = job.finish(90)
    ended(chk, job, rc)
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"TransportError: loader rank 0 exited or crashed")
    chk.not_said(job.text, r"no message from loader rank 0 within", "a timeout")
    markers(chk, run_dir, preempted=False, failed="loader rank 0 exited or crashed")
    gone = max(job.exited.values()) - t
    chk.note(f"all gone {gone:.1f} s after the kill")
    bench.times.append(f"loader SIGKILLed: every process gone {gone:.1f} s later")


@fault("loader_raises", "the model ranks stop with the loader's message, exit != 0")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("loader_raises")
    code = ("import sd3.dist.loader as loader\noriginal = loader.BatchProducer.next\n"
            "def next(self):\n    self.calls = getattr(self, 'calls', 0) + 1\n"
            "    if self.calls > 5:\n        raise RuntimeError('disk vanished under the loader')\n"
            "    return original(self)\nloader.BatchProducer.next = next\n")
    rc, job = bench.run(chk, base / "run", *LONG, env=inject(base / "inject", code))
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"loader rank 0 failed: RuntimeError: disk vanished under the loader")
    markers(chk, base / "run", preempted=False, failed="disk vanished")


@fault("loader_hangs", "after --ranks.timeout_s=10: 'no message from loader rank 0 within 10 s', exit != 0")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("loader_hangs")
    code = ("import time\nimport sd3.dist.loader as loader\noriginal = loader.BatchProducer.next\n"
            "def next(self):\n    self.calls = getattr(self, 'calls', 0) + 1\n"
            "    if self.calls > 5:\n        time.sleep(3600)\n"
            "    return original(self)\nloader.BatchProducer.next = next\n")
    rc, job = bench.run(chk, base / "run", *LONG, "--ranks.timeout_s=10", env=inject(base / "inject", code),
                        timeout=180)
    chk.expect(rc != 0, "torchrun exited 0")
    chk.said(job.text, r"no message from loader rank 0 within 10 s")
    markers(chk, base / "run", preempted=False, failed="no message from loader rank 0")


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


def stop_by_signal(bench: Bench, chk: Check, name: str, send: Callable[[Job], None], *, rc_expected: int,
                   signal_name: str, wait: str = r"step 5/4000", env=None, extra=()) -> tuple[Job, Path]:
    """Start a long run, `send` signals once `wait` is printed, then check the clean stop and time it."""
    run_dir = bench.dir(name) / "run"
    with bench.job(run_dir, *LONG, *extra, env=env) as job:
        job.wait_for(wait)
        job.wait_for_ranks(3)
        before = set(job.checkpoints)
        t = time.monotonic()
        send(job)
        rc = job.finish(90)
    ended(chk, job, rc)
    chk.expect(rc == rc_expected, f"exit {rc}, expected {rc_expected}")
    steps = whole(chk, run_dir)
    chk.expect(bool(steps), "no checkpoint")
    markers(chk, run_dir, preempted=True, failed=None)
    if (run_dir / "PREEMPTED").exists():
        text = (run_dir / "PREEMPTED").read_text().strip()
        chk.expect(text == f"stopped at step {steps[-1]} of 4000 on {signal_name}", f"PREEMPTED says {text!r}")
    no_sigkill(chk, job)
    chk.expect(sorted(job.exited) == [0, 1, 2], "not every rank was seen to end")
    new = [n for n in job.checkpoints if n not in before]
    if new and job.exited:
        whole_at = job.checkpoints[new[-1]]
        last = max(job.exited.values())
        chk.expect(last - whole_at <= 10, f"a rank ended {last - whole_at:.1f} s after the final checkpoint")
        chk.note(f"checkpoint whole {whole_at - t:.1f} s after the signal, ranks gone "
                 f"{', '.join(f'{r}:{x - whole_at:+.1f}' for r, x in sorted(job.exited.items()))} s after it")
        bench.times.append(f"{name}: signal -> final checkpoint whole {whole_at - t:.2f} s; ranks gone after it "
                           f"{', '.join(f'rank {r} {x - whole_at:+.2f} s' for r, x in sorted(job.exited.items()))}; "
                           f"all gone {last - t:.2f} s after the signal")
    return job, run_dir


@fault("signal_sigterm_every_process", "whole checkpoint, PREEMPTED (SIGTERM), no SIGKILL, ranks gone <= 10 s after")
def _(bench: Bench, chk: Check) -> None:
    stop_by_signal(bench, chk, "signal_sigterm_every_process", lambda job: job.signal_tree(signal.SIGTERM),
                   rc_expected=1, signal_name="SIGTERM")


@fault("signal_sigusr1_model_ranks", "exit 0, whole checkpoint, PREEMPTED (SIGUSR1), ranks gone <= 10 s after")
def _(bench: Bench, chk: Check) -> None:
    def send(job):
        job.signal_rank(1, signal.SIGUSR1)
        job.signal_rank(2, signal.SIGUSR1)
    stop_by_signal(bench, chk, "signal_sigusr1_model_ranks", send, rc_expected=0, signal_name="SIGUSR1")


@fault("signal_sigusr1_one_model_rank", "the vote stops both model ranks at one step: exit 0, PREEMPTED")
def _(bench: Bench, chk: Check) -> None:
    job, _ = stop_by_signal(bench, chk, "signal_sigusr1_one_model_rank",
                            lambda job: job.signal_rank(2, signal.SIGUSR1), rc_expected=0,
                            signal_name="a signal to another rank")   # the marker is the first model rank's
    chk.said(job.text, r"stopping at step \d+ on a signal on another rank")


@fault("signal_sigterm_torchrun_only", "torchrun forwards it: whole checkpoint, PREEMPTED, no SIGKILL")
def _(bench: Bench, chk: Check) -> None:
    stop_by_signal(bench, chk, "signal_sigterm_torchrun_only", lambda job: job.proc.send_signal(signal.SIGTERM),
                   rc_expected=1, signal_name="SIGTERM")


@fault("signal_sigint_torchrun", "Ctrl-C (SIGINT, torchrun passes it on): whole checkpoint, PREEMPTED, no SIGKILL")
def _(bench: Bench, chk: Check) -> None:
    # Ctrl-C is a stop like SIGTERM: the step ends and is saved (a second Ctrl-C would stop at once).
    stop_by_signal(bench, chk, "signal_sigint_torchrun", lambda job: job.proc.send_signal(signal.SIGINT),
                   rc_expected=1, signal_name="SIGINT")


@fault("signal_two_in_a_row", "USR1 then SIGTERM to every process: one clean stop, PREEMPTED names the first")
def _(bench: Bench, chk: Check) -> None:
    def send(job):
        job.signal_rank(1, signal.SIGUSR1)
        job.signal_rank(2, signal.SIGUSR1)
        time.sleep(0.3)
        job.signal_tree(signal.SIGTERM)
    stop_by_signal(bench, chk, "signal_two_in_a_row", send, rc_expected=1, signal_name="SIGUSR1")


@fault("signal_sigterm_during_startup", "SIGTERM once the ranks are up: clean stop at an early step, or none")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("signal_sigterm_during_startup") / "run"
    with bench.job(run_dir, *LONG) as job:
        job.wait_for(r"rank map: world size 3")       # process groups formed, encoders not loaded yet
        job.wait_for_ranks(3)
        job.signal_tree(signal.SIGTERM)
        rc = job.finish(90)
    ended(chk, job, rc)
    no_sigkill(chk, job)
    steps = whole(chk, run_dir)
    # A stop before the first step has nothing to save; after it, the stop must be whole and marked.
    chk.expect(bool(steps) == (run_dir / "PREEMPTED").exists(), "PREEMPTED without a checkpoint, or the reverse")
    markers(chk, run_dir, preempted=bool(steps), failed=None)


@fault("signal_sigterm_before_handlers", "SIGTERM while Python starts: every rank dies at once, nothing written")
def _(bench: Bench, chk: Check) -> None:
    run_dir = bench.dir("signal_sigterm_before_handlers") / "run"
    with bench.job(run_dir, *LONG) as job:
        job.wait_for_ranks(3)
        job.signal_tree(signal.SIGTERM)
        rc = job.finish(90)
    ended(chk, job, rc)
    chk.expect(rc != 0, "exited 0")
    no_sigkill(chk, job)
    chk.expect(not (run_dir / "PREEMPTED").exists(), "PREEMPTED written")
    whole(chk, run_dir)


SLOW_SAVE = """
import time
import sd3.checkpoint.write as checkpoint
original = checkpoint.save_file
def save_file(*a, **k):
    time.sleep(1.5)              # a slow filesystem: each weights file takes 1.5 s more
    return original(*a, **k)
checkpoint.save_file = save_file
"""


@fault("signal_sigterm_during_save", "SIGTERM mid-save: that checkpoint and the final one whole, PREEMPTED")
def _(bench: Bench, chk: Check) -> None:
    base = bench.dir("signal_sigterm_during_save")
    run_dir = base / "run"
    with bench.job(run_dir, "--steps", "4000", "--log.save_every=5", env=inject(base / "inject", SLOW_SAVE)) as job:
        root = run_dir / "checkpoints"
        deadline = time.monotonic() + 150
        while not list(root.glob(".step_00000005.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        chk.expect(bool(list(root.glob(".step_00000005.tmp-*"))), "never saw the save in progress")
        job.wait_for_ranks(3)
        job.signal_tree(signal.SIGTERM)
        rc = job.finish(120)
    ended(chk, job, rc)
    steps = whole(chk, run_dir)
    chk.expect(5 in steps and len(steps) >= 2, f"checkpoints {steps}: the one being saved and the final one")
    markers(chk, run_dir, preempted=True, failed=None)
    no_sigkill(chk, job)


# --------------------------------------------------------------------------------------------------
# Under runjob_SLURM.sh (fake SLURM, real torchrun and trainer)
# --------------------------------------------------------------------------------------------------


def slurm_job(bench: Bench, name: str) -> tuple[Job, Path, Path]:
    base = bench.dir(name)
    fake = base / "fake"
    (fake / "bin").mkdir(parents=True)
    for exe, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        _write_exe(fake / "bin" / exe, text)
    _write_exe(fake / "bin" / "scancel", FAKE_SCANCEL, python=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "NPROC_", "OMP_"))}
    env.update({
        "PATH": os.pathsep.join([str(fake / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]),
        "FAKE_SLURM_DIR": str(fake), "FAKE_HOSTS": "localhost", "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NAME": name, "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_PER_TASK": "2", "NPROC_PER_NODE": "3", "RDZV_PORT": str(free_port()), "PRESET": "tiny",
        "RUN_DIR": str(base / "run"),
    })
    job = Job(["bash", str(ROOT / "runjob_SLURM.sh"), *asset_args(bench.assets), *LONG], env=env,
              run_dir=base / "run")
    return job, base / "run", fake


def requeued(fake: Path) -> bool:
    log = fake / "calls.log"
    return log.exists() and "scontrol requeue" in log.read_text()


@fault("slurm_loader_oom_killed", "not requeued, 'a rank failed', the reason printed, no PREEMPTED")
def _(bench: Bench, chk: Check) -> None:
    job, run_dir, fake = slurm_job(bench, "slurm_loader_oom_killed")
    with job:
        job.wait_for(r"step 3/4000")
        job.wait_for_ranks(3)
        job.signal_rank(0, signal.SIGKILL)
        rc = job.finish(120)
    ended(chk, job, rc)
    chk.expect(rc != 0, "the job exited 0")
    chk.said(job.text, r"a rank failed \(exit \d+\): not requeueing")
    chk.said(job.text, r"reason \(.*FAILED\): .*loader rank 0 exited or crashed")
    chk.expect(not requeued(fake), "requeued")
    chk.expect(not (run_dir / "PREEMPTED").exists(), "PREEMPTED left")


@fault("slurm_time_limit_warning", "USR1 to the batch shell: whole checkpoint, exit 0, requeued")
def _(bench: Bench, chk: Check) -> None:
    job, run_dir, fake = slurm_job(bench, "slurm_time_limit_warning")
    with job:
        job.wait_for(r"step 3/4000")
        job.wait_for_ranks(3)
        job.proc.send_signal(signal.SIGUSR1)
        rc = job.finish(120)
    ended(chk, job, rc)
    chk.expect(rc == 0, "the job failed")
    chk.said(job.text, r"stopped for the time limit: requeueing")
    chk.expect(requeued(fake), "not requeued")
    whole(chk, run_dir)
    no_sigkill(chk, job)


@fault("slurm_scancel", "SIGTERM to the shell and the step: whole checkpoint, not requeued")
def _(bench: Bench, chk: Check) -> None:
    job, run_dir, fake = slurm_job(bench, "slurm_scancel")
    with job:
        job.wait_for(r"step 3/4000")
        job.wait_for_ranks(3)
        job.signal_tree(signal.SIGTERM)             # slurmstepd: every process of the job, the shell included
        rc = job.finish(120)
    ended(chk, job, rc)
    chk.said(job.text, r"cancelled/preempted \(SIGTERM\): not requeueing")
    chk.expect(not requeued(fake), "requeued")
    chk.expect(bool(whole(chk, run_dir)), "no checkpoint")
    no_sigkill(chk, job)


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated fault names (or prefixes)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    if args.list:
        for name, expected, _ in FAULTS:
            print(f"{name:34s} {expected}")
        return 0
    chosen = FAULTS
    if args.only:
        wanted = args.only.split(",")
        chosen = [f for f in FAULTS if any(f[0].startswith(w) for w in wanted)]
    global SCRATCH
    root = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    SCRATCH = str(root)
    start = time.monotonic()
    try:
        bench = Bench(root)
        ok_count = 0
        for name, expected, fn in chosen:
            chk, t = Check(), time.monotonic()
            try:
                fn(bench, chk)
            except Exception as error:
                chk.missed.append(f"{type(error).__name__}: {_short(str(error), 200)}")
                if os.environ.get("BENCH_FAULTS_DEBUG"):
                    traceback.print_exc()
            ok = not chk.missed
            ok_count += ok
            observed = "; ".join(chk.facts) + ("" if ok else " | MISSED: " + "; ".join(chk.missed))
            print(f"{name} | expected: {expected} | observed: {observed} | {'ok' if ok else 'NOT OK'} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
        print("\ntimes (monotonic clock, process table polled every 50 ms):")
        for line in bench.times:
            print(f"  {line}")
        print(f"\nwall: {time.monotonic() - start:.0f} s")
        print(f"faults_tried: {len(chosen)}")
        print(f"faults_ok: {ok_count}")
        return 0 if ok_count == len(chosen) else 1
    finally:
        if args.keep:
            print(f"scratch folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
