import diffusers
import pytest
import torch

from sd3.config import FlowConfig
from sd3.diffusion.flow import (
    Cond,
    drop_conditions,
    dropout_keep,
    flow_loss,
    interpolate,
    sample_t,
    shift_for,
    shift_t,
    step_generator,
)
from sd3.diffusion.sample import cat_cond, euler, euler_stochastic, guided, heun, null_cond, sample, schedule
from sd3.model.mmdit import MMDiT


def make_cond(B=4, lengths=(5, 3), dims=(6, 4), P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(text=tuple(torch.randn(B, n, d, generator=g) + 1 for n, d in zip(lengths, dims)),
                text_mask=tuple(torch.ones(B, n, dtype=torch.bool) for n in lengths),
                pooled=torch.randn(B, P, generator=g) + 1)


# --- rectified flow ---------------------------------------------------------------------------------


def test_interpolation_endpoints_and_target():
    x0, x1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.tensor([0.25, 0.5, 0.75])
    xt = interpolate(x0, x1, t)
    # Moving along the target velocity from xt by (1 - t) reaches the noise.
    torch.testing.assert_close(xt + (1 - t).view(-1, 1, 1, 1) * (x1 - x0), x1)


def test_t_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, FlowConfig(), img_tokens=256, generator=g, device="cpu")
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() < 1
    assert abs(t.median() - 0.5) < 0.01                       # logit-normal(0, 1) is symmetric about 1/2
    assert abs(torch.logit(t).std() - 1.0) < 0.01
    u = sample_t(200_000, FlowConfig(t_sampling="uniform"), img_tokens=256, generator=g, device="cpu")
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.002
    shifted = sample_t(200_000, FlowConfig(t_shift=3.0), img_tokens=256, generator=g, device="cpu")
    assert shifted.median() > 0.7                              # toward noise


