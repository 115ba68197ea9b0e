"""runjob_SLURM.sh: the #SBATCH header, the commands it prints for a faked SLURM environment (1 and 4
nodes), and the end of a job for real: fake `srun`/`scancel`/`scontrol` on PATH, a step that stops on
a signal, finishes or fails, signals sent to the batch shell or to the step, and the requeue decision
that follows. The rule under test: requeue only a step that exited 0 after a clean stop (PREEMPTED) asked
for by SIGUSR1, at most MAX_REQUEUES times; a SIGTERM to the shell or any failure never requeues."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "runjob_SLURM.sh"
JOB_ID = "4242"

# A fake SLURM: scontrol expands the node list and records requeues; srun records its arguments and
# runs the task on this machine; scancel signals every process of the step, whatever its session
# (as proctrack/cgroup does), by walking /proc from the task's pid.
FAKE_SCONTROL = """#!/bin/bash
printf 'scontrol %s\\n' "$*" >> "$FAKE_SLURM_DIR/calls.log"
case $1 in
  show) printf '%s\\n' $FAKE_HOSTS ;;
  requeue) ;;
  *) exit 1 ;;
esac
"""
FAKE_SRUN = """#!/bin/bash
printf 'srun %s\\n' "$*" >> "$FAKE_SLURM_DIR/calls.log"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done   # srun's own --option=value arguments
echo $$ > "$FAKE_SLURM_DIR/step.pid"
exec "$@"
"""
FAKE_SCANCEL = """
import os, signal, sys
from pathlib import Path

fake = Path(os.environ["FAKE_SLURM_DIR"])
with open(fake / "calls.log", "a") as log:
    log.write("scancel " + " ".join(sys.argv[1:]) + "\\n")
