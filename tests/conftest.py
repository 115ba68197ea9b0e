import os

import pytest
import torch

# Tests never touch the network: hub lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from sd3.config import ModelConfig


@pytest.fixture
def small_model_cfg() -> ModelConfig:
    """A model small enough for exact CPU tests, with two text streams of different widths."""
    return ModelConfig(in_channels=4, patch_size=2, depth=3, width=64, num_heads=4, text_dims=(24, 16),
                       pooled_dim=8, max_res=64, max_res_orig=64)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The demo dataset and the stand-in encoders, built once per test session (a few seconds)."""
    from sd3.config import preset
    from sd3.data.demo import ensure_demo_dataset
    from sd3.encode.stand_ins import make_tiny_encoders

    root = tmp_path_factory.mktemp("tiny_assets")
    cfg = preset("tiny")
    dataset = root / "demo" / "64"
    ensure_demo_dataset(dataset, max_res=cfg.model.max_res, multiple=cfg.pixel_multiple)
    encoders = [str(root / "enc" / name) for name in ("gemma", "bert", "clip")]
    cfg.encoders.text, cfg.encoders.pooled = tuple(encoders[:2]), encoders[2]
    make_tiny_encoders(cfg.encoders, cfg.model)
    return root


@pytest.fixture
def tiny_args(tiny_assets, tmp_path):
    """Command-line arguments for a fast `tiny` run in tmp_path (a smaller model than the demo's)."""
    enc = tiny_assets / "enc"

    def make(run_dir=None, *extra: str) -> list[str]:
        return ["--preset", "tiny", "--run_dir", str(run_dir or tmp_path / "run"),
                f"--data.dataset={tiny_assets / 'demo' / '64'}",
                f"--encoders.text=('{enc / 'gemma'}', '{enc / 'bert'}')", f"--encoders.pooled={enc / 'clip'}",
                "--model.width=64", "--model.num_heads=2", "--model.depth=2", "--data.batch_size=4",
                "--data.decode_workers=1", "--log.every=1", "--log.sample_steps=2", "--train.warmup=2", *extra]

    return make