def test_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_t(t, 1.0), t)
    s = shift_t(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:-1] > t[1:-1])
    torch.testing.assert_close(shift_t(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    cfg = FlowConfig(t_shift=1.0, t_shift_by_resolution=True, t_shift_base_tokens=256)
    assert shift_for(cfg, 256) == 1.0 and shift_for(cfg, 1024) == 2.0 and shift_for(cfg, 4096) == 4.0


def test_caption_dropout_rates_and_nulls():
    B = 100_000
    cfg = FlowConfig(p_drop_text=(0.316, 0.316), p_drop_pooled=0.1, p_drop_all=0.1)
    cond = make_cond(B=B)
    keep = dropout_keep(cfg, seed=0, step=3, rank=1, batch_size=B)
    assert torch.equal(keep, dropout_keep(cfg, seed=0, step=3, rank=1, batch_size=B))  # pure function
    assert not torch.equal(keep, dropout_keep(cfg, seed=0, step=3, rank=0, batch_size=B))
    out = drop_conditions(cond, keep)
    text_off = [~m.any(dim=1) for m in out.text_mask]
    pooled_off = (out.pooled == 0).all(dim=1)
    for off in text_off:  # 0.1 + 0.9 * 0.316
        assert abs(off.float().mean() - (0.1 + 0.9 * 0.316)) < 0.01
    assert abs(pooled_off.float().mean() - (0.1 + 0.9 * 0.1)) < 0.01
    all_off = text_off[0] & text_off[1] & pooled_off
    assert abs(all_off.float().mean() - (0.1 + 0.9 * 0.316**2 * 0.1)) < 0.01
    # Nulls are zeros with their mask off; kept samples are untouched.
    for x, x_in, m, off in zip(out.text, cond.text, out.text_mask, text_off):
        assert torch.all(x[off] == 0) and not m[off].any()
        assert torch.equal(x[~off], x_in[~off])


def test_step_generator_is_a_pure_function_of_seed_step_rank():
    draw = lambda *a: torch.randn(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 6, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 5, 2))
    assert not torch.equal(draw(0, 5, 1), draw(1, 5, 1))


def test_flow_loss(small_model_cfg):
    model = MMDiT(small_model_cfg)
    cond = make_cond(B=3, lengths=(5, 2), dims=small_model_cfg.text_dims, P=small_model_cfg.pooled_dim)
    x0 = torch.randn(3, 4, 8, 8).to(torch.bfloat16)
    keep = dropout_keep(FlowConfig(), seed=0, step=7, rank=0, batch_size=3)
    run = lambda: flow_loss(model, x0=x0, cond=cond, cfg=FlowConfig(), patch_size=2,  # noqa: E731
                            generator=step_generator(0, 7, 0), keep=keep)
    a, b = run(), run()
    assert a.per_sample.shape == (3,) and a.t.shape == (3,)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    # A fresh model predicts 0, so the loss is |x1 - x0|^2: about 1 + E[x0^2] = 2.
    assert 1.5 < a.loss.item() < 2.5
    assert a.loss.dtype == torch.float32
    t, x1 = torch.full((3,), 0.5), torch.randn(3, 4, 8, 8)
    fixed = flow_loss(model, x0=x0, cond=cond, cfg=FlowConfig(), patch_size=2, generator=None, t=t, x1=x1)
    torch.testing.assert_close(fixed.per_sample, (x1 - x0.float()).square().mean(dim=(1, 2, 3)))


# --- samplers ---------------------------------------------------------------------------------------


def test_schedule():
    ts = schedule(4)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = schedule(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and torch.all(shifted[1:-1] > ts[1:-1])
    with pytest.raises(ValueError):
        schedule(0)


@pytest.mark.parametrize("sampler", [euler, heun])
def test_samplers_integrate_a_straight_flow_exactly(sampler):
    """Constant velocity (a straight path from x1 to x0): any schedule lands exactly on x0."""
    x0, x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = sampler(lambda x, t: x1 - x0, x1.clone(), schedule(7, shift=2.5).double())
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


def test_euler_is_exact_on_the_flow_to_a_point():
    """For data at a single point mu the true velocity is (x - mu) / t: Euler stays on x_t = mu + t (x1 - mu)."""
    mu, x1 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    trajectory = []
    out = euler(lambda x, t: (x - mu) / t, x1.clone(), schedule(6, shift=3.0).double(),
                on_step=lambda x, t, x0: trajectory.append((x.clone(), t)))
    for x, t in trajectory:
        torch.testing.assert_close(x, mu + t * (x1 - mu), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, mu)
    stochastic = euler_stochastic(lambda x, t: (x - mu) / t, x1.clone(), schedule(6).double(),
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stochastic, mu)  # its last step is the deterministic x0 estimate


@pytest.mark.parametrize("sampler", [euler, heun, euler_stochastic])
def test_samplers_report_the_clean_estimate(sampler):
    """For data at a single point mu the true velocity is (x - mu) / t, so every step's clean estimate
    x0 = x_t - t v is mu itself: what denoise.gif shows."""
    mu, x1 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    estimates = []
    sampler(lambda x, t: (x - mu) / t, x1.clone(), schedule(6, shift=2.0).double(),
            on_step=lambda x, t, x0: estimates.append(x0), generator=torch.Generator().manual_seed(0))
    assert len(estimates) == 6
    for x0 in estimates:
        torch.testing.assert_close(x0, mu)


def test_heun_never_evaluates_the_velocity_at_t_zero():
    """The oracle velocity of the flow to a point, (x - mu) / t, is undefined at t = 0: Heun's last step
    must not ask for it, and lands on mu."""
    mu, x1 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    seen = []

    def velocity(x, t):
        seen.append(float(t))
        return (x - mu) / t

    out = heun(velocity, x1.clone(), schedule(6, shift=3.0).double())
    assert min(seen) > 0
    torch.testing.assert_close(out, mu)


def test_stochastic_sampler_keeps_gaussian_marginals():
    """Data N(0, s^2): the exact velocity is linear; the SDE sampler must end at variance s^2 (the
    seed's noise-only version inflates it)."""
    s2 = 0.25

    def velocity(x, t):  # E[x1 - x0 | xt] for x0 ~ N(0, s2), x1 ~ N(0, 1)
        var = (1 - t) ** 2 * s2 + t**2
        return (t - (1 - t) * s2) / var * x

    x1 = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = euler_stochastic(velocity, x1, schedule(200).double(), generator=torch.Generator().manual_seed(1))
    assert abs(out.var().item() - s2) < 0.01


def test_euler_matches_diffusers_flow_match_euler():
    sigmas = schedule(12, shift=3.0)
    fn = lambda x, t: torch.sin(3 * x) + t * x  # noqa: E731  any velocity function
    x_init = torch.randn(2, 4, 6, 6)
    ours = []
    euler(fn, x_init.clone(), sigmas, on_step=lambda x, t, x0: ours.append(x))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())
    x, theirs = x_init.clone(), []
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(fn(x, scheduler.sigmas[i]), timestep, x).prev_sample
        theirs.append(x)
    assert len(ours) == len(theirs) == 12
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class Recorder(torch.nn.Module):
    """A fake model whose velocity depends on the pooled vector, recording its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, *, xt, t, text, text_mask, pooled):
        self.calls.append((xt.shape[0], [m.clone() for m in text_mask]))
        return xt * 0 + pooled.sum(dim=1).view(-1, 1, 1, 1)


def test_classifier_free_guidance_formula_and_negative_prompt():
    cond, neg = make_cond(B=2, seed=1), make_cond(B=2, lengths=(2, 6), seed=2)
    model = Recorder()
    v = guided(model, cond=cond, uncond=neg, scale=5.0)(torch.zeros(2, 1, 2, 2), torch.tensor(0.5))
    v_c, v_u = cond.pooled.sum(1), neg.pooled.sum(1)
    torch.testing.assert_close(v[:, 0, 0, 0], v_u + 5.0 * (v_c - v_u))
    assert model.calls[0][0] == 4  # cond and uncond in one batched forward
    # Default negative: the trained null (zeros, masks off), not an encoded empty string.
    model.calls.clear()
    sample(model, noise=torch.zeros(2, 1, 2, 2), cond=cond, steps=1, cfg_scale=2.0)
    masks = model.calls[0][1]
    assert all(m[:2].all() and not m[2:].any() for m in masks)
    assert null_cond(cond).pooled.abs().sum() == 0


def test_cat_cond_pads_text_streams():
    a, b = make_cond(B=1, lengths=(5, 3)), make_cond(B=2, lengths=(2, 6))
    both = cat_cond(a, b)
    assert [x.shape[:2] for x in both.text] == [(3, 5), (3, 6)]
    assert both.text_mask[0][1:, 2:].any().item() is False and both.text_mask[1][0, 3:].any().item() is False
