"""Single-process training end to end: the run, exact resume, init_from, infer.py and the notebook."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd3.checkpoint.read import list_checkpoints, load_train_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import train  # noqa: E402  (src/train.py)


def losses_of(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", output, flags=re.M)]


def weights(path: Path, name: str) -> dict:
    return load_file(path / name)


def test_train_saves_checkpoints_and_a_sample_grid(tiny_args, tmp_path, capsys):
    assert train.main(tiny_args(None, "--steps", "4", "--log.save_every=2", "--log.keep_last=5")) == 0
    out = capsys.readouterr().out
    assert len(losses_of(out)) == 4
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    grid = Image.open(run / "samples" / "step_00000004.png")
    assert grid.width > 64 and grid.height > 64          # ten 64x64 samples tiled
    # The closing command works as printed (the interpreter running now, paths from here).
    (command,) = re.findall(r"^sample with: (.*)$", out, flags=re.M)
    sample = subprocess.run(command.replace("--out samples/", f"--out {tmp_path / 's'}") + " --steps 2", shell=True,
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, (command, sample.stderr)
    assert (run / "train.log").read_text().count("| loss ") == 4  # the console lines, in the run directory
    assert "img/s" in out and "data wait" in out


def test_validation_loss_and_sample_grids_during_training(tiny_args, tmp_path, capsys):
    args = tiny_args(None, "--steps", "4", "--data.val_rows=6", "--log.val_every=2", "--log.sample_every=2")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    val = [float(v) for v in re.findall(r"step \d+: validation loss ([0-9.]+)", out)]
    assert len(val) == 2 and all(0 < v < 10 for v in val)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step_00000002.png",
                                                                             "step_00000004.png"]


def test_resume_continues_the_same_run_exactly(tiny_args, tmp_path, capsys):
    """6 straight steps == 3 steps, a resume, 3 more: same losses, same weights, same EMA, same optimizer."""
    common = ["--steps", "6", "--train.accumulation_steps=2", "--train.ema_every=1", "--train.ema_decay=0.5"]
    assert train.main(tiny_args(tmp_path / "straight", *common)) == 0
    straight = losses_of(capsys.readouterr().out)
    assert train.main(tiny_args(tmp_path / "split", *common[2:], "--steps", "3")) == 0
    first = losses_of(capsys.readouterr().out)
    assert train.main(tiny_args(tmp_path / "split", *common, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step 3" in out
    assert first + losses_of(out) == straight
    a = list_checkpoints(tmp_path / "straight")[-1][1]
    b = list_checkpoints(tmp_path / "split")[-1][1]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = load_train_state(a), load_train_state(b)
    assert sa["step"] == sb["step"] == 6
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def test_init_from_loads_weights_only(tiny_args, tmp_path, capsys):
    assert train.main(tiny_args(tmp_path / "stage1", "--steps", "2")) == 0
    stage1 = list_checkpoints(tmp_path / "stage1")[-1][1]
    capsys.readouterr()
    assert train.main(tiny_args(tmp_path / "stage2", "--steps", "1", "--init_from", str(stage1),
                                "--train.lr=1e-12", "--train.ema_every=1000")) == 0
    stage2 = list_checkpoints(tmp_path / "stage2")[-1][1]
    assert load_train_state(stage2)["step"] == 1            # a new run: its own step count and optimizer
    e1, e2 = weights(stage1, "ema.safetensors"), weights(stage2, "ema.safetensors")
    assert all(torch.equal(e1[k], e2[k]) for k in e1)       # the EMA continues from stage 1's
    w1, w2 = weights(stage1, "model.safetensors"), weights(stage2, "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)   # one step at lr 1e-12 from stage 1
    assert not torch.equal(w1["final.linear.weight"], torch.zeros_like(w1["final.linear.weight"]))


def test_resume_and_init_from_are_exclusive(tiny_args, tmp_path):
    from sd3.config import ConfigError

    with pytest.raises(ConfigError, match="give one"):
        train.main(tiny_args(None, "--resume", "auto", "--init_from", str(tmp_path)))


def test_dry_run_prints_config_and_parameter_count(capsys):
    assert train.main(["--preset", "sd3_256", "--train.lr=3e-4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "parameters: 1221781763"
    assert '"lr": 0.0003' in out


def test_bad_override_fails_before_work():
    run = subprocess.run([sys.executable, "src/train.py", "--preset", "sd3_256", "--model.widht=64", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "unknown config key --model.widht; did you mean --model.width" in run.stderr


@pytest.fixture
def trained(tiny_args, tmp_path, capsys):
    assert train.main(tiny_args(None, "--steps", "2")) == 0
    capsys.readouterr()
    return list_checkpoints(tmp_path / "run")[-1][1]


def test_infer_writes_pngs_grid_and_gif_at_the_asked_size(trained, tmp_path):
    out = tmp_path / "samples"
    run = subprocess.run([sys.executable, "infer.py", "--ckpt", str(trained.parent.parent), "--prompt", "a cat",
                          "--prompt", "a rocket", "--batch", "2", "--width", "64", "--height", "48", "--steps", "3",
                          "--sampler", "heun", "--cfg", "4", "--gif", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["000_a_cat.png", "001_a_cat.png", "002_a_rocket.png", "003_a_rocket.png"]
    assert Image.open(out / pngs[0]).size == (64, 48)          # width x height as given
    assert Image.open(out / "denoise.gif").n_frames >= 3
    assert (out / "grid.png").exists()


def test_infer_rejects_a_size_the_model_cannot_take(trained, tmp_path):
    run = subprocess.run([sys.executable, "infer.py", "--ckpt", str(trained), "--prompt", "x", "--width", "60",
                          "--out", str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "width=60 is not a positive multiple of 8" in run.stderr


def test_notebook_runs_headless(trained, tmp_path):
    """Run where Jupyter runs it (notebooks/), with SD3_CKPT relative to the repository root and a config
    whose encoder paths are repository-relative: it finds everything and writes nothing beside itself."""
    import os

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "infer_loop.ipynb", as_version=4)
    before = sorted(p.name for p in (ROOT / "notebooks").iterdir())
    os.environ["SD3_CKPT"] = os.path.relpath(relocatable(trained, tmp_path), ROOT)
    try:
        NotebookClient(nb, kernel_name="python3", timeout=300,
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.pop("SD3_CKPT")
    assert sorted(p.name for p in (ROOT / "notebooks").iterdir()) == before
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)       # the grid was displayed
    assert any("(64, 48)" in str(o.get("data", {}).get("text/plain", "")) for o in outputs)


@pytest.mark.slow
def test_wandb_offline_run_is_continued_on_resume(tiny_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert train.main(tiny_args(run, "--steps", "2", "--log.wandb=true")) == 0
    first = load_train_state(list_checkpoints(run)[-1][1])["wandb_id"]
    assert first and list((run / "wandb").glob(f"offline-run-*-{first}"))
    assert train.main(tiny_args(run, "--steps", "3", "--log.wandb=true", "--resume", "auto")) == 0
    assert load_train_state(list_checkpoints(run)[-1][1])["wandb_id"] == first


BF16 = ["--train.precision=bf16", "--encoders.dtype=bfloat16"]


def test_bf16_trains_on_the_cpu_and_resumes_exactly(tiny_args, tmp_path, capsys):
    """`--train.precision=bf16` on a CPU device runs bf16 autocast (model, loss, EMA, validation, the
    sample grid) with bf16 encoders: finite losses that fall, and a resume that is the same run."""
    # A constant schedule: the first leg stops at step 4 by its own --steps, which would change a cosine.
    common = ["--train.lr=3e-3", "--train.schedule=constant", "--train.accumulation_steps=2", "--data.val_rows=4",
              "--log.val_every=8", *BF16]
    assert train.main(tiny_args(tmp_path / "straight", "--steps", "8", *common)) == 0
    out = capsys.readouterr().out
    straight = losses_of(out)
    assert len(straight) == 8 and all(math.isfinite(x) for x in straight)
    assert sum(straight[-3:]) < 0.9 * sum(straight[:3]), straight
    assert "validation loss" in out
    assert train.main(tiny_args(tmp_path / "split", "--steps", "4", *common)) == 0
    first = losses_of(capsys.readouterr().out)
    assert train.main(tiny_args(tmp_path / "split", "--steps", "8", "--resume", "auto", *common)) == 0
    assert first + losses_of(capsys.readouterr().out) == straight
    a, b = list_checkpoints(tmp_path / "straight")[-1][1], list_checkpoints(tmp_path / "split")[-1][1]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.slow
def test_compiled_training_writes_checkpoints_that_resume_and_sample(tiny_args, tmp_path, capsys):
    """`--train.compile=true` (per block, bf16): its checkpoints have the plain model's keys, so resume
    (compiled again) and `infer.py --raw` (not compiled) load them. The aot_eager backend captures and
    traces forward and backward as inductor does, without inductor's CPU code generation (over a minute
    on a cold cache; the GPU acceptance script compiles with inductor)."""
    run = tmp_path / "run"
    compiled = ["--train.compile=true", "--train.compile_backend=aot_eager", "--train.activation_checkpointing=true",
                *BF16]
    assert train.main(tiny_args(run, "--steps", "3", *compiled)) == 0
    losses = losses_of(capsys.readouterr().out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    keys = set(weights(list_checkpoints(run)[-1][1], "model.safetensors"))
    assert not any("_orig_mod" in k or "_checkpoint_wrapped" in k for k in keys)
    assert train.main(tiny_args(run, "--steps", "4", "--resume", "auto", *compiled)) == 0
    assert "resuming from" in capsys.readouterr().out
    sample = subprocess.run([sys.executable, "infer.py", "--ckpt", str(run), "--raw", "--prompt", "a cat",
                             "--steps", "2", "--out", str(tmp_path / "s")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert (tmp_path / "s" / "grid.png").exists()


def eval_lines(run_dir: Path) -> list[dict]:
    import json

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "eval/fid" in x]


def test_in_training_evaluation_logs_fid_and_clip_score(tiny_args, tmp_path, tiny_assets, capsys):
    """--log.eval_every: FID, KID and the CLIP score of the EMA weights on held-out rows, logged to the
    console and metrics.jsonl with the step and the images seen."""
    run = tmp_path / "run"
    args = tiny_args(run, "--steps", "4", "--data.val_rows=6", "--log.eval_every=2", "--log.eval_num=5",
                     "--log.eval_steps=2", "--log.eval_inception=random",
                     f"--log.eval_clip={tiny_assets / 'enc' / 'clip'}")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "log.eval_inception=random" in out and len(re.findall(r"step \d: eval fid [0-9.]+", out)) == 2
    evals = eval_lines(run)
    assert [e["step"] for e in evals] == [2, 4] and all(e["eval/images"] == 5 for e in evals)
    assert all(math.isfinite(e["eval/fid"]) and 0 <= e["eval/clip_score"] <= 100 for e in evals)
    assert evals[0]["images"] == 2 * 4                          # images seen at that step
    with pytest.raises(Exception, match="eval_num"):
        train.main(tiny_args(run, "--log.eval_every=2", "--log.eval_num=8", "--data.val_rows=6"))


# --- infer.py refuses bad input at once, and finds its files from anywhere ---------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Refusals must come before any model loads."""
    import sd3.diffusion.pipeline

    def refuse(*a, **k):
        raise AssertionError("Pipeline.load ran before the arguments were checked")

    monkeypatch.setattr(sd3.diffusion.pipeline.Pipeline, "load", refuse)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "  "], "--prompt number 1 is empty; to sample the unconditional model, give any prompt with --cfg 0"),
    (["--prompt", "a cat", "--batch", "0"], "--batch 0: give at least 1 image per prompt"),
    (["--prompt", "a cat", "--width", "60"], "width=60 is not a positive multiple of 8"),
])
def test_infer_refuses_bad_arguments_before_loading(trained, no_model_loading, capsys, args, message):
    import infer

    with pytest.raises(SystemExit) as exit_:
        infer.main(["--ckpt", str(trained), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_infer_refuses_bad_checkpoints_and_devices(trained, no_model_loading, capsys, tmp_path):
    import infer

    runs = trained.parents[2]   # tmp_path: holds the run "run"
    for ckpt, message in [(str(tmp_path / "nope"), "no such file or directory"),
                          (str(runs), f"holds runs, not a checkpoint; pick one: {runs / 'run'}")]:
        with pytest.raises(SystemExit):
            infer.main(["--ckpt", ckpt, "--prompt", "a cat"])
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            infer.main(["--ckpt", str(trained), "--prompt", "a cat", "--device", "cuda"])
        assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err


def test_infer_warns_about_prompts_the_encoders_cut(trained, no_model_loading, capsys):
    import infer

    long = " ".join(f"word{i}" for i in range(300))
    with pytest.raises(AssertionError, match=r"Pipeline\.load ran"):  # the checks passed; loading comes next
        infer.main(["--ckpt", str(trained), "--prompt", "a cat", "--prompt", long])
    err = capsys.readouterr().err
    assert re.search(r"warning: prompt 2 is (\d+) tokens for encoders.text\[0\] .* which reads 77: the last \d+ are "
                     r"cut, from '.*word\d+.*' on", err), err
    assert "prompt 1" not in err


def relocatable(trained: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint whose config names its encoders by paths relative to the repository root,
    as the tiny preset's checkpoints do."""
    import json
    import os
    import shutil

    ckpt = tmp_path / "relative" / "checkpoints" / trained.name
    shutil.copytree(trained, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    enc = config["encoders"]
    enc["text"] = [os.path.relpath(p, ROOT) for p in enc["text"]]
    enc["pooled"] = os.path.relpath(enc["pooled"], ROOT)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "manifest.json").unlink()   # the config changed: a checkpoint from before manifests
    return ckpt


def test_infer_and_the_notebook_work_from_any_directory(trained, tmp_path):
    """Relative config paths resolve against the repository, not the current directory: run from
    elsewhere, nothing is created there but the asked-for output."""
    ckpt = relocatable(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--ckpt", str(ckpt), "--prompt", "a cat",
                          "--steps", "2", "--out", "out"], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["out"]
    assert (elsewhere / "out" / "grid.png").exists()


def test_resume_refuses_another_model_shape_and_says_what_else_changed(tiny_args, tmp_path, capsys):
    """Before any weights load: a changed shape is refused in one line naming both values; a changed
    learning rate goes on, and the run says so."""
    from sd3.config import ConfigError

    assert train.main(tiny_args(tmp_path / "run", "--steps", "2")) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000002: it was trained with another model "
                                          r"shape \(model.width 64 -> 96\), and these fields cannot change") as caught:
        train.main(tiny_args(tmp_path / "run", "--steps", "3", "--resume", "auto", "--model.width=96"))
    assert "\n" not in str(caught.value)
    assert list_checkpoints(tmp_path / "run")[-1][0] == 2            # nothing written, nothing lost
    assert train.main(tiny_args(tmp_path / "run", "--steps", "3", "--resume", "auto", "--train.lr=3e-4")) == 0
    out = capsys.readouterr().out
    assert re.search(r"resume .*step_00000002 with a changed config, going on with the new values: train.steps 2 -> "
                     r"3, train.lr 0.00\d+ -> 0.0003", out), out
    with pytest.raises(ConfigError, match=r"model.depth 2 -> 3"):
        train.main(tiny_args(tmp_path / "stage2", "--steps", "1", "--model.depth=3",
                             "--init_from", str(list_checkpoints(tmp_path / "run")[-1][1])))
