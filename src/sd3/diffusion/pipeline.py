"""Sampling images from a checkpoint: what `infer.py`, the notebook and the trainer's sample grid share.

    pipe = Pipeline.load("runs/tiny/checkpoints/step_00000600")
    result = pipe.generate(["a cat on a windowsill"], width=64, height=64, steps=30, guidance=5.0, seed=0)
    result.images[0].save("cat.png")

Prompts go through the same `TextEncoders.encode` as training; the default negative prompt is the
trained null (zeros, masks off), exactly what caption dropout trained.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from sd3.checkpoint.read import find_checkpoint, load_config, load_weights
from sd3.config import Config
from sd3.diffusion.flow import Cond, shift_for
from sd3.diffusion.sample import null_cond, sample
from sd3.encode.encoders import Autoencoder, TextEncoders, load_autoencoder, load_text_encoders
from sd3.model.mmdit import MMDiT, check_image_size


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def make_grid(images: list[Image.Image], columns: int | None = None, *, captions: list[str] | None = None,
              min_side: int = 128, pad: int = 4, caption_lines: int = 3) -> Image.Image:
    """Tile images (any sizes) on a white grid, row-major. Small images are scaled up (nearest neighbour,
    whole multiples: pixels stay pixels) until their long side reaches `min_side`; each tile gets its
    caption underneath, wrapped to its width, when `captions` are given."""
    columns = columns or max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / columns)
    zoom = max(1, -(-min_side // max(max(im.size) for im in images)))
    images = [im.resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST) for im in images]
    cell_w = max(im.width for im in images) + pad
    font, line_h = _font(), 13
    wrapped = [textwrap.wrap(c or "(no caption)", max(8, int(cell_w / 6.2)), max_lines=caption_lines,
                             placeholder=" ...") for c in captions] if captions else [[] for _ in images]
    text_h = max(len(w) for w in wrapped) * line_h + (pad if captions else 0)
    cell_h = max(im.height for im in images) + pad + text_h
    grid = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        x, y = pad + (i % columns) * cell_w, pad + (i // columns) * cell_h
        grid.paste(im, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + im.height + pad // 2 + j * line_h), line, fill="black", font=font)
    return grid


@torch.no_grad()
def generate_latents(model: MMDiT, *, cond: Cond, uncond: Cond | None, width: int, height: int,
                     latent_factor: int, steps: int, guidance: float, sampler: str, seed: int, shift: float = 1.0,
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
        return sample(model, noise=noise.to(device), cond=cond, uncond=uncond, steps=steps, cfg_scale=guidance,
                      sampler=sampler, shift=shift, generator=torch.Generator(device=device).manual_seed(seed + 1),
                      on_step=on_step)


def encode_prompts(text: TextEncoders, prompts: list[str]) -> Cond:
    states, masks, pooled = text.encode(prompts)
    return Cond(text=tuple(states), text_mask=tuple(masks), pooled=pooled)


@dataclass
class Result:
    images: list[Image.Image]
    frames: list[tuple[list[Image.Image], list[Image.Image]]] = field(default_factory=list)
    """Per step (when asked for), the decoded state x_t of every image and its clean estimate
    x0 = x_t - t v, the picture the model is heading for."""


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

    def shift_at(self, width: int, height: int) -> float:
        """The schedule shift the run trained with at this size (fixed or resolution-dependent)."""
        p, f = self.cfg.model.patch_size, self.ae.factor
        return shift_for(self.cfg.flow, (width // f // p) * (height // f // p))

    def generate(self, prompts: list[str], *, negative: str = "", width: int | None = None,
                 height: int | None = None, steps: int = 30, guidance: float = 5.0, sampler: str = "euler",
                 seed: int = 0, shift: float | None = None, frames: bool = False) -> Result:
        """`shift`: None takes the one training used at this size (`shift_at`)."""
        width = width or self.cfg.model.max_res
        height = height or self.cfg.model.max_res
        check_image_size(self.cfg.model, self.ae.factor, width, height)
        shift = self.shift_at(width, height) if shift is None else shift
        cond = encode_prompts(self.text, prompts)
        uncond = null_cond(cond) if not negative else encode_prompts(self.text, [negative] * len(prompts))
        trajectory: list[tuple[list[Image.Image], list[Image.Image]]] = []

        def on_step(x: Tensor, t: Tensor, x0: Tensor) -> None:
            trajectory.append((to_pil(self.ae.decode(x)), to_pil(self.ae.decode(x0))))

        latents = generate_latents(self.model, cond=cond, uncond=uncond, width=width, height=height,
                                   latent_factor=self.ae.factor, steps=steps, guidance=guidance, sampler=sampler,
                                   seed=seed, shift=shift, on_step=on_step if frames else None)
        return Result(images=to_pil(self.ae.decode(latents)), frames=trajectory)


def save_gif(frames: list[tuple[list[Image.Image], list[Image.Image]]], path: Path, *, ms: int = 150) -> None:
    """One GIF over the sampling steps: for every image, the state x_t (left) beside the clean estimate
    x0 = x_t - t v (right), one image per row; the last frame is held."""
    tiles = []
    for states, estimates in frames:
        pairs = [im for pair in zip(states, estimates) for im in pair]
        tiles.append(make_grid(pairs, columns=2, captions=["x_t", "x0 estimate"] * len(states), caption_lines=1))
    tiles += [tiles[-1]] * 10
    tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=ms, loop=0)
