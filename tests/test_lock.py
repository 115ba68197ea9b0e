"""The run directory's lock: one run writes a run directory; a lock is taken over only when its holder is
provably gone, and that is said. (With real processes: tests/test_faults.py.)"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from sd3.lock import NAME, RunDirLocked, RunLock


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def plant(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "started": "2026-01-01T00:00:00+00:00",
            "slurm_job_id": "", "command": "src/train.py"}
    (run_dir / NAME).write_text(json.dumps(base | holder) + "\n")


def test_a_held_run_directory_is_refused_naming_the_holder_until_it_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock.take(tmp_path / "run")
    holder = json.loads((tmp_path / "run" / NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["slurm_job_id"] == "4242"
    monkeypatch.setenv("SLURM_JOB_ID", "4243")   # another job on the same directory
    with pytest.raises(RunDirLocked) as refused:
        RunLock.take(tmp_path / "run")
    text = str(refused.value)
    assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}, SLURM job 4242, started" in text
    assert "another --run_dir" in text and f"remove {tmp_path / 'run' / NAME}" in text and "\n" not in text
    lock.release()
    assert not (tmp_path / "run" / NAME).exists()
    RunLock.take(tmp_path / "run").release()


@pytest.mark.parametrize("holder, reason", [
    ({"pid": "dead"}, r"pid \d+ on \S+, started .*: no such process"),
    ({"pid_start": "1"}, r"no such process"),                                   # the pid was reused since
    ({"host": "node-7", "slurm_job_id": "4242"}, r"SLURM job 4242, .*an earlier run of this SLURM job"),
    ({"host": "node-7"}, r"pid \d+ on node-7, started .*: its lock went untouched for 0.3 s"),
])
def test_a_lock_whose_holder_is_gone_is_taken_over_and_said(tmp_path, monkeypatch, holder, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if holder.get("pid") == "dead":
        holder["pid"] = dead_pid()
    plant(tmp_path, **holder)
    said = []
    lock = RunLock.take(tmp_path, log=said.append, stale_s=0.3)
    assert len(said) == 1 and "took over the lock of a run that is gone" in said[0], said
    assert re.search(reason, said[0]), said[0]
    assert json.loads((tmp_path / NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_that_is_still_touched_is_refused(tmp_path):
    plant(tmp_path, host="node-7")
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            os.utime(tmp_path / NAME)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunDirLocked, match=r"in use by another run \(pid \d+ on node-7"):
            RunLock.take(tmp_path, stale_s=1.0)
    finally:
        stop.set()
        thread.join()
    assert json.loads((tmp_path / NAME).read_text())["host"] == "node-7"    # untouched


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = RunLock.take(tmp_path)
    plant(tmp_path, host="node-7")          # replaced behind its back (a take-over that judged it gone)
    lock.release()
    assert json.loads((tmp_path / NAME).read_text())["host"] == "node-7"


def test_the_holder_touches_its_lock_while_it_runs(tmp_path):
    lock = RunLock.take(tmp_path, heartbeat_s=0.05)
    os.utime(tmp_path / NAME, (0, 0))
    try:
        for _ in range(100):
            if (tmp_path / NAME).stat().st_mtime > 0:
                break
            threading.Event().wait(0.02)
        assert (tmp_path / NAME).stat().st_mtime > 0
    finally:
        lock.release()
