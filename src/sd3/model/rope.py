"""2-D rotary position embedding over the patch grid (image tokens only; text is not rotated).

Half of each head's channels rotate by the token's row, the other half by its column, with the
usual frequencies theta^(-2k/d) over each half (d = head_dim / 2). Positions are multiplied by
`scale` = max_res_orig / max_res: a stage trained at a larger resolution from a smaller one sees
positions in the range the first stage learned (position interpolation, Chen et al. 2023,
arXiv 2306.15595), instead of extrapolating.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(grid_h: int, grid_w: int, head_dim: int, *, theta: float, scale: float,
                     device: torch.device) -> Tensor:
    """Unit complex rotations (L_img, head_dim / 2) for a row-major grid of grid_h x grid_w tokens."""
    half = head_dim // 2                      # channels per axis
    inv_freq = theta ** (-torch.arange(0, half, 2, device=device, dtype=torch.float64) / half)  # (half/2,)
    rows = torch.arange(grid_h, device=device, dtype=torch.float64) * scale
    cols = torch.arange(grid_w, device=device, dtype=torch.float64) * scale
    row_angles = torch.outer(rows, inv_freq)[:, None, :].expand(grid_h, grid_w, -1)  # (h, w, half/2)
    col_angles = torch.outer(cols, inv_freq)[None, :, :].expand(grid_h, grid_w, -1)  # (h, w, half/2)
    angles = torch.cat([row_angles, col_angles], dim=-1).reshape(grid_h * grid_w, half)  # (L_img, Dh/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, L_img, Dh) by `rotations` (L_img, Dh/2): one complex
    multiply (in fp32) instead of four real ones."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))   # (B, H, L_img, Dh/2)
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)
