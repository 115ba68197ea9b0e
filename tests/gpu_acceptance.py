"""GPU acceptance: one command that says whether a CUDA machine trains this project, and how fast.

    bash tests/gpu_acceptance.sh               # on a GPU machine: under 8 minutes, ends with `verdict: PASS|FAIL`
    bash tests/gpu_acceptance.sh --prepare     # beforehand, anywhere: data, stand-in encoders, pytest, into
                                               #   .gpu_acceptance/ (git-ignored, a few MB: carry it along)
    bash tests/gpu_acceptance.sh --cpu-smoke   # the same flow scaled down on the CPU (how this script is tested)
    bash tests/gpu_acceptance.sh --plan        # only print the commands; what it does without CUDA

With at least one CUDA GPU it runs, each step in its own process with a hard timeout:

1. the `gpu`-marked tests (`pytest -m gpu` over the test files that have them);
2. a mid-size model (8 blocks, width 1024, 16 heads, 256 px at 256 image tokens like stage 1, stand-in
   encoders, synthetic data) trained colocated on one GPU by `src/train.py` for 50 steps with bf16,
   activation checkpointing and `--train.compile=true`, once per attention backend installed (SDPA
   always; flash-attn and xformers when they import, else named as not installed); from each run:
   images/s and MFU over the steady log windows (the first ones hold the compile), peak
   `torch.cuda.max_memory_allocated` beside the eager estimate of `sd3.train.memory`, the loader's encode time
   per sample, and whether every loss is finite and the losses fall;
3. with 2 or more GPUs: the disaggregated mode over NCCL (`torchrun --nproc_per_node=2`, loader rank 0
   feeding model rank 1), then `--resume auto` to a few more steps;
4. with 3 or more GPUs: loader rank 0 feeding model ranks 1 and 2 that shard the model
   (`--train.parallel=fsdp`, sharded checkpoints in the background), then `--resume auto` from the
   sharded checkpoint.

It needs only torch, transformers, tokenizers, numpy, PIL and pyarrow (no diffusers, wandb or
scikit-image: the data is synthetic, the autoencoder is the weightless pixel one, wandb is off), and
pytest, which `--prepare` puts in `.gpu_acceptance/site` for machines without it. Tests that need a
package the machine lacks are listed as not runnable there, not as failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".gpu_acceptance"
SCRIPT = "tests/gpu_acceptance.py"     # steps run in ROOT
RESULT = "ACCEPTANCE_RESULT "
GIB = 1024**3
CAPTION = "a {color} {shape} on a {background} background"
SAMPLE_PROMPT = CAPTION.format(color="red", shape="circle", background="blue")
# Peak dense bf16 TFLOP/s per GPU, for MFU (vendor data sheets, SXM parts); others fall back to H100's.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
# Packages a test may need that a bare GPU machine may lack: reported, not failed.
OPTIONAL = ("diffusers", "skimage", "sklearn", "wandb", "flash_attn", "xformers")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes of one acceptance flow (the GPU one, or the CPU smoke one)."""

    device: str
    res: int
    pixel_factor: int
    depth: int
    width: int
    heads: int
    batch: int
    steps: int
    log_every: int
    rows: int
    compile: bool
    dist_steps: int
    resume_steps: int
    timeout_s: int
    """Per training run."""
    budget_s: int
    """The whole flow: steps that would start past it are skipped (and the verdict fails)."""


GPU = Settings(device="cuda", res=256, pixel_factor=8, depth=8, width=1024, heads=16, batch=64, steps=50,
               log_every=5, rows=512, compile=True, dist_steps=20, resume_steps=30, timeout_s=300, budget_s=470)
CPU_SMOKE = Settings(device="cpu", res=64, pixel_factor=4, depth=2, width=64, heads=2, batch=4, steps=8,
                     log_every=1, rows=48, compile=False, dist_steps=3, resume_steps=5, timeout_s=240,
                     budget_s=900)


# ---------------------------------------------------------------------------------------------------
# Preparing: synthetic data, stand-in encoders, pytest
# ---------------------------------------------------------------------------------------------------


def data_dir(work: Path, s: Settings) -> Path:
    return work / "data" / str(s.res)


def encoders_dir(work: Path) -> Path:
    return work / "encoders"


