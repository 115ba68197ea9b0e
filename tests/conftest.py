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
