"""Model fixtures shared by the model and GPU-path tests."""

from __future__ import annotations

import torch

from sd3.model.mmdit import MMDiT


def perturbed(cfg, seed: int = 0) -> MMDiT:
    """A model whose zero-initialised parts are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = MMDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