def make_dataset(work: Path, s: Settings) -> Path:
    """Synthetic photos-with-captions in the seed schema -> create_phase -> bucket index. Each image is a
    coloured shape on a two-tone gradient and its caption says which: the model has something to learn."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from sd3.data.index import build_index
    from sd3.data.phase import create_phase

    out = data_dir(work, s)
    if (out / "bucket_index.safetensors").is_file():
        return out
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
              "white": (245, 245, 245), "black": (15, 15, 15)}
    rng = np.random.default_rng(0)
    rows = []
    side = s.res + s.res // 8   # larger than the bucket: create_phase scales and crops, as for real photos
    for i in range(s.rows):
        color, background = rng.choice(list(colors), size=2, replace=False)
        shape = ["circle", "square", "triangle"][i % 3]
        ramp = np.linspace(0.6, 1.0, side)[:, None, None]
        img = Image.fromarray((np.asarray(colors[background]) * ramp * np.ones((side, side, 3))).astype(np.uint8))
        x, y, r = (int(v) for v in rng.integers([side // 4, side // 4, side // 8], [3 * side // 4] * 2 + [side // 4]))
        draw = ImageDraw.Draw(img)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=colors[color])
        elif shape == "square":
            draw.rectangle(box, fill=colors[color])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colors[color])
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        short = CAPTION.format(color=color, shape=shape, background=background)
        rows.append({"image": buf.getvalue(), "recaption": f"A photograph of {short}, lit from the top.",
                     "recaption_short": short, "height": side, "width": side, "aspect_ratio": 1.0,
                     "class": shape, "id": f"synthetic-{i:05d}"})
    raw = work / "data" / f"raw{s.res}"
    raw.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k::2]), raw / f"part-{k:02d}.parquet")
    report = create_phase(raw, out, max_res=s.res, multiple=s.pixel_factor * 2, progress=False)
    if report.failed:
        raise RuntimeError(f"create_phase failed on the synthetic data:\n{report}")
    build_index(out, progress=False)
    return out


def make_encoders(work: Path, s: Settings) -> None:
    from sd3.encode.stand_ins import make_tiny_encoders

    cfg = train_config(work, s, "sdpa", work / "runs" / "unused")
    make_tiny_encoders(cfg.encoders, cfg.model)


def install_pytest(work: Path) -> Path:
    """pytest and its pure-Python dependencies, at this environment's versions, for machines without it.
    Appended to sys.path on use, so a machine's own packages always win."""
    from importlib.metadata import version

    site = work / "site"
    names = ["pytest", "pluggy", "iniconfig", "pygments", "pytest-timeout"]
    pins = [f"{n}=={version(n)}" for n in names]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), *pins],
                   check=True)
    return site


def prepare(work: Path, s: Settings, *, with_pytest: bool) -> None:
    t0 = time.perf_counter()
    shutil.rmtree(work / "runs", ignore_errors=True)    # an earlier run's checkpoints: nothing to carry
    make_dataset(work, s)
    make_encoders(work, s)
    if with_pytest:
        install_pytest(work)
    size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) / 2**20
    print(f"prepared {work} in {time.perf_counter() - t0:.0f} s ({size:.1f} MiB); carry it to the GPU machine")


# ---------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------


def train_args(work: Path, s: Settings, backend: str, run_dir: Path, *, steps: int, compile_: bool,
               peak_tflops: float = 989.0) -> list[str]:
    enc = encoders_dir(work)
    return [
        "--preset", "tiny", "--run_dir", str(run_dir), "--steps", str(steps),
        f"--data.dataset={data_dir(work, s)}", "--data.create_demo=false", "--data.val_rows=0",
        f"--data.batch_size={s.batch}", "--data.decode_workers=4", "--data.small_buckets=fill",
        f'--encoders.text=("{enc / "gemma"}", "{enc / "bert"}")', f"--encoders.pooled={enc / 'clip'}",
        f"--encoders.pixel_factor={s.pixel_factor}", f"--model.in_channels={3 * s.pixel_factor**2}",
        f"--model.max_res={s.res}", f"--model.max_res_orig={s.res}", f"--model.depth={s.depth}",
        f"--model.width={s.width}", f"--model.num_heads={s.heads}", f"--model.attn_backend={backend}",
        f"--train.device={s.device}", "--train.precision=bf16", "--train.activation_checkpointing=true",
        f"--train.compile={str(compile_).lower()}", "--train.lr=3e-4", "--train.warmup=5",
        "--train.schedule=constant", "--train.accumulation_steps=1", "--train.ema_every=10",
        f"--log.every={s.log_every}", "--log.val_every=0", "--log.sample_every=0", "--log.save_every=100000",
        "--log.keep_last=1", "--log.sample_steps=4", f'--log.sample_prompts=("{SAMPLE_PROMPT}",)',
        "--log.wandb=false", f"--log.peak_tflops={peak_tflops}",
    ]


