"""Fault injection with real processes, shared by tests/test_faults.py and tests/benchmarks/bench_faults.py.

    assets = build_assets(tmp)                                   # demo photos + stand-in encoders, once
    with Job(torchrun(tiny_args(assets, run_dir, "--steps", "400")), run_dir=run_dir) as job:
        job.wait_for("step 3/")                                  # the output is read as it comes
        job.signal_tree(signal.SIGTERM)                          # every process of the job, as slurmstepd does
        rc = job.finish(timeout=120)                             # a hard timeout: never a hang
    job.ranks, job.exited, job.checkpoints, job.leftovers()      # pids, exit times, checkpoint times

A Job starts its command in a new session and watches its whole process tree from /proc: torchrun puts
every worker in a session of its own, so neither a process group nor a session id finds them all. Each
worker is named by the RANK torchrun gave it (its environment). Processes are recorded with their start
time, so a reused pid is never mistaken for one of ours. On the way out a Job kills whatever it started
and still runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
"""Nothing reaches the network, output arrives line by line."""


# --------------------------------------------------------------------------------------------------
# What a run needs
# --------------------------------------------------------------------------------------------------


def build_assets(root: Path) -> Path:
    """The demo dataset and the stand-in encoders under `root` (a few seconds)."""
    sys.path.insert(0, str(ROOT / "src"))
    from sd3.config import preset
    from sd3.data.demo import ensure_demo_dataset
    from sd3.encode.stand_ins import make_tiny_encoders

    cfg = preset("tiny")
    ensure_demo_dataset(root / "demo" / "64", max_res=cfg.model.max_res, multiple=cfg.pixel_multiple)
    encoders = [str(root / "enc" / name) for name in ("gemma", "bert", "clip")]
    cfg.encoders.text, cfg.encoders.pooled = tuple(encoders[:2]), encoders[2]
    make_tiny_encoders(cfg.encoders, cfg.model)
    return root


def asset_args(assets: Path, *, dataset: Path | None = None) -> list[str]:
    """Flags of a fast `tiny` run on these assets: a smaller model than the demo's, a log line per step."""
    enc = assets / "enc"
    return [f"--data.dataset={dataset or assets / 'demo' / '64'}",
            f"--encoders.text=('{enc / 'gemma'}', '{enc / 'bert'}')", f"--encoders.pooled={enc / 'clip'}",
            "--model.width=64", "--model.num_heads=2", "--model.depth=2", "--data.batch_size=4",
            "--data.decode_workers=1", "--log.every=1", "--log.sample_steps=2", "--train.warmup=2"]


def tiny_args(assets: Path, run_dir: Path, *extra: str, dataset: Path | None = None) -> list[str]:
    return ["--preset", "tiny", "--run_dir", str(run_dir), *asset_args(assets, dataset=dataset), *extra]


def torchrun(args: list[str], *, nproc: int = 3) -> list[str]:
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "src" / "train.py"), *args]


