"""Patch masking (MicroDiT's deferred masking): the patch-mixer sees every image token, the main blocks and
the loss see the kept ones, at their own RoPE positions; off, the model is the model without the feature.

The model, draws, loss and FLOP count are checked here on the CPU (every attention backend through its
stand-in, bf16 autocast, non-square grids, compile with fullgraph=True, no host sync); a training run with
masking resumes exactly (tests/test_train.py's method).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_stand_ins import stand_ins
from test_gpu_paths import CAPTIONS, HostSyncs, inputs, perturbed, step_setup, with_backend
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sd3.model.mmdit as mmdit
from sd3.checkpoint.read import list_checkpoints
from sd3.config import ConfigError, FlowConfig, preset
from sd3.diffusion.flow import Cond, draw_kept_tokens, flow_loss, interpolate, kept_count, mask_ratio_at, step_generator
from sd3.model.attention import JointAttention, attention, use_kernels
from sd3.model.mmdit import MMDiT, apply_rope, compute_dtype, joint_rms_norm, patchify, unpatchify
from sd3.model.rope import rope_frequencies

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["sdpa", "flash", "xformers"]


@pytest.fixture
def cfg(small_model_cfg):
    return dataclasses.replace(small_model_cfg, width=64, num_heads=4)  # head width 16: flash takes it


def mixed(cfg, *, depth=1, joint=True):
    return dataclasses.replace(cfg, mask_ratio=0.75, mixer_depth=depth, mixer_joint=joint)


def kept_of(x: dict, ratio=0.75, seed=0) -> Tensor:
    B, _, h, w = x["xt"].shape
    return draw_kept_tokens(seed=seed, step=3, rank=0, batch_size=B, img_tokens=(h // 2) * (w // 2), ratio=ratio)


# --- off is the model without the feature ----------------------------------------------------------------


def pre_masking_forward(model: MMDiT, *, xt, t, text, text_mask, pooled) -> Tensor:
    """`MMDiT.forward` and `JointBlock.forward` as they were before patch masking existed, verbatim but for
    being written as functions over the model's modules: the reference "masking off" must equal bit for bit."""
    p = model.cfg.patch_size
    B, _, h, w = xt.shape
    grid_h, grid_w = h // p, w // p
    img = model.img_in(patchify(xt, p))
    txt = torch.cat([embed(x) for embed, x in zip(model.txt_in, text)], dim=1)
    vec = F.silu(model.time_in(t) + model.pooled_in(pooled))
    pe = F.pad(model.rope(grid_h, grid_w, xt.device), (0, 0, 0, txt.shape[1]), value=1.0)
    attn = JointAttention.build(model.attn_backend(xt.device), img_len=img.shape[1], txt_masks=[
        m.bool() for m in text_mask], batch=B, dtype=compute_dtype(xt.device, img.dtype), device=xt.device)
    txt = attn.arrange(txt)
    for block in model.blocks:
        img, txt = pre_masking_block(block, img=img, txt=txt, vec=vec, pe=pe, attn=attn)
    return unpatchify(model.final(img, vec), grid_h, grid_w, p)


def pre_masking_block(self, *, img, txt, vec, pe, attn):
    img_mod1, img_mod2 = self.img_mod(vec)
    txt_mod1, *txt_mod2 = self.txt_mod(vec)
    img_q, img_k, img_v = self.img_attn.heads_of(img_mod1.apply(self.norm(img)))
    txt_q, txt_k, txt_v = self.txt_attn.heads_of(txt_mod1.apply(self.norm(txt)))
    v = torch.cat([img_v, txt_v], dim=2)
    k = apply_rope(joint_rms_norm([img_k, txt_k], [self.img_attn.k_norm, self.txt_attn.k_norm]), pe)
    if self.last:
        q = apply_rope(joint_rms_norm([img_q], [self.img_attn.q_norm]), pe[: img_q.shape[2]])
    else:
        q = apply_rope(joint_rms_norm([img_q, txt_q], [self.img_attn.q_norm, self.txt_attn.q_norm]), pe)
    out = attention(q.to(v.dtype), k.to(v.dtype), v, attn=attn)
    img = self.update(img, out[:, : img.shape[1]], self.img_attn.proj, img_mod1, self.img_mlp, img_mod2)
    if self.last:
        return img, txt
    txt = self.update(txt, out[:, img.shape[1] :], self.txt_attn.proj, txt_mod1, self.txt_mlp, txt_mod2[0])
    return img, txt


