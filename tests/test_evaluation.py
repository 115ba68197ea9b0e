"""Image-quality evaluation: the FID / KID / CLIP score maths, the feature network, evaluate.py end to end,
the run history (metrics.jsonl) and plot_run.py."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from sd3.eval.scores import (
    ClipScore,
    EvaluationError,
    FeatureStats,
    fid,
    frechet_distance,
    gather_stats,
    kid,
    load_inception,
    mmd2_unbiased,
)
from sd3.train.metrics import History, read_history
from tests.dist_util import run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import evaluate  # noqa: E402  (src/evaluate.py)
import plot_run  # noqa: E402  (src/plot_run.py)
import train  # noqa: E402  (src/train.py)


def spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


class TinyFeatures(torch.nn.Module):
    """A fixed random feature map of uint8 images (B, 3, H, W) -> (B, 16): cheap features for checking the
    statistics against torchmetrics, which accepts any such module."""

    num_features = 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(48, 16, generator=g)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)      # (B, 48)
        return torch.tanh(x @ self.proj)                                    # (B, 16)


def random_uint8(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Frechet distance and FID
# --------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm_on_known_gaussians():
    g = torch.Generator().manual_seed(0)
    for d in (1, 4, 16):
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        s1, s2 = spd(d, g), spd(d, g)
        covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
        reference = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean.real))
        assert frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2) == pytest.approx(reference, rel=1e-9,
                                                                                           abs=1e-9)
    # Closed form for commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2.
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    mu = torch.zeros(3, dtype=torch.float64)
    assert frechet_distance(mu1=mu, sigma1=torch.diag(a), mu2=mu + 2, sigma2=torch.diag(b)) == pytest.approx(
        12.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum()))


def test_fid_agrees_with_torchmetrics_and_is_zero_for_identical_sets():
    from torchmetrics.image.fid import FrechetInceptionDistance

    features = TinyFeatures()
    real_images, fake_images = random_uint8(40, 1), (random_uint8(40, 2) // 2)
    real = FeatureStats.empty(16).add(features(real_images))
    fake = FeatureStats.empty(16).add(features(fake_images))
    reference = FrechetInceptionDistance(feature=features)
    reference.update(real_images, real=True)
    reference.update(fake_images, real=False)
    assert fid(real, fake) == pytest.approx(float(reference.compute()), rel=1e-5)
    assert fid(real, fake) > 0.01
    again = FeatureStats.empty(16).add(features(real_images))
    assert fid(real, again) == pytest.approx(0.0, abs=1e-9)


def test_statistics_merge_exactly_whatever_the_split():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g) + 0.3
    whole, fake = FeatureStats.empty(8).add(x), FeatureStats.empty(8).add(y)
    merged = FeatureStats.merge([FeatureStats.empty(8).add(part) for part in (x[:7], x[7:31], x[31:])])
    assert merged.n == 50
    assert torch.allclose(merged.sum, whole.sum, rtol=1e-12) and torch.allclose(merged.outer, whole.outer, rtol=1e-12)
    assert fid(merged, fake) == pytest.approx(fid(whole, fake), rel=1e-10)
    assert torch.equal(merged.features, whole.features)
    assert kid(merged.features, fake.features, subsets=5, subset_size=20) == kid(whole.features, fake.features,
                                                                                  subsets=5, subset_size=20)


def _gather_on_rank(rank: int, world: int) -> tuple[float, int, list]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g) + 0.3
    share = x[:13] if rank == 0 else x[13:]                        # uneven shares
    stats = gather_stats(FeatureStats.empty(8).add(share))
    return fid(stats, FeatureStats.empty(8).add(y)), stats.n, stats.features.tolist()


def test_gather_stats_over_two_gloo_ranks_gives_the_statistics_of_all_images():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g) + 0.3
    expected = fid(FeatureStats.empty(8).add(x), FeatureStats.empty(8).add(y))
    results = run_ranks(_gather_on_rank, 2, timeout=120)
    for rank in (0, 1):
        status, value = results[rank]
        assert status == "ok", value
        value_fid, n, feats = value
        assert n == 50 and value_fid == pytest.approx(expected, rel=1e-9)
        assert torch.allclose(torch.tensor(feats), x)


# --------------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------------


def direct_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. 2012, eq. 3, written as the double sums, kernel (x.y / d + 1)^3."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_is_the_unbiased_mmd_estimator():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    direct = direct_mmd2_unbiased(x.numpy(), y.numpy() + 0.5)
    assert float(mmd2_unbiased(x, y + 0.5)) == pytest.approx(direct, rel=1e-10)
    mean, std = kid(x, y + 0.5, subsets=4, subset_size=100)      # capped at 9: every subset is the whole set
    assert mean == pytest.approx(direct, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    # torchmetrics' KID on the same features (subsets of all 40 images: a permutation, the same value).
    features = TinyFeatures()
    real_images, fake_images = random_uint8(40, 1), random_uint8(40, 2) // 2
    reference = KernelInceptionDistance(feature=features, subsets=3, subset_size=40)
    reference.update(real_images, real=True)
    reference.update(fake_images, real=False)
    ours = kid(features(real_images), features(fake_images), subsets=3, subset_size=40)[0]
    assert ours == pytest.approx(float(reference.compute()[0]), rel=1e-4)


def test_kid_expectation_is_zero_for_the_same_distribution():
    g = torch.Generator().manual_seed(0)
    unbiased, biased = [], []
    for _ in range(300):
        x = torch.randn(12, 6, generator=g, dtype=torch.float64)
        y = torch.randn(12, 6, generator=g, dtype=torch.float64)
        unbiased.append(float(mmd2_unbiased(x, y)))
        k = lambda a, b: (a @ b.T / 6 + 1) ** 3  # noqa: E731
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))   # the V-statistic
    stderr = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * stderr
    assert np.mean(biased) > 10 * stderr            # what a biased estimator would give: clearly positive


# --------------------------------------------------------------------------------------------------
# The Inception network on real photos
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    return load_inception("random", seed=0)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """8 scikit-image photos, square crops at 64 x 64, uint8 (few: each costs a 299 x 299 Inception pass)."""
    from skimage import data

    crops = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "retina", "camera"):
        img = np.asarray(getattr(data, name)())
        img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        s = min(x.shape[1:])
        crops.append(F.interpolate(x[None, :, :s, :s].float(), size=(64, 64), mode="area")[0].round().to(torch.uint8))
    return torch.stack(crops)


def test_fid_of_real_photos_is_zero_against_themselves_and_grows_with_added_noise(inception, photos):
    features = inception(photos)
    real = FeatureStats.empty().add(features)
    # 8 images in 2048 dimensions: singular covariances, where a careless square root is complex noise.
    assert fid(real, FeatureStats.empty().add(features.clone())) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(photos.shape, generator=g)
    values = []
    for sigma in (0.05, 0.1, 0.2):
        noisy = (photos.float() + sigma * 255 * noise).clamp(0, 255).round().to(torch.uint8)
        values.append(fid(real, FeatureStats.empty().add(inception(noisy))))
    assert values[0] > 0.1
    assert values[0] < values[1] < values[2], values


def test_inception_weights_load_from_files_never_from_a_pickle(inception, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    images = random_uint8(1, 5, size=40)
    state = {k: v.clone().contiguous() for k, v in inception.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    expected = inception(images)
    for name in ("w.safetensors", "w.pth"):
        loaded = load_inception(tmp_path / name)
        assert not loaded.random_weights and torch.equal(loaded(images), expected)
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")     # a module: needs unpickling code
    with pytest.raises(EvaluationError, match="cannot be read as a state dict"):
        load_inception(tmp_path / "pickled.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(EvaluationError, match="not the weights of torch-fidelity's InceptionV3"):
        load_inception(tmp_path / "other.pth")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EvaluationError, match="--inception-weights FILE"):
        load_inception(None)


# --------------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------------


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns model outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_through_a_saved_tiny_clip(tiny_assets):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPProcessor

    scorer = ClipScore.load(str(tiny_assets / "enc" / "clip"))
    images = random_uint8(4, 7, size=48)
    captions = ["a cat on a windowsill", "a rocket on a launch pad", "an orange dahlia", "a cup of coffee"]
    scores = scorer(images, captions)
    assert scores.shape == (4,) and bool(((scores >= 0) & (scores <= 100)).all())
    processor = CLIPProcessor(image_processor=scorer.image_processor, tokenizer=scorer.tokenizer)
    for image, caption, score in zip(images, captions, scores):
        reference = clip_score(image, caption, model_name_or_path=lambda: (_TensorFeatures(scorer.model), processor))
        assert float(score) == pytest.approx(float(reference), rel=1e-4, abs=1e-4)
    # A caption longer than the text tower is truncated by the tokenizer, keeping its end token.
    long = "a very long caption about a rocket " * 40
    ids = scorer.tokenizer(long, truncation=True, max_length=scorer.max_tokens)["input_ids"]
    assert len(ids) == scorer.max_tokens and ids[-1] == scorer.tokenizer.eos_token_id
    assert float(scorer(images[:1], [long])[0]) >= 0


def test_clip_score_names_a_directory_that_is_not_a_clip(tmp_path):
    with pytest.raises(EvaluationError, match="could not load a CLIP model"):
        ClipScore.load(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# evaluate.py on a tiny trained checkpoint; the run history
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_assets, tmp_path_factory):
    """A tiny run of 3 steps holding 8 rows out, with checkpoints at steps 2 and 3."""
    run = tmp_path_factory.mktemp("eval") / "run"
    enc = tiny_assets / "enc"
    args = ["--preset", "tiny", "--run_dir", str(run), f"--data.dataset={tiny_assets / 'demo' / '64'}",
            f"--encoders.text=('{enc / 'gemma'}', '{enc / 'bert'}')", f"--encoders.pooled={enc / 'clip'}",
            "--model.width=64", "--model.num_heads=2", "--model.depth=2", "--data.batch_size=4",
            "--data.decode_workers=1", "--log.every=1", "--log.sample_every=0", "--log.sample_steps=2",
            "--train.warmup=2", "--steps", "3", "--data.val_rows=8", "--log.val_every=2", "--log.save_every=2"]
    assert train.main(args) == 0
    return run


def test_evaluate_end_to_end_with_random_inception_weights(trained_run, tiny_assets, tmp_path):
    from sd3.checkpoint.read import latest_checkpoint, load_config
    from sd3.data.dataset import BucketDataset

    out = tmp_path / "eval"
    data = tiny_assets / "demo" / "64"
    run = subprocess.run([sys.executable, "src/evaluate.py", "--ckpt", str(trained_run), "--data", str(data),
                          "--num", "3", "--steps", "2", "--cfg", "1,3", "--inception-weights", "random",
                          "--clip", str(tiny_assets / "enc" / "clip"), "--batch", "3", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for scale in ("1", "3"):
        assert any(re.fullmatch(rf"cfg {scale}: fid: \d+\.\d+", line) for line in lines), run.stdout
        assert any(re.fullmatch(rf"cfg {scale}: kid: -?\d+\.\d+ \+- \d+\.\d+", line) for line in lines)
        assert any(re.fullmatch(rf"cfg {scale}: clip_score: \d+\.\d+", line) for line in lines)
    assert "NOT comparable with published figures" in run.stdout and "NOT comparable" in run.stderr
    assert "evaluate:" in run.stderr                                    # the tqdm bar
    report = json.loads((out / "metrics.json").read_text())
    assert [r["cfg"] for r in report["results"]] == [1.0, 3.0]
    assert all(r["fid"] > 0 and r["clip_score"] is not None for r in report["results"])
    assert report["comparable_with_published"] is False and report["num"] == 3
    # The rows are held-out rows, by the trainer's own rule.
    cfg = load_config(latest_checkpoint(trained_run))
    ds = BucketDataset(cfg.data, seed=cfg.train.seed, num_model_ranks=1, max_res=cfg.model.max_res,
                       multiple=cfg.pixel_multiple)
    assert set(report["rows"]) <= set(ds.holdout.tolist()) and len(set(report["rows"])) == 3
    for name in ("cfg_sweep.png", "samples.png"):
        image = Image.open(out / name)
        assert image.width > 200 and image.height > 200
    grid = Image.open(out / "samples.png")
    assert grid.width >= 3 * 128                                        # real + two scales


def test_evaluate_one_scale_prints_plain_lines(trained_run, tiny_assets, tmp_path, capsys):
    assert evaluate.main(["--ckpt", str(trained_run), "--num", "2", "--steps", "1", "--cfg", "2", "--split", "all",
                          "--inception-weights", "random", "--out", str(tmp_path), "--grid-rows", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.fullmatch(r"fid: \d+\.\d+", line) for line in lines)
    assert any(re.fullmatch(r"kid: -?\d+\.\d+ \+- \d+\.\d+", line) for line in lines)
    assert not any("clip_score:" in line for line in lines)
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "all"


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "1,x"], "'x' is not a number"),
    (["--cfg", "1,-2"], "-2 is not a guidance scale"),
    (["--cfg", "3,3"], "3 is listed twice"),
    (["--num", "9"], "--num 9 is more than the 8 held-out rows"),
    (["--num", "1"], "--num 1: must be at least 2"),
    (["--inception-weights", "missing.pth"], "missing.pth: no such file"),
])
def test_evaluate_rejects_bad_input_before_loading_models(trained_run, tmp_path, monkeypatch, argv, message):
    import sd3.diffusion.pipeline
    import sd3.eval.scores

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(sd3.eval.scores, "load_inception", loaded)
    monkeypatch.setattr(sd3.diffusion.pipeline.Pipeline, "load", loaded)
    base = {"--ckpt": str(trained_run), "--num": "4", "--out": str(tmp_path), "--cfg": "1"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(evaluate.UsageError, match=re.escape(message)):
        evaluate.main([x for kv in base.items() for x in kv])


def test_evaluate_missing_checkpoint_fails_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "src/evaluate.py", "--ckpt", str(tmp_path / "nope"), "--num", "4",
                          "--out", str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith("evaluate: checkpoint") and "does not exist" in run.stderr


def test_training_writes_metrics_jsonl(trained_run):
    records = read_history(trained_run)
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3]
    first = next(r for r in records if "loss" in r)
    assert first["images"] == 4 and first["lr"] > 0 and "grad_norm" in first
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [2] and any(k.startswith("val/loss_t") for k in val[0])


def test_resumed_run_drops_the_history_past_its_checkpoint(trained_run, tiny_assets, tmp_path):
    import shutil

    from sd3.checkpoint.read import list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(list_checkpoints(run)[-1][1])                 # killed after logging step 3, before saving it
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5')                      # and in the middle of a line
    enc = tiny_assets / "enc"
    assert train.main(["--preset", "tiny", "--run_dir", str(run), f"--data.dataset={tiny_assets / 'demo' / '64'}",
                       f"--encoders.text=('{enc / 'gemma'}', '{enc / 'bert'}')", f"--encoders.pooled={enc / 'clip'}",
                       "--model.width=64", "--model.num_heads=2", "--model.depth=2", "--data.batch_size=4",
                       "--data.decode_workers=1", "--log.every=1", "--log.sample_every=0", "--train.warmup=2",
                       "--steps", "4", "--data.val_rows=8", "--log.val_every=2", "--log.save_every=2",
                       "--resume", "auto"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]            # every line is whole JSON
    assert [s for s, line in zip(steps, lines) if '"loss"' in line] == [1, 2, 3, 4]
    assert steps == sorted(steps)


def test_history_writes_null_for_non_finite_values_and_reader_never_doubles_back(tmp_path):
    history = History(tmp_path, images_per_step=8)
    history.write(1, {"loss": float("nan"), "lr": 1e-3})
    history.write(2, {"loss": 0.5})
    history.close()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 1, "images": 8, "loss": None, "lr": 1e-3}
    with open(tmp_path / "metrics.jsonl", "a") as f:            # an old file where a resumed run appended
        f.write('{"step": 3, "loss": 0.4}\n{"step": 2, "loss": 0.45}\n{"step": 3, "loss": 0.3}\n')
    assert [(r["step"], r["loss"]) for r in read_history(tmp_path)] == [(1, None), (2, 0.45), (3, 0.3)]
    assert History(tmp_path, start_step=1).dropped == 4             # a run starting at step 1 keeps step 1 only
    assert [r["step"] for r in read_history(tmp_path)] == [1]


def test_plot_run_writes_a_png_of_several_runs(trained_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3, "val/loss": 0.9 / step,
                                "val/loss_t0.50": 0.8 / step}) + "\n")
        f.write(json.dumps({"step": 3, "eval/fid": 120.5, "eval/clip_score": 21.0}) + "\n")
    out = tmp_path / "plot.png"
    assert plot_run.main([str(trained_run), str(other), "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.width > 800 and image.height > 300
    assert "wrote" in capsys.readouterr().out
    assert plot_run.main([str(trained_run)]) == 0
    assert (trained_run / "metrics.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        plot_run.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