def inject(folder: Path, code: str) -> dict[str, str]:
    """Environment that makes every Python process of a job run `code` first (a sitecustomize module):
    the way to slow a loader down or make a rank raise without touching the code under test."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT / "src")])}


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start


class Job:
    """A command in its own session with its output read on a thread and its process tree watched (see
    the module docstring). `run_dir`: also note when each checkpoint directory appears."""

    POLL_S = 0.05

    def __init__(self, cmd: list[str], *, env: dict | None = None, cwd: Path = ROOT, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **QUIET_ENV, **(env or {})}, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.tree: dict[int, int] = {self.proc.pid: _stat(self.proc.pid)[2] if _stat(self.proc.pid) else 0}
        """Every process the job started: pid -> start time."""
        self.ranks: dict[int, int] = {}
        """rank -> pid of the worker torchrun started for it."""
        self.exited: dict[int, float] = {}
        """rank -> when its worker was seen gone (monotonic seconds)."""
        self.checkpoints: dict[str, float] = {}
        """step_* directory name -> when it appeared (whole: directories are renamed into place)."""
        self.returncode: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._reader.start()
        self._watcher.start()

    # -- threads --------------------------------------------------------------------------------------
    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def _watch(self) -> None:
        while True:
            done = self.proc.poll() is not None
            self._scan()
            if done and all(rank in self.exited for rank in self.ranks):
                return
            time.sleep(self.POLL_S)

    def _scan(self) -> None:
        children: dict[int, list[tuple[int, int]]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
        todo = [pid for pid, start in self.tree.items() if _alive(pid, start)]
        while todo:
            for pid, start in children.get(todo.pop(), []):
                if pid not in self.tree:
                    self.tree[pid] = start
                    todo.append(pid)
        # A worker seen between fork and exec still has torchrun's environment: look again until it has a
        # RANK (or is gone).
        named = set(self.ranks.values())
        for pid, start in list(self.tree.items()):
            if pid not in named and _alive(pid, start) and (rank := _rank_of(pid)) is not None:
                self.ranks.setdefault(rank, pid)
        now = time.monotonic()
        for rank, pid in self.ranks.items():
            if rank not in self.exited and not _alive(pid, self.tree[pid]):
                self.exited[rank] = now
        if self.run_dir is not None and (root := self.run_dir / "checkpoints").is_dir():
            with contextlib.suppress(OSError):
                for entry in os.scandir(root):
                    if re.fullmatch(r"step_\d{8}", entry.name) and entry.name not in self.checkpoints:
                        self.checkpoints[entry.name] = now

    # -- what a test does -----------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))

    def log_lines(self) -> list[str]:
        """The output split at newlines and at progress-bar carriage returns."""
        return [part for _, line in list(self.lines) for part in re.split(r"[\r\n]", line) if part]

    def wait_for(self, pattern: str, timeout: float = 180) -> float:
        """Block until a line matches the regular expression `pattern`; returns when it was printed."""
        regex, seen = re.compile(pattern), 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = list(self.lines)
            for t, line in lines[seen:]:
                if regex.search(line):
                    return t
            seen = len(lines)
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"never saw {pattern!r} (exit {self.proc.poll()}):\n{self.text[-4000:]}")

    def wait_for_ranks(self, n: int, timeout: float = 60) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while len(self.ranks) < n and time.monotonic() < deadline:
            time.sleep(self.POLL_S)
        assert len(self.ranks) >= n, f"only ranks {sorted(self.ranks)} started:\n{self.text[-3000:]}"
        return dict(self.ranks)

    def signal_rank(self, rank: int, sig: int) -> None:
        pid = self.ranks[rank]
        if _alive(pid, self.tree[pid]):
            os.kill(pid, sig)

    def signal_tree(self, sig: int) -> None:
        """`sig` to every live process of the job at once (torchrun and every worker), as slurmstepd and
        scancel do to a job step (they find its processes by cgroup)."""
        for pid, start in list(self.tree.items()):
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the job's own process, then for its watcher to see every worker gone (bounded)."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout} s:\n{self.text[-4000:]}") from None
        self._reader.join(10)
        self._watcher.join(10)
        return self.returncode

    def leftovers(self) -> list[int]:
        """Processes the job started that still run."""
        return [pid for pid, start in list(self.tree.items()) if _alive(pid, start)]

    def kill(self) -> None:
        for pid, start in list(self.tree.items()):
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None or self.leftovers():
            self._scan()
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


# --------------------------------------------------------------------------------------------------
# What a run left
# --------------------------------------------------------------------------------------------------


def steps_of(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def hidden_files(run_dir: Path) -> list[str]:
    """Temporary (hidden) files or folders left anywhere under the run directory."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*")) if run_dir.is_dir() else []


def torchrun_killed_a_worker(text: str) -> bool:
    """Whether torchrun had to SIGKILL a worker that did not stop on SIGTERM (or a worker died of SIGKILL)."""
    return "SIGKILL" in text or bool(re.search(r"exitcode\s*:?\s*-9\b", text))


def data_waits(lines: list[str]) -> list[float]:
    """The data-wait fraction of every step log line."""
    return [float(x) / 100 for line in lines for x in re.findall(r"^step \d+/\d+ .*\| data wait ([0-9.]+)%", line)]


def mount_allowed(folder: Path) -> str | None:
    """None when this process may mount a tmpfs in a private mount namespace, else why not."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs -o size=1M tmpfs '{folder}'"],
                               capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare is not installed"
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[:200]}"
    return None


def on_small_disk(cmd: list[str], *, disk: Path, options: str, copy_to: Path) -> list[str]:
    """`cmd` with `disk` (the run directory) on a tmpfs mounted with `options` ("size=10M"), in a private
    mount namespace so nothing else sees it. The tmpfs goes away with the namespace, so what the run left
    on it is copied to `copy_to` (hidden files included) first; the command's exit status is kept."""
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; disk=$2; copy=$3; shift 3; '
              '"$@"; rc=$?; cp -a "$disk/." "$copy/"; exit $rc')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", options, str(disk),
            str(copy_to), *cmd]


def damage(path: Path, how: str) -> None:
    """Damage one checkpoint file as a crash or a bad disk would: 'truncate' (half of it), 'flip' (one byte
    in the middle) or 'delete'."""
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(f"damage: how={how!r} must be 'truncate', 'flip' or 'delete'")
