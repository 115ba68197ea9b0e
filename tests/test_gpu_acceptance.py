"""tests/gpu_acceptance.py: the plan it prints without CUDA, how it reads results, and the whole flow
scaled down on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import gpu_acceptance as acceptance

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", "tests/gpu_acceptance.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the acceptance itself")
def test_without_cuda_it_prints_what_it_would_run_and_exits_0(tmp_path):
    run = _run("--work", str(tmp_path / "work"), timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "No CUDA device here" in out and "Nothing was run" in out
    assert "pytest -m gpu" in out and "tests/test_memory.py" in out
    for backend in ("sdpa", "flash", "xformers"):
        assert f"--model.attn_backend={backend}" in out
    assert "(if flash_attn imports)" in out and "(if xformers.ops imports)" in out
    assert out.count("--train.compile=true") == 3 and "--train.activation_checkpointing=true" in out
    assert "--train.precision=bf16" in out and "--log.wandb=false" in out
    assert "torch.distributed.run --standalone --nproc_per_node=2" in out
    assert "--ranks.loader_to_model={0:[1]}" in out and "--resume auto" in out
    assert not (tmp_path / "work").exists()                     # printing the plan builds nothing


def test_pytest_results_separate_missing_packages_from_failures(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.test_b" name="test_photo"><failure message="ModuleNotFoundError: No module '
        "named 'skimage'\">trace</failure></testcase>"
        '<testcase classname="tests.test_c" name="test_bad"><failure message="AssertionError: 2 != 3">x</failure>'
        "</testcase></testsuite></testsuites>")
    result = acceptance.read_pytest(junit, "", {"skimage", "diffusers"})
    assert result["counts"] == {"passed": 1, "skipped": 1, "failed": 1, "not runnable": 1}
    assert not result["ok"]
    assert any("test_photo needs skimage" in n for n in result["notes"])
    assert any(n.startswith("FAILED tests.test_c::test_bad: AssertionError") for n in result["notes"])
    # the same missing module on a machine that has it is a real failure
    assert acceptance.read_pytest(junit, "", set())["counts"]["failed"] == 2


def test_training_output_is_read_for_losses_and_throughput():
    line = "step {s}/9 | loss {loss} | lr 3.00e-04 | gnorm 0.1 | {ips} img/s | mfu {mfu}% | data wait 0.0%"
    rows = [(1, "1.9", "5.0", "1.00"), (3, "1.5", "50.0", "20.00"), (5, "1.2", "60.0", "30.00"),
            (7, "1.0", "70.0", "40.00"), (9, "0.8", "80.0", "50.00")]
    out = "\n".join(line.format(s=s, loss=loss, ips=ips, mfu=mfu) for s, loss, ips, mfu in rows)
    out += '\nfinished at step 9\nACCEPTANCE_RESULT {"rank": 0, "metrics": {"loader_encode_ms": 8.0}}'
    t = acceptance.read_training(out)
    assert t["losses"] == [1.9, 1.5, 1.2, 1.0, 0.8] and t["finite"] and t["falling"]
    assert t["img_per_s"] == 70.0 and t["mfu"] == pytest.approx(0.40)     # the compile windows left out
    assert t["finished_step"] == 9 and t["model"]["metrics"]["loader_encode_ms"] == 8.0
    assert not acceptance.read_training(out.replace("loss 1.0 ", "loss nan "))["finite"]
    assert not acceptance.read_training(out.replace("loss 0.8 ", "loss 2.5 "))["falling"]


def test_gpu_figures_put_peak_memory_beside_the_estimate(tmp_path):
    t = acceptance.read_training("step 1/9 | loss 1.0 | 5.0 img/s | mfu 1.00%\n"
                                 "step 2/9 | loss 0.9 | 5.0 img/s | mfu 1.00%")
    t["model"] = {"metrics": {"loader_encode_ms": 64.0}, "peak_allocated_gib": 20.5, "peak_reserved_gib": 22.0}
    figures = dict(acceptance.training_figures("sdpa", t, tmp_path, acceptance.GPU, 1))
    assert figures["sdpa.encode_ms_per_sample"] == f"{64.0 / acceptance.GPU.batch:.3f}"
    peak = figures["sdpa.peak_memory_gib"]
    assert peak.startswith("20.50 (reserved 22.00; eager estimate ") and float(peak.split()[-1][:-1]) > 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_smoke_runs_the_whole_flow(tmp_path):
    """The acceptance flow on the CPU at toy sizes: gpu tests (all skipped here), a colocated run, the
    disaggregated mode on gloo and a resume, the same sharded (fsdp) and a resume, then the verdict."""
    run = _run("--cpu-smoke", "--work", str(tmp_path / "work"), timeout=840)
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-2000:]
    tail = out[out.index("verdict:"):]
    assert tail.startswith("verdict: PASS")
    for key in ("gpu_tests:", "sdpa.img_per_s:", "sdpa.mfu:", "sdpa.encode_ms_per_sample:", "sdpa.peak_rss_gib:",
                "sdpa.loss:", "flash: skipped: needs CUDA", "xformers: skipped: needs CUDA",
                "disaggregated: steps to 3", "resume: steps to 5", "fsdp: steps to 3", "fsdp resume: steps to 5",
                "elapsed_s:"):
        assert key in tail, key
    assert "(finite, falling)" in tail
    assert "resuming from" in out