sig = getattr(signal, "SIG" + [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--signal=")][0])
children = {}
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        continue
    children.setdefault(ppid, []).append(int(stat.parent.name))
todo = [int((fake / "step.pid").read_text())]
while todo:
    pid = todo.pop()
    todo += children.get(pid, [])
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
"""
# Stands in for `python -m torch.distributed.run ...` in the quick tests: records how it was started,
# then behaves as FAKE_MODE says:
#   finish   ends at once, exit 0 (the run reached its last step)
#   crash    ends at once, exit 1: a rank failed without any signal from outside (FAKE_MARKER: text of a
#            PREEMPTED marker written all the same, as a model rank that torchrun SIGTERMed once did)
#   preempt  waits for a signal, stops cleanly: marker naming the signal, exit 0 (torchrun exits 1 after
#            its own SIGTERM)
#   die      waits for a signal, fails while stopping: no marker, exit 1
#   done     waits for a signal, but its last step came first: no marker, exit 0
# FAKE_RC overrides the exit status; FAKE_FAILED is written to <run_dir>/FAILED (train.py's reason);
# FAKE_STOP_S is how long stopping takes (default 1 s on SIGTERM: a checkpoint inside KillWait).
FAKE_STEP = """
import json, os, signal, sys, time
from pathlib import Path

fake = Path(os.environ["FAKE_SLURM_DIR"])
argv = sys.argv[1:]
run_dir = Path([a.split("=", 1)[1] for a in argv if a.startswith("--run_dir=")][-1])
(fake / "step.json").write_text(json.dumps(
    {"argv": argv, "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}))
mode = os.environ["FAKE_MODE"]


def leave(marker, rc):
    run_dir.mkdir(parents=True, exist_ok=True)
    if marker is not None:
        (run_dir / "PREEMPTED").write_text(marker + "\\n")
    if os.environ.get("FAKE_FAILED"):
        (run_dir / "FAILED").write_text(os.environ["FAKE_FAILED"] + "\\n")
    sys.exit(int(os.environ.get("FAKE_RC", rc)))


if mode == "finish":
    leave(None, 0)
if mode == "crash":
    leave(os.environ.get("FAKE_MARKER"), 1)
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
(fake / "ready").write_text("")
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.02)                      # one training step
if not got:
    sys.exit(3)
(fake / "stopping").write_text(got[0])
time.sleep(float(os.environ.get("FAKE_STOP_S", 1.0 if got[0] == "TERM" else 0.0)))
(fake / "stopped").write_text(got[0])
if mode == "preempt":                     # stopped before its last step: checkpoint, then the marker
    leave(f"stopped at step 7 of 100 on SIG{got[0]}", 1 if got[0] == "TERM" else 0)
leave(None, 1 if mode == "die" else 0)
"""
# src/train.py for the end-to-end tests under the real torchrun, as FAKE_TRAIN says:
#   usr1  every worker stops on SIGUSR1; rank 0 writes the marker
#   oom   rank 0 (a loader) is SIGKILLed once rank 1 runs, as the kernel's OOM killer does; torchrun
#         SIGTERMs rank 1 (a model rank), which stops "cleanly" and, as train.py once did, writes the
#         marker, and also FAILED
FAKE_TRAIN = """
import os, signal, sys, time
from pathlib import Path

got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
rank = os.environ["RANK"]
mode = os.environ["FAKE_TRAIN"]
run_dir = Path([a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--run_dir=")][-1])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / f"ready.{rank}").write_text("")
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    if mode == "oom" and rank == "0" and (run_dir / "ready.1").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)                      # one training step
if not got:
    sys.exit(3)
(run_dir / f"stopped.{rank}").write_text(got[0])
if mode == "oom":
    (run_dir / "PREEMPTED").write_text(f"stopped at step 7 of 100 on SIG{got[0]}\\n")
    (run_dir / "FAILED").write_text("loader rank 0 died (SIGKILL)\\n")
elif rank == "0":
    (run_dir / "PREEMPTED").write_text(f"stopped at step 7 of 100 on SIG{got[0]}\\n")
"""


def _write_exe(path: Path, text: str, python: bool = False) -> None:
    path.write_text((f"#!{sys.executable}\n" if python else "") + textwrap.dedent(text).lstrip("\n"))
    path.chmod(0o755)


@pytest.fixture
def slurm(tmp_path):
    """A faked SLURM environment; returns (env, fake_dir). Set FAKE_HOSTS and SLURM_* per test."""
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True)
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    _write_exe(bin_dir / "srun", FAKE_SRUN)
    _write_exe(bin_dir / "scancel", FAKE_SCANCEL, python=True)
    submit = tmp_path / "submit"
    submit.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "NPROC_", "OMP_"))}
    env.pop("PRESET", None)
    env.pop("RUN_DIR", None)
    env.update({
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
        "FAKE_SLURM_DIR": str(fake), "FAKE_HOSTS": "gpu017",
        "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu017",
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "SLURM_JOB_NAME": "myjob",
        "SLURM_SUBMIT_DIR": str(submit),
    })
    return env, fake


def _calls(fake: Path) -> list[str]:
    log = fake / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _dry_run(env, args, timeout=30):
    return subprocess.run(["bash", str(SCRIPT), *args], env={**env, "DRY_RUN": "1"}, capture_output=True,
                          text=True, timeout=timeout)


def _srun_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, stdout
    return lines[0]


def _split_srun(argv: list[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """srun argv -> (srun options, node wrapper, torchrun argv, train.py argv)."""
    assert argv[0] == "srun"
    wrap = argv.index("bash")
    run = argv.index("-m")
    script = argv.index("src/train.py")
    return argv[1:wrap], argv[wrap:run - 1], argv[run - 1:script], argv[script + 1:]


# Arguments a user passes through: spaces, quotes, braces, $ and backquotes must arrive unchanged.
PASSTHROUGH = [
    "--train.lr=3e-4",
    "--ranks.loader_to_model={0:[1,2]}",
    "--ranks.loader_to_model={0: [1, 2]}",
    "--log.wandb_name=two words",
    "--data.dataset=it's \"quoted\" $HOME `date`",
    "--encoders.text", "a,b",
]

# --------------------------------------------------------------------------------------------------
# Header and static checks
# --------------------------------------------------------------------------------------------------


def test_sbatch_header():
    lines = SCRIPT.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    header = [line.split(None, 1)[1] for line in lines[:first_command] if line.startswith("#SBATCH ")]
    assert not [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    options = dict(opt.split("=", 1) if "=" in opt else (opt, "") for opt in header)
    assert options["--nodes"] == "1"
    assert options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "8"
    assert int(options["--cpus-per-task"]) > 0
    assert re.fullmatch(r"\d+:\d\d:\d\d|\d+-\d+:\d\d:\d\d", options["--time"])
    assert options["--output"] == "logs/%x-%j.out"
    assert options["--open-mode"] == "append"
    assert "--requeue" in options
    assert options["--signal"] == "B:USR1@120"
    # the fallback for SLURM_GPUS_ON_NODE matches the header
    assert re.search(r"^GPUS_PER_NODE_DEFAULT=8\b", SCRIPT.read_text(), re.M)


def test_no_secret_is_written_in_the_script():
    text = SCRIPT.read_text()
    assert not re.search(r"^\s*(export\s+)?(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN)=", text, re.M)
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodes", "nodelist", "hosts"), [
    (1, "gpu017", ["gpu017"]),
    (4, "gpu[017-020]", ["gpu017", "gpu018", "gpu019", "gpu020"]),
])
def test_dry_run_commands(slurm, nodes, nodelist, hosts):
    env, fake = slurm
    env.update(SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=nodelist, FAKE_HOSTS=" ".join(hosts))
    result = _dry_run(env, PASSTHROUGH)
    assert result.returncode == 0, result.stderr
    srun_opts, wrapper, torchrun, train = _split_srun(shlex.split(_srun_line(result.stdout)))

    # one task per node, all of the task's CPUs, a failing node ends the step
    assert f"--nodes={nodes}" in srun_opts and f"--ntasks={nodes}" in srun_opts
    assert "--ntasks-per-node=1" in srun_opts and "--kill-on-bad-exit=1" in srun_opts
    assert "--cpus-per-task=64" in srun_opts
    # torchrun starts with SIGUSR1 ignored
    assert wrapper[:2] == ["bash", "-c"] and 'trap "" USR1; exec "$@"' in wrapper[2]
    assert torchrun[:3] == ["python", "-m", "torch.distributed.run"]
    assert f"--nnodes={nodes}" in torchrun
    assert "--nproc_per_node=8" in torchrun
    assert "--rdzv_backend=c10d" in torchrun
    assert f"--rdzv_endpoint={hosts[0]}:29504" in torchrun
    assert f"--rdzv_id={JOB_ID}" in torchrun
    assert train == ["--preset=sd3_256", "--run_dir=runs/myjob", "--resume=auto", *PASSTHROUGH]

    assert f"export OMP_NUM_THREADS={64 // 8}" in result.stdout
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in result.stdout
    assert f"scancel --signal=USR1 {JOB_ID}" in result.stdout
    assert f"scontrol requeue {JOB_ID}" in result.stdout
    assert "runs/myjob/PREEMPTED" in result.stdout
    # the requeue rule: a clean USR1 stop only, capped; SIGTERM and failures never requeue
    assert "ONLY if the step exited 0, runs/myjob/PREEMPTED exists" in result.stdout
    assert "SLURM_RESTART_COUNT (0) < MAX_REQUEUES (20), else exit 1" in result.stdout
    assert "SIGTERM to this shell (scancel, preemption): never requeued from here" in result.stdout
    assert "any other non-zero exit of the step (also after SIGUSR1) is a failure: no requeue" in result.stdout
    assert "runs/myjob/FAILED" in result.stdout
    # nothing was started: scontrol only expanded the node list
    assert _calls(fake) == [f"scontrol show hostnames {nodelist}"]


def test_dry_run_line_pastes_back_into_bash(slurm, tmp_path):
    """The printed srun line, run by bash, gives srun exactly the arguments the script builds."""
    env, _ = slurm
    line = _srun_line(_dry_run(env, PASSTHROUGH).stdout)
    dump = tmp_path / "argv.json"
    spy = tmp_path / "spy"
    spy.mkdir()
    _write_exe(spy / "srun", f"import json, sys\nopen({str(dump)!r}, 'w').write(json.dumps(sys.argv[1:]))\n",
               python=True)
    subprocess.run(["bash", "-c", line], env={**env, "PATH": f"{spy}{os.pathsep}{env['PATH']}"},
                   check=True, timeout=30)
    argv = json.loads(dump.read_text())
    assert argv[-len(PASSTHROUGH):] == PASSTHROUGH
    assert _split_srun(["srun", *argv]) == _split_srun(shlex.split(line))


def test_dry_run_settings_from_the_environment(slurm):
    env, _ = slurm
    env.update(PRESET="tiny", RUN_DIR="runs/stage 2", RDZV_PORT="30123", RDZV_HOST="10.0.0.7",
               NPROC_PER_NODE="3", OMP_NUM_THREADS="5", MAX_REQUEUES="4", SLURM_RESTART_COUNT="2")
    del env["SLURM_GPUS_ON_NODE"], env["SLURM_CPUS_PER_TASK"]
    result = _dry_run(env, ["--run_dir", "runs/override"])
    assert result.returncode == 0, result.stderr
    srun_opts, _, torchrun, train = _split_srun(shlex.split(_srun_line(result.stdout)))
    assert not [o for o in srun_opts if o.startswith("--cpus-per-task")]
    assert "--nproc_per_node=3" in torchrun and "--rdzv_endpoint=10.0.0.7:30123" in torchrun
    assert train == ["--preset=tiny", "--run_dir=runs/stage 2", "--resume=auto", "--run_dir", "runs/override"]
    assert "export OMP_NUM_THREADS=5" in result.stdout
    # the marker is looked for where train.py will write: the last --run_dir wins
    assert "runs/override/PREEMPTED" in result.stdout and "runs/override/FAILED" in result.stdout
    assert "SLURM_RESTART_COUNT (2) < MAX_REQUEUES (4)" in result.stdout


def test_gpus_per_node_falls_back_to_the_header(slurm):
    env, _ = slurm
    del env["SLURM_GPUS_ON_NODE"]
    result = _dry_run(env, [])
    assert "--nproc_per_node=8" in shlex.split(_srun_line(result.stdout))


@pytest.mark.parametrize(("change", "message"), [
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set: submit with 'sbatch runjob_SLURM.sh"),
    ({"SLURM_NNODES": "2"}, "SLURM_NNODES=2 but gpu017 expands to 1 hosts"),
    ({"NPROC_PER_NODE": "eight"}, "processes per node 'eight' is not a positive int"),
    ({"MAX_REQUEUES": "-1"}, "MAX_REQUEUES='-1' is not a whole number"),
    ({"MAX_REQUEUES": "many"}, "MAX_REQUEUES='many' is not a whole number"),
    ({"RUN_DIR": ""}, None),  # empty RUN_DIR falls back to runs/<job name>
])
def test_bad_environment_is_named(slurm, change, message):
    env, _ = slurm
    for key, value in change.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    result = _dry_run(env, [])
    if message is None:
        assert result.returncode == 0 and "--run_dir=runs/myjob" in result.stdout
    else:
        assert result.returncode == 2 and message in result.stderr


def test_empty_run_dir_argument_is_refused(slurm):
    env, _ = slurm
    result = _dry_run(env, ["--run_dir="])
    assert result.returncode == 2 and "the run directory is empty" in result.stderr


# --------------------------------------------------------------------------------------------------
# The signal and requeue path, run for real with the fake SLURM
# --------------------------------------------------------------------------------------------------


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the batch script ended before {path.name} appeared: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


class Batch:
    """The batch script run for real (no DRY_RUN) with a hard timeout; whatever happened, every process
    it started is killed on the way out if it still runs."""

    def __init__(self, env, args=()):
        self.proc = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=60) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Only while the shell still runs is its pid surely ours (a reaped pid can be reused). Leftover
        # workers of a shell that already ended exit on their own deadline (30 s, 60 s).
        if self.proc.poll() is None:
            for pid in reversed(_process_tree(self.proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.communicate(timeout=10)


@pytest.fixture
def step(slurm, tmp_path):
    """The fake SLURM plus a fake `python` standing in for torchrun and its workers."""
    env, fake = slurm
    step_bin = tmp_path / "step_bin"
    step_bin.mkdir()
    _write_exe(step_bin / "python", FAKE_STEP, python=True)
    env["PATH"] = f"{step_bin}{os.pathsep}{env['PATH']}"
    env["RUN_DIR"] = str(tmp_path / "run")
    return env, fake, tmp_path / "run" / "PREEMPTED"


def _step_info(fake: Path) -> dict:
    return json.loads((fake / "step.json").read_text())


def _requeued(fake: Path) -> bool:
    return f"scontrol requeue {JOB_ID}" in _calls(fake)


def test_time_limit_warning_stops_the_workers_and_requeues(step):
    env, fake, marker = step
    env["FAKE_MODE"] = "preempt"
    with Batch(env, ["--log.wandb_name=two words"]) as batch:
        _wait_for(fake / "ready", batch.proc, 30)
        batch.signal(signal.SIGUSR1)              # what --signal=B:USR1@120 does
        rc, out = batch.finish()
    assert rc == 0, out
    info = _step_info(fake)
    assert info["usr1_ignored"], "the step's main process (torchrun) must start with SIGUSR1 ignored"
    assert info["argv"][-2:] == ["--resume=auto", "--log.wandb_name=two words"]
    assert (fake / "stopped").read_text() == "USR1"   # the worker got the forwarded warning
    assert "step ended with exit status 0" in out      # the batch shell outlived the signal
    assert "stopped for the time limit: requeueing" in out
    assert "stopped at step 7 of 100 on SIGUSR1" in out   # what the marker said
    calls = _calls(fake)
    assert f"scancel --signal=USR1 {JOB_ID}" in calls
    assert calls[-1] == f"scontrol requeue {JOB_ID}"
    assert not marker.exists()


def test_usr1_sent_to_the_step_only_also_requeues(step):
    """`scancel --signal=USR1 <job>` by hand reaches the workers, not the shell: the marker decides."""
    env, fake, marker = step
    env["FAKE_MODE"] = "preempt"
    with Batch(env) as batch:
        _wait_for(fake / "ready", batch.proc, 30)
        subprocess.run(["scancel", "--signal=USR1", JOB_ID], env=env, check=True, timeout=30)
        rc, out = batch.finish()
    assert rc == 0, out
    assert (fake / "stopped").read_text() == "USR1"
    assert _calls(fake)[-1] == f"scontrol requeue {JOB_ID}"
    assert "stopped on a USR1 sent to the step: requeueing" in out
    assert not marker.exists()


@pytest.mark.parametrize("warned_first", [False, True])
def test_sigterm_waits_for_the_checkpoint_and_does_not_requeue(step, warned_first):
    """scancel / preemption: SLURM sends SIGTERM to the step and to the shell. The shell must live until
    the workers have written their checkpoint (the job ends with the batch shell) and not requeue, also
    when the time-limit warning came first (the job is then ending: its limit, or a cancel)."""
    env, fake, marker = step
    env["FAKE_MODE"] = "preempt"
    env["FAKE_STOP_S"] = "1.0"                  # a checkpoint written inside KillWait
    with Batch(env) as batch:
        _wait_for(fake / "ready", batch.proc, 30)
        if warned_first:
            batch.signal(signal.SIGUSR1)
            _wait_for(fake / "stopping", batch.proc, 30)
        else:
            subprocess.run(["scancel", "--signal=TERM", JOB_ID], env=env, check=True, timeout=30)
        batch.signal(signal.SIGTERM)
        rc, out = batch.finish()
    stopped_on = "USR1" if warned_first else "TERM"
    assert (fake / "stopped").read_text() == stopped_on
    # the step's own status: torchrun exits 1 after SIGTERM, 0 after a clean USR1 stop
    assert rc == (0 if warned_first else 1), out
    assert out.index("SIGTERM") < out.index(f"step ended with exit status {rc}")
    assert "cancelled/preempted (SIGTERM): not requeueing" in out
    assert ("the SIGTERM came after the time-limit warning" in out) == warned_first
    assert f"stopped at step 7 of 100 on SIG{stopped_on}" in out
    assert not _requeued(fake)
    assert not marker.exists()                 # removed: only the shell that outlived the worker does that


def test_sigterm_to_the_step_only_does_not_requeue(step):
    """A SIGTERM that reaches the step but not this shell (`scancel --signal=TERM <job>`), with a step
    that still exits 0: the marker names SIGTERM, so this was no USR1 stop."""
    env, fake, marker = step
    env.update(FAKE_MODE="preempt", FAKE_RC="0")
    with Batch(env) as batch:
        _wait_for(fake / "ready", batch.proc, 30)
        subprocess.run(["scancel", "--signal=TERM", JOB_ID], env=env, check=True, timeout=30)
        rc, out = batch.finish()
    assert rc == 0, out
    assert (fake / "stopped").read_text() == "TERM"
    assert "cancelled/preempted (SIGTERM): not requeueing" in out
    assert not _requeued(fake)
    assert not marker.exists()


def test_finished_run_is_not_requeued(step):
    env, fake, _ = step
    env["FAKE_MODE"] = "finish"
    with Batch(env) as batch:
        rc, out = batch.finish()
    assert rc == 0, out
    assert "the run finished: not requeueing" in out
    assert not [c for c in _calls(fake) if "requeue" in c or "scancel" in c]


@pytest.mark.parametrize(("marker_text", "failed", "rc"), [
    (None, None, 1),                                              # no marker, no reason: the log says why
    # the operator's case: the loader was OOM-killed, torchrun SIGTERMed the model ranks, they stopped
    # and left a marker, torchrun exited 1. Requeueing it would fail the same way forever.
    ("stopped at step 7 of 100 on SIGTERM", "loader rank 0 died (SIGKILL)", 1),
    ("stopped at step 7 of 100 on a peer signal", None, 1),       # the exit status alone decides
    (None, "disk full while writing checkpoint-00000007", 2),     # the step's status is the job's
])
def test_failed_step_is_not_requeued(step, marker_text, failed, rc):
    env, fake, marker = step
    env.update(FAKE_MODE="crash", FAKE_RC=str(rc))
    if marker_text:
        env["FAKE_MARKER"] = marker_text
    if failed:
        env["FAKE_FAILED"] = failed
    with Batch(env) as batch:
        got_rc, out = batch.finish()
    assert got_rc == rc, out
    assert f"a rank failed (exit {rc}): not requeueing" in out
    if failed:
        assert f"reason ({marker.parent / 'FAILED'}): {failed}" in out
        assert (marker.parent / "FAILED").read_text() == failed + "\n"   # left for the operator
    else:
        assert "the first error in the log above says why" in out
    assert not _requeued(fake)
    assert not marker.exists()          # a stale marker must not fool the next job


@pytest.mark.parametrize(("mode", "rc", "log_line"), [
    ("done", 0, "the run finished (its last step came before the time-limit warning"),
    ("die", 1, "a rank failed (exit 1): not requeueing"),       # failed after the warning: still a failure
    ("preempt", 1, "a rank failed (exit 1): not requeueing"),   # marker written, but a rank failed after it
])
def test_warning_without_a_clean_stop_is_not_requeued(step, mode, rc, log_line):
    env, fake, marker = step
    env["FAKE_MODE"] = mode
    if mode == "preempt":
        env["FAKE_RC"] = "1"
    with Batch(env) as batch:
        _wait_for(fake / "ready", batch.proc, 30)
        batch.signal(signal.SIGUSR1)
        got_rc, out = batch.finish()
    assert got_rc == rc, out
    assert (fake / "stopped").read_text() == "USR1"
    assert log_line in out
    assert ("the failure came after the time-limit warning (SIGUSR1)" in out) == (rc != 0)
    assert not _requeued(fake)
    assert not marker.exists()


@pytest.mark.parametrize(("max_requeues", "restarts", "requeued"), [
    (None, "19", True),     # default 20: the 20th requeue still happens
    (None, "20", False),
    ("3", None, True),      # the first run of a submission: SLURM_RESTART_COUNT is unset
    ("3", "3", False),
    ("0", None, False),     # never requeue
])
def test_requeues_are_capped(step, max_requeues, restarts, requeued):
    env, fake, marker = step
    env["FAKE_MODE"] = "preempt"
    if max_requeues is not None:
        env["MAX_REQUEUES"] = max_requeues
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = restarts
    with Batch(env) as batch:
        _wait_for(fake / "ready", batch.proc, 30)
        batch.signal(signal.SIGUSR1)
        rc, out = batch.finish()
    assert _requeued(fake) == requeued, out
    if requeued:
        assert rc == 0 and "stopped for the time limit: requeueing" in out
    else:
        assert rc != 0
        assert "requeue limit reached" in out and "stopped for the time limit" in out
        assert f"MAX_REQUEUES={max_requeues or 20}" in out and "export MAX_REQUEUES=<n> before sbatch" in out
    assert not marker.exists()


def test_stale_files_from_an_earlier_job_are_ignored(step):
    """A marker and a failure reason left by an earlier job neither requeue this one nor name its failure."""
    env, fake, marker = step
    env["FAKE_MODE"] = "crash"
    marker.parent.mkdir(parents=True)
    marker.write_text("stopped at step 3 of 100 on SIGUSR1\n")
    (marker.parent / "FAILED").write_text("an old reason\n")
    with Batch(env) as batch:
        rc, out = batch.finish()
    assert rc == 1, out
    assert "a rank failed (exit 1): not requeueing" in out
    assert "an old reason" not in out
    assert not _requeued(fake)
    assert not marker.exists() and not (marker.parent / "FAILED").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def real_torchrun(slurm, tmp_path):
    """The fake SLURM with the real torchrun (2 workers, c10d rendezvous on this machine) running
    FAKE_TRAIN as src/train.py."""
    env, fake = slurm
    submit = Path(env["SLURM_SUBMIT_DIR"])
    (submit / "src").mkdir()
    (submit / "src" / "train.py").write_text(textwrap.dedent(FAKE_TRAIN))
    run_dir = tmp_path / "run"
    env.update(FAKE_HOSTS="localhost", SLURM_JOB_NODELIST="localhost", NPROC_PER_NODE="2",
               RDZV_PORT=str(_free_port()), RUN_DIR=str(run_dir), SLURM_CPUS_PER_TASK="2")
    return env, fake, run_dir


@pytest.mark.slow
def test_real_torchrun_keeps_running_and_its_workers_get_the_warning(real_torchrun):
    """SIGUSR1 to the batch shell reaches both workers, torchrun does not die of it, and the job is
    requeued."""
    env, fake, run_dir = real_torchrun
    env["FAKE_TRAIN"] = "usr1"
    with Batch(env) as batch:
        _wait_for(run_dir / "ready.0", batch.proc, 90)
        _wait_for(run_dir / "ready.1", batch.proc, 30)
        batch.signal(signal.SIGUSR1)
        rc, out = batch.finish(timeout=90)
    assert rc == 0, out
    assert (run_dir / "stopped.0").read_text() == "USR1" and (run_dir / "stopped.1").read_text() == "USR1", out
    assert "step ended with exit status 0" in out
    assert "stopped for the time limit: requeueing" in out
    assert _calls(fake)[-1] == f"scontrol requeue {JOB_ID}"
    assert not (run_dir / "PREEMPTED").exists()


@pytest.mark.slow
def test_real_torchrun_oom_killed_loader_is_not_requeued(real_torchrun):
    """The operator's case under the real torchrun: a worker dies of SIGKILL with no signal to the job.
    torchrun SIGTERMs the other worker, which stops, leaves a marker and a reason, and exits 0; torchrun
    exits non-zero, so the job fails and is not requeued (it would fail the same way forever)."""
    env, fake, run_dir = real_torchrun
    env["FAKE_TRAIN"] = "oom"
    with Batch(env) as batch:
        rc, out = batch.finish(timeout=120)
    assert rc != 0, out
    assert (run_dir / "stopped.1").read_text() == "TERM", out   # torchrun stopped the survivor
    assert not (run_dir / "stopped.0").exists()                  # the "loader" never got to stop
    assert f"step ended with exit status {rc}" in out
    assert f"a rank failed (exit {rc}): not requeueing" in out
    assert "loader rank 0 died (SIGKILL)" in out
    assert not _requeued(fake)
    assert not [c for c in _calls(fake) if c.startswith("scancel")]
    assert not (run_dir / "PREEMPTED").exists()