def train_config(work: Path, s: Settings, backend: str, run_dir: Path):
    """The Config the colocated training run resolves (for the memory estimate and the stand-ins)."""
    import train

    _, cfg = train.parse(train_args(work, s, backend, run_dir, steps=s.steps, compile_=s.compile))
    return cfg


@dataclasses.dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.cmd)


def gpu_test_files() -> list[str]:
    """The test files with `gpu`-marked tests (the others need not be imported: some need packages a
    bare GPU machine lacks)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text())


def pytest_step(work: Path, site: Path | None) -> Step:
    args = ["-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors",
            f"--junitxml={work / 'gpu_tests.xml'}", *gpu_test_files()]
    if site is None:
        return Step("gpu tests", [sys.executable, "-m", "pytest", *args], 240)
    runner = f"import sys; sys.path.append({str(site)!r}); import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    return Step("gpu tests", [sys.executable, "-c", runner, *args], 240)


def train_step(work: Path, s: Settings, backend: str, peak_tflops: float) -> Step:
    run = work / "runs" / backend
    args = train_args(work, s, backend, run, steps=s.steps, compile_=s.compile, peak_tflops=peak_tflops)
    return Step(f"train {backend}", [sys.executable, SCRIPT, "--train-child", *args], s.timeout_s, cpu_env(s))


def cpu_env(s: Settings) -> dict[str, str]:
    """On the CPU, one intra-op thread per process (as torchrun sets): the decode threads and torch's
    thread pool would otherwise fight over the cores."""
    return {"OMP_NUM_THREADS": "1"} if s.device == "cpu" else {}


def distributed_steps(work: Path, s: Settings) -> list[Step]:
    """Loader rank 0 -> model rank 1 over NCCL (gloo on the CPU), then a resume to a few more steps.
    Compile off: these check the transport and the resume, not the kernels."""
    run = work / "runs" / "disaggregated"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                SCRIPT, "--train-child"]
    common = ["--ranks.loader_to_model={0:[1]}", "--ranks.timeout_s=120"]
    first = train_args(work, s, "sdpa", run, steps=s.dist_steps, compile_=False) + common
    again = train_args(work, s, "sdpa", run, steps=s.resume_steps, compile_=False) + common + ["--resume", "auto"]
    return [Step("disaggregated", torchrun + first, s.timeout_s, cpu_env(s)),
            Step("resume", torchrun + again, s.timeout_s, cpu_env(s))]


def fsdp_steps(work: Path, s: Settings) -> list[Step]:
    """Loader rank 0 -> model ranks 1 and 2 sharding the model between them (FSDP2 over NCCL, gloo on the
    CPU; sharded checkpoints written in the background), then a resume from the sharded checkpoint."""
    run = work / "runs" / "fsdp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                SCRIPT, "--train-child"]
    common = ["--ranks.loader_to_model={0:[1,2]}", "--ranks.timeout_s=120", "--train.parallel=fsdp"]
    first = train_args(work, s, "sdpa", run, steps=s.dist_steps, compile_=False) + common
    again = train_args(work, s, "sdpa", run, steps=s.resume_steps, compile_=False) + common + ["--resume", "auto"]
    return [Step("fsdp", torchrun + first, s.timeout_s, cpu_env(s)),
            Step("fsdp resume", torchrun + again, s.timeout_s, cpu_env(s))]


# ---------------------------------------------------------------------------------------------------
# Running and reading
# ---------------------------------------------------------------------------------------------------


def run(step: Step, log_dir: Path) -> tuple[int | None, str, float]:
    """Run a step in its own process group, echoing its output; kill the group at the timeout.
    Returns (exit code or None on timeout, output, seconds)."""
    print(f"\n>>> {step.name}: {step.shell()}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **step.env}
    proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for raw in io.TextIOWrapper(proc.stdout, errors="replace", newline=""):
            for line in raw.replace("\r\n", "\n").split("\n"):
                line = line.rsplit("\r", 1)[-1]           # a progress bar's last state only
                if line:
                    lines.append(line)
                    print(f"  | {line}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=step.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    reader.join(timeout=10)
    output = "\n".join(lines)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / (re.sub(r"\W+", "_", step.name) + ".log")).write_text(output + "\n")
    return code, output, time.perf_counter() - t0


def read_training(output: str) -> dict:
    """Losses, throughput and what the child processes reported, from a training run's output."""
    lines = re.findall(r"^(?:\s*\|\s*)?step (\d+)/\d+ \| loss (\S+) .*?\| ([0-9.]+) img/s \| mfu ([0-9.]+)%", output,
                       flags=re.M)
    losses = [float(x[1]) for x in lines]
    results = [json.loads(line.split(RESULT, 1)[1]) for line in output.splitlines() if RESULT in line]
    model = next((r for r in results if r.get("metrics")), {})
    # The first log windows hold torch.compile and the first-step allocations: steady state after them.
    steady = lines[2:] if len(lines) > 3 else lines[-1:]
    first, last = losses[: max(1, len(losses) // 3)], losses[-max(1, len(losses) // 3):]
    finite = bool(losses) and all(x == x and abs(x) != float("inf") for x in losses)
    return {
        "losses": losses,
        "finite": finite,
        "falling": finite and len(losses) >= 2 and statistics.mean(last) < statistics.mean(first),
        "img_per_s": statistics.median(float(x[2]) for x in steady) if steady else None,
        "mfu": statistics.median(float(x[3]) / 100 for x in steady) if steady else None,
        "results": results,
        "model": model,
        "resumed": "resuming from" in output,
        "finished_step": int(m.group(1)) if (m := re.search(r"finished at step (\d+)", output)) else None,
    }


def read_pytest(junit: Path, output: str, missing: set[str]) -> dict:
    """Counts from the JUnit report; failures caused by a package the machine lacks are 'not runnable'."""
    counts = {"passed": 0, "skipped": 0, "failed": 0, "not runnable": 0}
    notes: list[str] = []
    if not junit.is_file():
        return {"counts": counts, "notes": [f"no JUnit report (pytest did not run: {output[-300:]!r})"], "ok": False}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is not None:
            counts["skipped"] += 1
        elif bad is not None:
            text = (bad.get("message") or "") + (bad.text or "")
            lacking = [m for m in missing if f"No module named '{m}" in text]
            if lacking:
                counts["not runnable"] += 1
                notes.append(f"{name} needs {', '.join(lacking)} (not installed here)")
            else:
                counts["failed"] += 1
                first = (bad.get("message") or "").strip().splitlines()
                notes.append(f"FAILED {name}: {first[0][:160] if first else ''}")
        else:
            counts["passed"] += 1
    return {"counts": counts, "notes": notes, "ok": counts["failed"] == 0}


def probe() -> dict:
    """What this machine has (run in a child process, so the parent never holds a CUDA context)."""
    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                  "python": sys.version.split()[0]}
    if info["gpus"]:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=props.total_memory / GIB, capability=f"{props.major}.{props.minor}")
    info["missing"] = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    info["pytest"] = importlib.util.find_spec("pytest") is not None
    backends = {"sdpa": "ok"}
    for name, module in (("flash", "flash_attn"), ("xformers", "xformers.ops")):
        try:
            importlib.import_module(module)
            backends[name] = "ok"
        except ImportError as error:
            backends[name] = "not installed" if importlib.util.find_spec(module.split(".")[0]) is None else (
                f"does not import ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    info["backends"] = backends
    return info


def train_child(argv: list[str]) -> int:
    """Run src/train.py's main in this process, then report what the parent needs as one JSON line:
    the final metrics (from `train.report`) and this process's peak memory."""
    import torch

    import train

    captured: dict = {}
    report = train.report

    def capture(cfg, result) -> None:
        captured.update(result.metrics, step=result.step, checkpoint=result.checkpoint)
        report(cfg, result)

    train.report = capture
    code = train.main(argv)
    result: dict = {"rank": int(os.environ.get("RANK", "0")),
                    "metrics": {k: v for k, v in captured.items() if isinstance(v, (int, float, str))}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    else:
        import resource

        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print(RESULT + json.dumps(result), flush=True)
    return code


# ---------------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------------


def plan(work: Path, s: Settings, gpus: int, backends: dict[str, str], site: Path | None,
         peak_tflops: float) -> list[Step]:
    steps = [pytest_step(work, site)]
    steps += [train_step(work, s, b, peak_tflops) for b, state in backends.items() if state == "ok"]
    if gpus >= 2 or s.device == "cpu":
        steps += distributed_steps(work, s)
    if gpus >= 3 or s.device == "cpu":
        steps += fsdp_steps(work, s)
    return steps


def print_plan(work: Path, s: Settings) -> None:
    print("No CUDA device here. On a machine with one or more CUDA GPUs this script runs (after building "
          f"the synthetic data and stand-in encoders in {work} unless --prepare did):")
    all_backends = {"sdpa": "ok", "flash": "ok", "xformers": "ok"}
    for step in plan(work, s, 3, all_backends, None, 989.0):
        condition = {"train flash": "  (if flash_attn imports)", "train xformers": "  (if xformers.ops imports)",
                     "disaggregated": "  (2 or more GPUs)", "resume": "  (2 or more GPUs)",
                     "fsdp": "  (3 or more GPUs)", "fsdp resume": "  (3 or more GPUs)"}.get(step.name, "")
        print(f"\n# {step.name}{condition}, timeout {step.timeout_s} s\n{step.shell()}")
    print("\nthen prints `verdict: PASS|FAIL` and the figures. Nothing was run.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT / "src"))
    if argv[:1] == ["--train-child"]:     # internal: one training process (or torchrun rank)
        return train_child(argv[1:])
    if argv[:1] == ["--probe"]:           # internal: what this machine has, as JSON
        print(json.dumps(probe()))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--prepare", action="store_true", help="build the data, stand-ins and pytest, then exit")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same flow scaled down on the CPU")
    parser.add_argument("--plan", action="store_true", help="print the commands a GPU machine would run")
    parser.add_argument("--work", type=Path, default=WORK, help="scratch folder (default: .gpu_acceptance)")
    args = parser.parse_args(argv)
    s = CPU_SMOKE if args.cpu_smoke else GPU
    work = args.work.resolve()
    if work.is_relative_to(ROOT):   # every step runs in the repository root: shorter commands
        work = work.relative_to(ROOT)
    if args.prepare:
        prepare(work, GPU, with_pytest=True)
        return 0
    info = json.loads(subprocess.run([sys.executable, SCRIPT, "--probe"], capture_output=True,
                                     text=True, check=True, cwd=ROOT).stdout)
    if args.plan or (not info["gpus"] and not args.cpu_smoke):
        print_plan(work, s)
        return 0
    return accept(work, s, info)


def accept(work: Path, s: Settings, info: dict) -> int:
    t0 = time.perf_counter()
    shutil.rmtree(work / "runs", ignore_errors=True)    # a fresh start: `--resume auto` must find this run's
    (work / "gpu_tests.xml").unlink(missing_ok=True)     # and no stale test report
    gpus = info["gpus"] if s.device == "cuda" else 0
    backends = dict(info["backends"])
    if s.device == "cpu":   # flash-attn and xformers are CUDA kernels
        backends = {"sdpa": "ok", **{b: "needs CUDA" for b in ("flash", "xformers")}}
    name = info.get("name", "")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)
    site = work / "site" if not info["pytest"] else None
    print(f"gpu acceptance ({'CPU smoke' if s.device == 'cpu' else 'GPU'}): torch {info['torch']} (CUDA "
          f"{info['cuda']}), python {info['python']}, {gpus} GPU(s) {name}; backends {backends}; "
          f"not installed: {', '.join(info['missing']) or 'nothing optional'}", flush=True)
    make_dataset(work, s)
    make_encoders(work, s)
    steps = plan(work, s, gpus, backends, site, peak)
    logs = work / "logs"
    figures: list[tuple[str, str]] = []
    failures: list[str] = []
    outcome: dict[str, tuple[int | None, str]] = {}
    if site is not None and not site.is_dir():
        failures.append(f"gpu tests: not run, pytest is not installed here and {site} is missing (run "
                        "`bash tests/gpu_acceptance.sh --prepare` where pip works, then carry .gpu_acceptance)")
        steps = steps[1:]
    for step in steps:
        left = s.budget_s - (time.perf_counter() - t0)
        if left < 30:
            failures.append(f"{step.name}: not run, the {s.budget_s} s budget is spent")
            continue
        step.timeout_s = int(min(step.timeout_s, left))
        code, output, seconds = run(step, logs)
        outcome[step.name] = (code, output)
        figures.append((f"{re.sub(r'[^a-z]+', '_', step.name)}.seconds", f"{seconds:.0f}"))
        if code is None:
            failures.append(f"{step.name}: timed out after {step.timeout_s} s")
        elif code != 0 and step.name != "gpu tests":
            failures.append(f"{step.name}: exit code {code} (log: {logs})")

    if "gpu tests" in outcome:
        tests = read_pytest(work / "gpu_tests.xml", outcome["gpu tests"][1], set(info["missing"]))
        c = tests["counts"]
        figures.append(("gpu_tests", f"{c['passed']} passed, {c['skipped']} skipped, {c['failed']} failed, "
                                     f"{c['not runnable']} not runnable here"))
        figures += [("gpu_tests.note", n) for n in tests["notes"]]
        if not tests["ok"]:
            failures.append("gpu tests: failures (see gpu_tests.note)")
    for b, state in backends.items():
        key = f"train {b}"
        if state != "ok":
            figures.append((f"{b}", f"skipped: {state}"))
            continue
        if key not in outcome:
            continue
        t = read_training(outcome[key][1])
        figures += training_figures(b, t, work, s, gpus)
        if not t["finite"]:
            failures.append(f"{key}: a loss is not finite (or none was logged)")
        elif not t["falling"]:
            failures.append(f"{key}: losses do not fall ({t['losses'][0]:.4f} -> {t['losses'][-1]:.4f})")
    if gpus < 2 and s.device == "cuda":
        figures.append(("disaggregated", f"skipped: {gpus} GPU (needs 2)"))
    if gpus < 3 and s.device == "cuda":
        figures.append(("fsdp", f"skipped: {gpus} GPU(s) (needs 3: a loader and 2 model ranks to shard over)"))
    for key in ("disaggregated", "resume", "fsdp", "fsdp resume"):
        if key in outcome:
            t = read_training(outcome[key][1])
            peaks = ", ".join(f"rank {r['rank']} {r.get('peak_allocated_gib', r.get('peak_rss_gib', 0)):.2f} GiB"
                              for r in sorted(t["results"], key=lambda r: r["rank"]))
            figures.append((key, f"steps to {t['finished_step']}, losses "
                                 f"{' '.join(f'{x:.3f}' for x in t['losses'][-3:])}, peak {peaks}"))
            want = s.resume_steps if key.endswith("resume") else s.dist_steps
            if t["finished_step"] != want or not t["finite"]:
                failures.append(f"{key}: did not finish at step {want} with finite losses")
            if key.endswith("resume") and not t["resumed"]:
                failures.append(f"{key}: the run did not resume from the checkpoint")
    figures.append(("elapsed_s", f"{time.perf_counter() - t0:.0f}"))
    verdict = "FAIL" if failures else "PASS"
    print("\n" + "=" * 72)
    print(f"verdict: {verdict}")
    print(f"device: {name or 'cpu'} x {gpus}, torch {info['torch']}")
    for key, value in figures:
        print(f"{key}: {value}")
    for failure in failures:
        print(f"failure: {failure}")
    return 0 if verdict == "PASS" else 1


def training_figures(backend: str, t: dict, work: Path, s: Settings, gpus: int) -> list[tuple[str, str]]:
    from sd3.train.memory import estimate

    out = []
    metrics, result = t["model"].get("metrics", {}), t["model"]
    if t["img_per_s"] is not None:
        out.append((f"{backend}.img_per_s", f"{t['img_per_s']:.1f}"))
        out.append((f"{backend}.mfu", f"{t['mfu']:.3f}"))
    if "loader_encode_ms" in metrics:
        out.append((f"{backend}.encode_ms_per_sample", f"{metrics['loader_encode_ms'] / s.batch:.3f}"))
    if "peak_allocated_gib" in result:
        est = estimate(train_config(work, s, backend, work / "runs" / backend)).colocated / GIB
        out.append((f"{backend}.peak_memory_gib", f"{result['peak_allocated_gib']:.2f} (reserved "
                                                  f"{result['peak_reserved_gib']:.2f}; eager estimate {est:.2f})"))
    elif "peak_rss_gib" in result:
        out.append((f"{backend}.peak_rss_gib", f"{result['peak_rss_gib']:.2f} (host memory; no CUDA)"))
    losses = t["losses"]
    if losses:
        state = ("finite" if t["finite"] else "NOT finite") + (", falling" if t["falling"] else ", NOT falling")
        out.append((f"{backend}.loss", f"{losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logs ({state})"))
    return out


if __name__ == "__main__":
    sys.exit(main())
