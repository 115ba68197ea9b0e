"""Sampling images from a checkpoint: what `infer.py`, the notebook and the trainer's sample grid share.

    pipe = Pipeline.load("runs/tiny/checkpoints/step_00000600")
    result = pipe.generate(["a cat on a windowsill"], width=64, height=64, steps=30, cfg=5.0, seed=0)
    result.images[0].save("cat.png")

Prompts go through the same `TextEncoders.encode` as training; the default negative prompt is the
trained null (zeros, masks off), exactly what caption dropout trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from sd3.checkpoint import find_checkpoint, load_config, load_weights
from sd3.config import Config
from sd3.encoders import Autoencoder, TextEncoders, load_autoencoder, load_text_encoders
from sd3.flow import Cond
from sd3.model.mmdit import MMDiT, check_image_size
from sd3.sample import null_cond, sample


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def make_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (any sizes) on a white grid, row-major."""
    columns = columns or max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images) + pad
    cell_h = max(im.height for im in images) + pad
    grid = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % columns) * cell_w, pad + (i // columns) * cell_h))
    return grid


@torch.no_grad()
def generate_latents(model: MMDiT, *, cond: Cond, uncond: Cond | None, width: int, height: int,
                     latent_factor: int, steps: int, cfg: float, sampler: str, seed: int, shift: float = 1.0,
                     precision: str | None = None, on_step=None) -> Tensor:
    """Latents (B, C, H/f, W/f) for `cond` (B prompts), from noise seeded by `seed`. `precision`: 'bf16'
    (autocast) or 'fp32'; by default bf16 on CUDA and fp32 elsewhere."""
    check_image_size(model.cfg, latent_factor, width, height)
    device = next(model.parameters()).device
    B = cond.pooled.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(B, model.cfg.in_channels, height // latent_factor, width // latent_factor, generator=g)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return sample(model, noise=noise.to(device), cond=cond, uncond=uncond, steps=steps, cfg_scale=cfg,
                      sampler=sampler, shift=shift, generator=torch.Generator(device=device).manual_seed(seed + 1),
                      on_step=on_step)


def encode_prompts(text: TextEncoders, prompts: list[str]) -> Cond:
    states, masks, pooled = text.encode(prompts)
    return Cond(text=tuple(states), text_mask=tuple(masks), pooled=pooled)


@dataclass
class Result:
    images: list[Image.Image]
    frames: list[list[Image.Image]] = field(default_factory=list)
    """Per step, the decoded current estimate of every image (when asked for)."""


class Pipeline:
    """A loaded model (EMA weights by default) with its text encoders and autoencoder."""

    def __init__(self, model: MMDiT, text: TextEncoders, ae: Autoencoder, cfg: Config):
        self.model, self.text, self.ae, self.cfg = model.eval(), text, ae, cfg

    @classmethod
    def load(cls, ckpt: str | Path, *, device: str | None = None, ema: bool = True,
             prepare: Callable[[Config], object] | None = None) -> Pipeline:
        """`ckpt`: a step_* checkpoint directory or a run directory (its newest verified checkpoint).
        `prepare(cfg)` runs before the encoders load (the entry scripts create stand-ins there)."""
        path = find_checkpoint(str(ckpt), Path(ckpt).parent)
        cfg = load_config(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = MMDiT(cfg.model)
        load_weights(path, model, ema=ema)
        if prepare is not None:
            prepare(cfg)
        return cls(model.to(device), load_text_encoders(cfg.encoders, device), load_autoencoder(cfg.encoders, device),
                   cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], *, negative: str = "", width: int | None = None,
                 height: int | None = None, steps: int = 30, cfg: float = 5.0, sampler: str = "euler",
                 seed: int = 0, shift: float = 1.0, frames: bool = False) -> Result:
        width = width or self.cfg.model.max_res
        height = height or self.cfg.model.max_res
        check_image_size(self.cfg.model, self.ae.factor, width, height)
        cond = encode_prompts(self.text, prompts)
        uncond = null_cond(cond) if not negative else encode_prompts(self.text, [negative] * len(prompts))
        trajectory: list[list[Image.Image]] = []

        def on_step(x: Tensor, t: Tensor) -> None:
            trajectory.append(to_pil(self.ae.decode(x)))

        latents = generate_latents(self.model, cond=cond, uncond=uncond, width=width, height=height,
                                   latent_factor=self.ae.factor, steps=steps, cfg=cfg, sampler=sampler, seed=seed,
                                   shift=shift, on_step=on_step if frames else None)
        return Result(images=to_pil(self.ae.decode(latents)), frames=trajectory)


def save_gif(frames: list[list[Image.Image]], path: Path, *, columns: int | None = None, ms: int = 120) -> None:
    """One GIF of the whole grid over the steps, holding the last frame."""
    tiles = [make_grid(step, columns) for step in frames]
    tiles += [tiles[-1]] * 10
    tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=ms, loop=0)

