"""Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024 sec. 2-3).

x0 is data, x1 is noise, xt = (1 - t) x0 + t x1 and the model predicts v = x1 - x0. Every random
draw of a training step (t, noise, caption dropout, the image tokens patch masking keeps) comes from a
generator seeded by (seed, step, rank) and a salt, so a resumed run redraws exactly what the straight run drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sd3 import salts
from sd3.config import FlowConfig
from sd3.model.mmdit import gather_tokens, patchify


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu", *,
                   salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, rank, salt): stateless randomness, resumable by step."""
    words = [seed, step, rank] + ([salt] if salt else [])
    mixed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(mixed & ((1 << 63) - 1))




def shift_t(t: Tensor, alpha: float) -> Tensor:
    """SD3 sec. 5.3.2: t' = alpha t / (1 + (alpha - 1) t) moves t toward noise for alpha > 1."""
    return t if alpha == 1.0 else alpha * t / (1 + (alpha - 1) * t)


def shift_for(cfg: FlowConfig, img_tokens: int) -> float:
    """The shift for this many image tokens: fixed, or scaled by sqrt(tokens / base) (SD3 sec. 5.3.2)."""
    if cfg.t_shift_by_resolution:
        return cfg.t_shift * math.sqrt(img_tokens / cfg.t_shift_base_tokens)
    return cfg.t_shift


def sample_t(n: int, cfg: FlowConfig, *, img_tokens: int, generator: torch.Generator, device) -> Tensor:
    """(n,) training times in (0, 1), fp32: logit-normal (SD3 sec. 3.1) or uniform, then shifted."""
    if cfg.t_sampling == "logit_normal":
        t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, generator=generator, device=device))
    else:
        t = torch.rand(n, generator=generator, device=device)
    return shift_t(t, shift_for(cfg, img_tokens))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """xt = (1 - t) x0 + t x1 with t (B,) broadcast over the sample."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1


@dataclass
class Cond:
    """What the model is conditioned on; nulls are zeros with their mask off."""

    text: tuple[Tensor, ...]
    text_mask: tuple[Tensor, ...]
    pooled: Tensor


def dropout_keep(cfg: FlowConfig, *, seed: int, step: int, rank: int, batch_size: int) -> Tensor:
    """(B, n_text + 1) bool on the CPU: which text streams (then the pooled vector) each sample keeps.

    Each stream and the pooled vector are nulled with their own probabilities, and all of them
    together with `p_drop_all`, so the unconditional branch CFG uses is really trained (the seed's
    independent drops reached it in only ~1% of samples). A pure function of (seed, step, rank): the
    loader computes the same decision and does not send the token states of dropped streams."""
    g = step_generator(seed, step, rank, salt=salts.CAPTION_DROPOUT)
    n = len(cfg.p_drop_text)
    u = torch.rand(batch_size, n + 2, generator=g)                      # streams, pooled, all
    probs = torch.tensor([*cfg.p_drop_text, cfg.p_drop_pooled])
    return (u[:, : n + 1] >= probs) & (u[:, -1:] >= cfg.p_drop_all)


def drop_conditions(cond: Cond, keep: Tensor) -> Cond:
    """Null what `keep` (B, n_text + 1) says to drop: zeros with the mask off."""
    keep = keep.to(cond.pooled.device)
    n = len(cond.text)
    text = tuple(x * keep[:, i, None, None].to(x.dtype) for i, x in enumerate(cond.text))
    mask = tuple(m & keep[:, i, None] for i, m in enumerate(cond.text_mask))
    pooled = cond.pooled * keep[:, n, None].to(cond.pooled.dtype)
    return Cond(text=text, text_mask=mask, pooled=pooled)


def mask_ratio_at(step: int, *, ratio: float, steps: int, unmasked_steps: int) -> float:
    """The patch-masking ratio of optimizer step `step` (0-based) of a `steps`-step run: `ratio`, then 0 for the
    last `unmasked_steps` steps (MicroDiT's unmasked finetune)."""
    return 0.0 if step >= steps - unmasked_steps else ratio


def kept_count(img_tokens: int, ratio: float) -> int:
    """Image tokens kept per sample: round(L_img (1 - ratio)), at least one. A Python int of the bucket's
    shape, never of tensor values, so every step of a bucket has one static shape (compile, no host sync)."""
    return max(1, round(img_tokens * (1 - ratio)))


def draw_kept_tokens(*, seed: int, step: int, rank: int, batch_size: int, img_tokens: int, ratio: float,
                     device: torch.device | str = "cpu") -> Tensor:
    """(B, L_kept) int64 on `device`: each sample's kept image tokens (indices into the row-major grid), a
    uniform subset drawn independently per sample, in grid order. A pure function of (seed, step, rank).

    The argsort of uniform noise is a uniform random permutation of static shape: no `nonzero` or boolean
    indexing, so the device never makes the host wait."""
    g = step_generator(seed, step, rank, device, salt=salts.PATCH_MASK)
    order = torch.rand(batch_size, img_tokens, generator=g, device=device).argsort(dim=1)
    return order[:, : kept_count(img_tokens, ratio)].sort(dim=1).values


@dataclass
class FlowLoss:
    loss: Tensor
    """Scalar mean loss (what backward sees)."""
    per_sample: Tensor
    """(B,) detached per-sample MSE, for loss-by-t logging."""
    t: Tensor
    """(B,) the times drawn."""


def flow_loss(model, *, x0: Tensor, cond: Cond, cfg: FlowConfig, patch_size: int, generator: torch.Generator | None,
              keep: Tensor | None = None, t: Tensor | None = None, x1: Tensor | None = None,
              kept_tokens: Tensor | None = None) -> FlowLoss:
    """The rectified-flow loss of one batch (minRF-style: draw t and noise, interpolate, regress v).

    `keep` applies caption dropout (`dropout_keep`); `t` and `x1` may be given (validation at fixed t
    with fixed noise). `kept_tokens` (B, L_kept), patch masking (`draw_kept_tokens`): the model predicts
    those image tokens only, and the loss is their mean squared error against the target patchified alike;
    the dropped patches' targets never enter it."""
    B, device = x0.shape[0], x0.device
    x0 = x0.float()
    img_tokens = (x0.shape[-2] // patch_size) * (x0.shape[-1] // patch_size)
    if t is None:
        t = sample_t(B, cfg, img_tokens=img_tokens, generator=generator, device=device)
    if x1 is None:
        x1 = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)  # noise in fp32
    if keep is not None:
        cond = drop_conditions(cond, keep)
    xt = interpolate(x0, x1, t)
    v_target = x1 - x0
    v_pred = model(xt=xt, t=t, text=tuple(x.float() for x in cond.text), text_mask=cond.text_mask,
                   pooled=cond.pooled.float(), kept_tokens=kept_tokens)
    if kept_tokens is not None:
        v_target = gather_tokens(patchify(v_target, patch_size), kept_tokens)                 # (B, L_kept, C p p)
    per_sample = F.mse_loss(v_pred.float(), v_target, reduction="none").mean(dim=tuple(range(1, v_target.dim())))
    return FlowLoss(loss=per_sample.mean(), per_sample=per_sample.detach(), t=t)

