"""One run per run directory: `<run_dir>/LOCK` names the process that writes the run, while it runs.

    lock = RunLock.take(run_dir, log=print)    # raises RunDirLocked naming the holder, or returns the lock
    ...                                        # the run
    lock.release()                             # on every exit path (a killed run leaves a stale lock)

The lock file is created whole or not at all (written under a temporary name, then hard-linked to LOCK,
which fails when LOCK exists: atomic on local filesystems and NFS alike). It holds one JSON line: host,
pid, the process's start time (so a reused pid is not mistaken for the holder), when the run started,
the SLURM job id when there is one, and the command. While the run lives, a thread touches the file
every `HEARTBEAT_S` seconds.

A lock found in place is taken over only when its holder is provably gone, and that is said in one line:
- the same host, and no process with its pid and start time exists (killed, crashed, or the machine
  rebooted);
- the same SLURM job id: SLURM requeues a job only after all of its earlier run ended;
- another host, and the file's modification time does not change for `STALE_S` seconds, watched from
  here (a node that crashed stops touching it; no clock has to agree with another's).
Otherwise the run stops at once with one line naming the holder and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

NAME = "LOCK"
HEARTBEAT_S = 30.0
"""How often the holder touches its lock."""
STALE_S = 3 * HEARTBEAT_S
"""How long another host's lock must stay untouched, watched from here, before it counts as abandoned."""


class RunDirLocked(RuntimeError):
    """Another run holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks after boot: /proc/<pid>/stat field 22), "?" where there
    is no /proc and the pid lives, or None when no such process exists."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def _holder_text(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started', '?')}"


class RunLock:
    """The lock of one run directory, held by this process."""

    def __init__(self, path: Path, content: str, heartbeat_s: float):
        self.path, self.content = path, content
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="run-lock")
        self._thread.start()

    # -- taking it ----------------------------------------------------------------------------------------
    @classmethod
    def take(cls, run_dir: str | Path, *, log: Callable[[str], None] = print, heartbeat_s: float = HEARTBEAT_S,
             stale_s: float = STALE_S) -> RunLock:
        """Take the lock of `run_dir` (created if needed), taking over an abandoned one (said through `log`).
        Raises RunDirLocked, naming the holder, when another run holds it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / NAME
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "command": " ".join(sys.argv)}
        content = json.dumps(me) + "\n"
        for _ in range(3):  # a take-over that races with another process's starts again
            if cls._create(path, content):
                return cls(path, content, heartbeat_s)
            try:
                seen = path.read_text()
            except FileNotFoundError:
                continue   # released meanwhile
            gone = cls._gone(path, seen, me, stale_s)
            if gone is None:
                raise RunDirLocked(cls._refusal(run_dir, seen))
            if cls._remove_if_unchanged(path, seen):
                log(f"{run_dir}: took over the lock of a run that is gone ({gone})")
        raise RunDirLocked(f"{run_dir}: could not take {path} (other processes keep taking it); check what runs "
                           "on this run directory")

    @staticmethod
    def _create(path: Path, content: str) -> bool:
        tmp = path.with_name(f".{NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(content)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _gone(path: Path, seen: str, me: dict, stale_s: float) -> str | None:
        """Why the holder of lock text `seen` is provably gone, or None when it may still run."""
        try:
            holder = json.loads(seen)
            host, pid = holder["host"], int(holder["pid"])
        except (ValueError, KeyError, TypeError):
            return "its lock file is unreadable"
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
            return f"{_holder_text(holder)}: an earlier run of this SLURM job, which has ended"
        if host == me["host"]:
            start = _start_time(pid)
            if start is None or (start != "?" and holder.get("pid_start") not in (None, start)):
                return f"{_holder_text(holder)}: no such process"
            return None
        # Another host: abandoned when nobody touches the file for stale_s, as watched from here.
        try:
            mark = path.stat().st_mtime_ns
        except FileNotFoundError:
            return "released meanwhile"
        deadline = time.monotonic() + stale_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, stale_s / 10))
            try:
                if path.stat().st_mtime_ns != mark or path.read_text() != seen:
                    return None
            except FileNotFoundError:
                return "released meanwhile"
        return f"{_holder_text(holder)}: its lock went untouched for {stale_s:g} s"

    @staticmethod
    def _remove_if_unchanged(path: Path, seen: str) -> bool:
        """Move the stale lock aside and remove it, unless another process replaced it meanwhile (then it is
        put back). Returns whether this process removed it."""
        aside = path.with_name(f".{NAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if aside.read_text() != seen:  # a fresh lock of a process that won the race: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    @staticmethod
    def _refusal(run_dir: Path, seen: str) -> str:
        try:
            holder = _holder_text(json.loads(seen))
        except (ValueError, TypeError):
            holder = "another process"
        return (f"{run_dir} is in use by another run ({holder}): wait for it to end, stop it, or give this run "
                f"another --run_dir. If that run is gone and this says otherwise, remove {run_dir / NAME}")

    # -- holding and releasing it -------------------------------------------------------------------------
    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it is still this process's (never another run's)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.content:
                self.path.unlink()