def pre_masking_loss(model, *, x0, x1, t, cond: Cond) -> Tensor:
    """`flow_loss`'s per-sample loss before patch masking, given t and the noise."""
    x0 = x0.float()
    v_pred = model(xt=interpolate(x0, x1, t), t=t, text=tuple(x.float() for x in cond.text),
                   text_mask=cond.text_mask, pooled=cond.pooled.float())
    return F.mse_loss(v_pred.float(), x1 - x0, reduction="none").mean(dim=(1, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_masking_off_is_bit_identical_to_the_model_without_it(cfg, backend, precision):
    """mask_ratio 0 and no mixer (the defaults): the same output, loss and every gradient, bit for bit, as the
    forward before the feature, on every attention path, non-square, with padded and dropped captions."""
    if backend == "flash" and precision == "fp32":
        pytest.skip("flash-attn takes half precision only")
    assert cfg.mask_ratio == 0 and cfg.mixer_depth == 0
    model = with_backend(perturbed(cfg), backend)
    assert not any(k.startswith("mixer") for k in model.state_dict())
    x = inputs(cfg, h=6, w=12, real=CAPTIONS["dropped"])
    cond = Cond(text=x["text"], text_mask=x["text_mask"], pooled=x["pooled"])
    x1 = torch.randn(x["xt"].shape, generator=torch.Generator().manual_seed(1))
    results = []
    for forward, loss in ((pre_masking_forward, pre_masking_loss), (None, None)):
        model.zero_grad(set_to_none=True)
        with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = forward(model, **x) if forward else model(**x)
            if loss:
                mean = loss(model, x0=x["xt"], x1=x1, t=x["t"], cond=cond).mean()
            else:
                mean = flow_loss(model, x0=x["xt"], cond=cond, cfg=FlowConfig(), patch_size=2, generator=None,
                                 t=x["t"], x1=x1).loss
        (out.float().square().mean() + mean).backward()
        results.append((out, mean, {n: p.grad for n, p in model.named_parameters()}))
    (out_a, loss_a, grads_a), (out_b, loss_b, grads_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


# --- the draws and the schedule ----------------------------------------------------------------------------


def test_kept_tokens_are_a_pure_function_of_seed_step_rank():
    draw = lambda seed, step, rank: draw_kept_tokens(seed=seed, step=step, rank=rank, batch_size=64,  # noqa: E731
                                                     img_tokens=48, ratio=0.75)
    a = draw(0, 5, 1)
    assert a.shape == (64, 12) and a.dtype == torch.int64
    assert torch.equal(a, draw(0, 5, 1))
    assert not torch.equal(a, draw(0, 6, 1)) and not torch.equal(a, draw(0, 5, 2)) and not torch.equal(a, draw(1, 5, 1))
    assert torch.all(a[:, 1:] > a[:, :-1]) and a.min() >= 0 and a.max() < 48   # distinct, in grid order
    assert len({tuple(row) for row in a.tolist()}) == 64                          # each sample its own subset
    # Its own stream: the draws of t and the noise (the unsalted generator) are not shifted by it.
    assert not torch.equal(torch.rand(4, generator=step_generator(0, 5, 1)),
                           torch.rand(4, generator=step_generator(0, 5, 1, salt=0x3A5C)))
    # Uniform over the grid: every token kept about a quarter of the time.
    counts = torch.bincount(draw_kept_tokens(seed=0, step=0, rank=0, batch_size=4000, img_tokens=48,
                                             ratio=0.75).flatten(), minlength=48)
    assert torch.all((counts > 900) & (counts < 1100)), counts


def test_kept_count_is_static_and_rounded():
    assert kept_count(256, 0.75) == 64 and kept_count(64, 0.5) == 32 and kept_count(24, 0.75) == 6
    assert kept_count(18, 0.75) == 4 and kept_count(3, 0.9) == 1    # at least one


def test_schedule_unmasks_the_last_steps():
    ratios = [mask_ratio_at(s, ratio=0.75, steps=10, unmasked_steps=3) for s in range(10)]
    assert ratios == [0.75] * 7 + [0.0] * 3
    assert mask_ratio_at(9, ratio=0.75, steps=10, unmasked_steps=0) == 0.75


def test_bad_masking_configs_fail_before_work():
    cfg = preset("tiny")
    cfg.model.mask_ratio = 1.0
    with pytest.raises(ConfigError, match=r"model.mask_ratio=1.0 must be in \[0, 1\)"):
        cfg.validate()
    cfg.model.mask_ratio, cfg.train.unmasked_steps = 0.75, cfg.train.steps
    with pytest.raises(ConfigError, match="leaves no masked step"):
        cfg.validate()
    cfg.train.unmasked_steps = 50
    cfg.validate()


# --- the model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (6, 12), (12, 4)])
def test_kept_tokens_keep_their_rope_positions(cfg, size, monkeypatch):
    """Without a mixer, tokens meet only in attention: the masked forward must equal the unmasked forward
    with the dropped image tokens taken out of every attention's keys, on the kept tokens. That holds only
    if each kept token is rotated by its own grid position (non-square grids catch rows and columns swapped)."""
    model = perturbed(cfg)
    x = inputs(cfg, h=size[0], w=size[1], real=CAPTIONS["padded"])
    kept = kept_of(x)
    B, L_img = kept.shape[0], (size[0] // 2) * (size[1] // 2)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pe"]), with_kwargs=True)
    masked = model(**x, kept_tokens=kept)                                             # (B, L_kept, C p p)
    assert masked.shape == (B, kept.shape[1], cfg.in_channels * 4)
    grid = rope_frequencies(size[0] // 2, size[1] // 2, cfg.width // cfg.num_heads, theta=cfg.rope_theta,
                            scale=1.0, device="cpu")
    pe = seen[0]                                                                      # (B, 1, L_kept + L_txt, Dh/2)
    assert torch.equal(pe[:, 0, : kept.shape[1]], grid[kept])
    assert torch.all(pe[:, 0, kept.shape[1]:] == 1)                                   # text: not rotated

    dropped = torch.ones(B, L_img, dtype=torch.bool).scatter_(1, kept, False)
    build = JointAttention.build

    def without_dropped_keys(*args, img_len, **kw):
        plan = build(*args, img_len=img_len, **kw)
        plan.keep[:, :img_len] &= ~dropped
        return plan

    monkeypatch.setattr(mmdit.JointAttention, "build", without_dropped_keys)
    full = patchify(model(**x), 2)                                                    # (B, L_img, C p p)
    torch.testing.assert_close(masked, full.gather(1, kept[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


def test_kept_order_does_not_matter(cfg):
    """Positions travel with the tokens, not with their slots: permuting the kept indices permutes the output."""
    model = perturbed(mixed(cfg))
    x = inputs(cfg, h=6, w=12)
    kept = kept_of(x)
    perm = torch.randperm(kept.shape[1])
    torch.testing.assert_close(model(**x, kept_tokens=kept[:, perm]), model(**x, kept_tokens=kept)[:, perm],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("joint", [True, False])
def test_the_mixer_sees_every_token_and_the_loss_only_kept_ones(cfg, joint):
    """The loss ignores the dropped patches' targets (a target changed there, the model's input xt unchanged,
    leaves the loss as it was), while the kept tokens' predictions depend on dropped pixels through the mixer.
    Without a mixer, dropped pixels change nothing at all."""
    B, t = 3, torch.full((3,), 0.5)
    x = inputs(cfg, B=B, h=8, w=12, real=CAPTIONS["padded"])
    cond = Cond(text=x["text"], text_mask=x["text_mask"], pooled=x["pooled"])
    kept = kept_of(x)
    dropped = torch.ones(B, 24, dtype=torch.bool).scatter_(1, kept, False)
    dropped = unpatchify(dropped[..., None].float().expand(-1, -1, cfg.in_channels * 4), 4, 6, 2)  # pixels
    g = torch.Generator().manual_seed(2)
    x0, x1, d = (torch.randn(x["xt"].shape, generator=g) for _ in range(3))

    def loss(model, x0, x1):
        return flow_loss(model, x0=x0, cond=cond, cfg=FlowConfig(), patch_size=2, generator=None, t=t, x1=x1,
                         kept_tokens=kept).per_sample

    with_mixer = perturbed(mixed(cfg, joint=joint))
    ref = loss(with_mixer, x0, x1)
    # x0 + d and x1 - d at t = 1/2: the same xt, a target 2d away, on the dropped patches only.
    torch.testing.assert_close(loss(with_mixer, x0 + dropped * d, x1 - dropped * d), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loss(with_mixer, x0 + dropped * d, x1), ref, rtol=1e-3)  # the mixer saw them
    no_mixer = perturbed(dataclasses.replace(cfg, mask_ratio=0.75))
    assert torch.equal(loss(no_mixer, x0 + dropped * d, x1 + dropped * d), loss(no_mixer, x0, x1))


@pytest.mark.parametrize("joint", [True, False])
def test_every_parameter_gets_a_gradient_when_masked(cfg, joint):
    """No unused parameters in a masked step (DDP would need find_unused_parameters), the mixer's included."""
    model = perturbed(mixed(cfg, depth=2, joint=joint))
    x = inputs(cfg)
    model(**x, kept_tokens=kept_of(x)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [] and any(n.startswith("mixer.1.") for n, _ in model.named_parameters())


def test_a_fresh_mixer_is_the_identity(cfg):
    """adaLN-Zero: a freshly initialised mixer changes nothing, so it starts where the plain model starts."""
    plain, model = perturbed(cfg), MMDiT(mixed(cfg, depth=2))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("mixer.") for k in missing)
    x = inputs(cfg, h=6, w=12)
    torch.testing.assert_close(model(**x), plain(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("joint", [True, False])
def test_masked_kernel_paths_equal_sdpa(cfg, backend, joint):
    """The flash and xformers paths (stand-ins, bf16 autocast) equal SDPA on a masked forward and backward,
    with padded and dropped captions and a non-square grid."""
    x = inputs(cfg, h=6, w=12, real=CAPTIONS["dropped"])
    kept = kept_of(x)
    results = {}
    for name in ("sdpa", backend):
        model = with_backend(perturbed(mixed(cfg, joint=joint)), name)
        with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16):
            out = model(**x, kept_tokens=kept)
        out.float().square().mean().backward()
        results[name] = (out.float(), {n: p.grad for n, p in model.named_parameters()})
    (ref, ref_grads), (out, grads) = results["sdpa"], results[backend]
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-6) < 0.1, name


@pytest.mark.parametrize("joint", [True, False])
def test_activation_checkpointing_and_compile_wrap_the_mixer_too(cfg, joint):
    """`sd3.dist.parallel` wraps the mixer's blocks like the others: a masked step gives the same loss and gradients
    with activation checkpointing (non-reentrant: exact) and compile on, and the checkpoint keys do not change."""
    from sd3.config import TrainConfig
    from sd3.dist.parallel import parallelize

    x = inputs(cfg, h=6, w=12, real=CAPTIONS["padded"])
    kept = kept_of(x)
    results = []
    for wrap in (False, True):
        torch._dynamo.reset()
        model = perturbed(mixed(cfg, depth=2, joint=joint))
        keys = set(model.state_dict())
        if wrap:
            # aot_eager: the captured graph, without inductor's minutes of CPU code generation
            parallelize(model, TrainConfig(activation_checkpointing=True, compile=True, compile_backend="aot_eager"),
                        group=None, device=torch.device("cpu"))
            assert set(model.state_dict()) == keys
            assert all(type(b).__name__ == "CheckpointWrapper" and b._compiled_call_impl is not None
                       for b in (*model.mixer, *model.blocks))
        out = model(**x, kept_tokens=kept)
        out.square().mean().backward()
        results.append((out, {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                              for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], msg=name)


# --- the GPU path's rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_forward_and_backward_compile_as_one_graph(cfg, backend):
    """fullgraph=True: the gathers of tokens and rotations break no graph (aot_eager, as test_gpu_paths does)."""
    torch._dynamo.reset()
    model = with_backend(perturbed(mixed(dataclasses.replace(cfg, depth=2))), backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = inputs(cfg, h=6, w=12, real=CAPTIONS["dropped"])
    kept = kept_of(x)
    with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16):
        out = compiled(**x, kept_tokens=kept)
        ref = model(**x, kept_tokens=kept)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), ref.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("joint", [True, False])
def test_masked_train_step_has_no_host_sync(cfg, backend, joint):
    """A whole masked optimizer step (the draw of kept tokens on the device's generator, the gathers, the
    masked loss, clipping, AdamW) never makes the host wait for the device."""
    from sd3.train.trainer import train_step

    run, model, optimizer, batch = step_setup(mixed(dataclasses.replace(cfg, attn_backend=backend), joint=joint))
    assert len(model.mixer) == 1
    with use_kernels(**stand_ins()), HostSyncs() as syncs:
        result = train_step(model, optimizer, iter([batch(0), batch(1)]), step=0, cfg=run, rank_index=0,
                            device=torch.device("cpu"))
    assert syncs.ops == []
    assert result.mask_ratio == 0.75 and torch.isfinite(result.loss) and not result.skipped


# --- FLOPs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_masked_flop_formula_matches_flop_counter(small_model_cfg, joint, mlp_type):
    """The mixer at every image token, the main blocks and the final layer at the kept ones."""
    cfg = mixed(dataclasses.replace(small_model_cfg, mlp_type=mlp_type), depth=2, joint=joint)
    model = perturbed(cfg)
    x = inputs(cfg, B=3, h=8, w=12, lengths=(9, 4))
    kept = kept_of(x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**x, kept_tokens=kept).square().mean().backward()
    measured = counter.get_total_flops() / 3
    predicted = mmdit.train_flops_per_sample(cfg, img_tokens=24, txt_tokens=(9, 4), kept_tokens=6)
    assert abs(predicted / measured - 1) < 0.02
    assert predicted < mmdit.train_flops_per_sample(cfg, img_tokens=24, txt_tokens=(9, 4))


# --- training -------------------------------------------------------------------------------------------


sys.path.insert(0, str(ROOT / "src"))
import train  # noqa: E402  (src/train.py)


def losses_of(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", output, flags=re.M)]


def test_masked_training_resumes_exactly_and_finetunes_unmasked(tiny_args, tmp_path, capsys):
    """6 straight steps (4 masked, 2 unmasked) == 3 masked steps, a resume, 3 more: the same losses and weights.
    The schedule depends on train.steps, so the first leg asks for no unmasked steps of its own (a constant
    learning rate, as tests/test_train.py's bf16 resume)."""
    from safetensors.torch import load_file

    masking = ["--model.mask_ratio=0.75", "--model.mixer_depth=1", "--train.schedule=constant",
               "--train.accumulation_steps=2", "--train.ema_every=1", "--train.ema_decay=0.5"]
    assert train.main(tiny_args(tmp_path / "straight", "--steps", "6", "--train.unmasked_steps=2", *masking)) == 0
    out = capsys.readouterr().out
    straight = losses_of(out)
    assert len(straight) == 6
    assert "patch masking: 75% of the image tokens dropped after 1 patch-mixer block(s) until step 4" in out
    assert "step 4: patch masking off, unmasked finetune for the last 2 steps" in out
    assert re.findall(r"\| mask ([0-9.]+) \|", out) == ["0.75"] * 4 + ["0.00"] * 2
    assert train.main(tiny_args(tmp_path / "split", "--steps", "3", *masking)) == 0
    first = losses_of(capsys.readouterr().out)
    assert train.main(tiny_args(tmp_path / "split", "--steps", "6", "--train.unmasked_steps=2", "--resume", "auto",
                                *masking)) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step 4: patch masking off" in out
    assert first + losses_of(out) == straight
    a, b = list_checkpoints(tmp_path / "straight")[-1][1], list_checkpoints(tmp_path / "split")[-1][1]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert any(k.startswith("mixer.0.") for k in wa)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
