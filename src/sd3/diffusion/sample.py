"""Sampling: the time schedule, classifier-free guidance and three samplers.

Time runs from t = 1 (noise) to t = 0 (data); the model's velocity points from data to noise,
so every step moves x by (t_next - t_cur) * v with t_next < t_cur.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sd3.diffusion.flow import Cond, shift_t

SAMPLERS = ("euler", "heun", "euler_stochastic")
Velocity = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> v; t is a scalar tensor


def schedule(steps: int, *, shift: float = 1.0, device=None) -> Tensor:
    """(steps + 1,) times from 1 to 0: equal steps, optionally shifted toward noise (SD3 sec. 5.3.2)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    return shift_t(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).float()


# --- conditioning ---------------------------------------------------------------------------------


def null_cond(like: Cond) -> Cond:
    """The unconditional input training used: every stream zero with its mask off."""
    return Cond(text=tuple(torch.zeros_like(x) for x in like.text),
                text_mask=tuple(torch.zeros_like(m) for m in like.text_mask),
                pooled=torch.zeros_like(like.pooled))


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Stack two conditionings along the batch, right-padding each text stream to the longer one."""
    def pad(x: Tensor, length: int) -> Tensor:
        extra = length - x.shape[1]
        return x if extra == 0 else F.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra))

    text, mask = [], []
    for xa, xb, ma, mb in zip(a.text, b.text, a.text_mask, b.text_mask):
        n = max(xa.shape[1], xb.shape[1])
        text.append(torch.cat([pad(xa, n), pad(xb, n)]))
        mask.append(torch.cat([pad(ma, n), pad(mb, n)]))
    return Cond(text=tuple(text), text_mask=tuple(mask), pooled=torch.cat([a.pooled, b.pooled]))


def guided(model, *, cond: Cond, uncond: Cond, scale: float) -> Velocity:
    """The velocity with classifier-free guidance, v = v_u + s (v_c - v_u), in one batched forward."""
    both = cat_cond(cond, uncond)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return _call(model, x, t, cond)
        v_cond, v_uncond = _call(model, torch.cat([x, x]), t, both).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity


def _call(model, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    return model(xt=x, t=t.expand(x.shape[0]).to(x.device, x.dtype), text=cond.text, text_mask=cond.text_mask,
                 pooled=cond.pooled).float()


# --- samplers -------------------------------------------------------------------------------------


def euler(velocity: Velocity, x: Tensor, ts: Tensor, *, on_step=None, generator=None) -> Tensor:
    """`on_step(x, t, x0)` after each step: the new state, its time, and the clean estimate x0 = x_t - t v
    the step was taken from (the flow's x_t = (1 - t) x0 + t x1 with v = x1 - x0)."""
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t_cur)
        x0 = x - t_cur * v
        x = x + (t_next - t_cur) * v
        if on_step:
            on_step(x, t_next, x0)
    return x


def heun(velocity: Velocity, x: Tensor, ts: Tensor, *, on_step=None, generator=None) -> Tensor:
    """Second order: average the slopes at both ends of the step (two model calls per step). The step
    to t = 0 is a plain Euler step, as in Karras et al. 2022 (arXiv 2206.00364, Alg. 1): the model is
    never asked for the velocity at t = 0, where the flow's velocity (x - x0) / t is undefined."""
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t_cur
        v = velocity(x, t_cur)
        if t_next > 0:
            v = (v + velocity(x + dt * v, t_next)) / 2
        x0 = x - t_cur * v
        x = x + dt * v
        if on_step:
            on_step(x, t_next, x0)
    return x


def stochastic_sigma(t: Tensor) -> Tensor:
    """The seed's noise level, zero at both ends: sigma(t) = t (1 - t) / (1 - t + 0.008)."""
    return t * (1 - t) / (1 - t + 0.008)


def euler_stochastic(velocity: Velocity, x: Tensor, ts: Tensor, *, on_step=None,
                     generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE with the flow's marginals (Song et al. 2021, arXiv 2011.13456;
    SiT, Ma et al. 2024, arXiv 2401.08740): dx = [v - sigma^2/2 * score] dt + sigma dW, run backward
    in t, with the score from the velocity, score = -(x + (1 - t) v) / t. The seed only added noise,
    which drifts off the marginals. The last step to t = 0 is deterministic (x0 = x - t v)."""
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t_cur)
        x0 = x - t_cur * v
        h = t_cur - t_next
        if t_next <= 0:
            x = x - h * v
        else:
            sigma = stochastic_sigma(t_cur)
            score = -(x + (1 - t_cur) * v) / t_cur
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x - h * (v - sigma**2 / 2 * score) + sigma * h.sqrt() * noise
        if on_step:
            on_step(x, t_next, x0)
    return x


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return {"euler": euler, "heun": heun, "euler_stochastic": euler_stochastic}[name]


@torch.no_grad()
def sample(model, *, noise: Tensor, cond: Cond, uncond: Cond | None = None, steps: int = 30,
           cfg_scale: float = 5.0, sampler: str = "euler", shift: float = 1.0,
           generator: torch.Generator | None = None, on_step=None) -> Tensor:
    """Integrate from noise (t = 1) to latents (t = 0). `uncond` defaults to the trained null."""
    velocity = guided(model, cond=cond, uncond=null_cond(cond) if uncond is None else uncond, scale=cfg_scale)
    ts = schedule(steps, shift=shift)  # on the CPU: the samplers' `t_next <= 0` tests never wait for a GPU
    return get_sampler(sampler)(velocity, noise.float(), ts, on_step=on_step, generator=generator)
