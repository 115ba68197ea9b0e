import dataclasses

import pytest
import torch
from model_helpers import perturbed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sd3.config import preset
from sd3.model.attention import KERNELS, JointAttention, attention, resolve_backend, use_kernels
from sd3.model.mmdit import (
    MMDiT,
    check_image_size,
    count_parameters,
    patchify,
    train_flops_per_sample,
    unpatchify,
)
from sd3.model.rope import rope_frequencies


def inputs(cfg, B=2, h=8, w=12, lengths=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    text = tuple(torch.randn(B, n, d, generator=g) for n, d in zip(lengths, cfg.text_dims))
    masks = tuple(torch.ones(B, n, dtype=torch.bool) for n in lengths)
    return dict(xt=torch.randn(B, cfg.in_channels, h, w, generator=g), t=torch.rand(B, generator=g),
                text=text, text_mask=masks, pooled=torch.randn(B, cfg.pooled_dim, generator=g))


def test_fresh_model_predicts_zero(small_model_cfg):
    out = MMDiT(small_model_cfg)(**inputs(small_model_cfg))
    assert out.shape == (2, 4, 8, 12)
    assert torch.equal(out, torch.zeros_like(out))


def test_forward_is_keyword_only(small_model_cfg):
    model, x = MMDiT(small_model_cfg), inputs(small_model_cfg)
    with pytest.raises(TypeError):
        model(x["xt"], x["t"], x["text"], x["text_mask"], x["pooled"])


def test_text_padding_is_masked_out(small_model_cfg):
    """Extra padding of any value (and any length) does not change the image prediction."""
    model, x = perturbed(small_model_cfg), inputs(small_model_cfg)
    ref = model(**x)
    padded_text = tuple(torch.cat([t, 100 * torch.randn(t.shape[0], 9, t.shape[2])], dim=1) for t in x["text"])
    padded_mask = tuple(torch.cat([m, torch.zeros(m.shape[0], 9, dtype=torch.bool)], dim=1) for m in x["text_mask"])
    out = model(**{**x, "text": padded_text, "text_mask": padded_mask})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dropped_stream_contributes_nothing(small_model_cfg):
    model, x = perturbed(small_model_cfg), inputs(small_model_cfg)
    dropped_mask = (torch.zeros_like(x["text_mask"][0]), x["text_mask"][1])
    a = model(**{**x, "text_mask": dropped_mask})
    other_values = (torch.randn_like(x["text"][0]), x["text"][1])
    b = model(**{**x, "text": other_values, "text_mask": dropped_mask})
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(**x))  # and the stream does matter when it is present


def test_every_parameter_gets_a_gradient(small_model_cfg):
    """No unused parameters (DDP would need find_unused_parameters): the last block has no text MLP."""
    for mlp_type in ("swiglu", "gelu"):
        cfg = dataclasses.replace(small_model_cfg, mlp_type=mlp_type)
        model = perturbed(cfg)
        assert model.blocks[-1].txt_mlp is None and model.blocks[-1].txt_attn.proj is None
        model(**inputs(cfg)).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []


def test_non_square_and_patchify_round_trip(small_model_cfg):
    x = torch.randn(3, 4, 6, 10)
    assert torch.equal(unpatchify(patchify(x, 2), 3, 5, 2), x)
    tokens = patchify(x, 2)
    assert tokens.shape == (3, 15, 16)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # row-major grid order
    out = perturbed(small_model_cfg)(**inputs(small_model_cfg, h=4, w=16))
    assert out.shape == (2, 4, 4, 16)


def test_rope_interpolation_scales_positions():
    rot1 = rope_frequencies(4, 4, 64, theta=1e4, scale=1.0, device="cpu")
    rot2 = rope_frequencies(8, 8, 64, theta=1e4, scale=0.5, device="cpu")
    # Grid (2r, 2c) at half scale is at the same position as (r, c) unscaled.
    for r, c in [(0, 1), (1, 3), (3, 2)]:
        torch.testing.assert_close(rot2[(2 * r) * 8 + 2 * c], rot1[r * 4 + c])
    # Rows rotate the first half of the channels, columns the second.
    rot = rope_frequencies(2, 2, 8, theta=1e4, scale=1.0, device="cpu")
    assert torch.equal(rot[1, :2], torch.ones(2, dtype=rot.dtype)) and not torch.equal(rot[1, 2:], torch.ones(2))
    assert torch.allclose(rot.abs(), torch.ones(()))                      # pure rotations


def test_apply_rope_rotates_pairs():
    from sd3.model.rope import apply_rope

    x = torch.randn(1, 1, 3, 4)
    angles = torch.tensor([[0.3, -1.0], [2.0, 0.5], [0.0, 0.0]])
    out = apply_rope(x, torch.polar(torch.ones(3, 2), angles))
    x0, x1 = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], x0 * angles.cos() - x1 * angles.sin())
    torch.testing.assert_close(out[..., 1::2], x0 * angles.sin() + x1 * angles.cos())


def test_rope_scale_reaches_the_model(small_model_cfg):
    a = perturbed(small_model_cfg)
    b = perturbed(dataclasses.replace(small_model_cfg, max_res=128))
    assert b.rope_scale == 0.5
    x = inputs(small_model_cfg)
    assert not torch.allclose(a(**x), b(**x))


def test_image_size_check(small_model_cfg):
    check_image_size(small_model_cfg, 8, 64, 48)
    with pytest.raises(ValueError, match=r"width=70 is not a positive multiple of 16.*try 64 or 80"):
        check_image_size(small_model_cfg, 8, 70, 48)


def test_sd3_256_parameter_count():
    n = count_parameters(preset("sd3_256").model)
    assert n == 1_221_781_763  # README reports this figure
    assert count_parameters(preset("sd3_512").model) == n  # stages share one architecture


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_flop_formula_matches_flop_counter(small_model_cfg, mlp_type):
    cfg = dataclasses.replace(small_model_cfg, mlp_type=mlp_type)
    model = perturbed(cfg)
    x = inputs(cfg, B=3, h=8, w=12, lengths=(9, 4))
    # The counter has formulas for the fused CUDA attention kernels but not the CPU one: count through
    # the math kernel, which it sees as matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**x).square().mean().backward()
    measured = counter.get_total_flops() / 3
    predicted = train_flops_per_sample(cfg, img_tokens=4 * 6, txt_tokens=(9, 4))
    assert abs(predicted / measured - 1) < 0.02


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn"):
        resolve_backend("flash", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_backend("fast", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("queries", ["all", "image"])
def test_kernel_paths_match_sdpa(backend, queries):
    """The flash and xformers paths' layouts (packing, bias), run here with the kernels' CPU stand-ins,
    equal masked SDPA on every real query."""
    from kernel_stand_ins import stand_ins

    B, H, L_img, Dh = 3, 2, 6, 8
    txt_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    L = L_img + 4
    q, k, v = (torch.randn(B, H, L, Dh, dtype=torch.bfloat16) for _ in range(3))
    if queries == "image":
        q = q[:, :, :L_img]
    build = dict(img_len=L_img, txt_masks=[txt_mask], batch=B, dtype=torch.bfloat16, device=torch.device("cpu"))
    sdpa = JointAttention.build("sdpa", **build)
    ref = attention(q.float(), k.float(), v.float(), attn=sdpa)
    with use_kernels(**stand_ins()):
        plan = JointAttention.build(backend, **build)
        if backend == "flash":  # the model hands this path its text in the plan's order
            order = torch.cat([torch.arange(L_img).expand(B, -1), L_img + plan.order], dim=1)
            k, v = (x.gather(2, order[:, None, :, None].expand_as(x)) for x in (k, v))
            if queries == "all":
                q = q.gather(2, order[:, None, :, None].expand_as(q))
                ref = ref.gather(1, order[..., None].expand_as(ref))
        out = attention(q, k, v, attn=plan)
    keep = plan.keep if queries == "all" else plan.keep[:, :L_img]
    torch.testing.assert_close(out[keep].float(), ref[keep], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_cuda_backends_match_sdpa(small_model_cfg, backend):
    if backend not in KERNELS:
        pytest.skip(f"{backend} is not installed")
    cfg = dataclasses.replace(small_model_cfg, width=128, num_heads=2)
    model = perturbed(cfg).cuda()
    x = {k: (tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()) for k, v in inputs(cfg).items()}
    x["text_mask"] = (x["text_mask"][0], torch.zeros_like(x["text_mask"][1]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(**x)
        model.cfg = dataclasses.replace(model.cfg, attn_backend=backend)
        out = model(**x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_joint_qk_norm_equals_one_rmsnorm_per_stream():
    from sd3.model.mmdit import joint_rms_norm

    a, b = torch.nn.RMSNorm(8, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        a.weight.normal_()
        b.weight.normal_()
    x, y = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 4, 8)
    torch.testing.assert_close(joint_rms_norm([x, y], [a, b]), torch.cat([a(x), b(y)], dim=2))


def test_text_tokens_are_not_rotated(small_model_cfg):
    """Text keys are position-free: permuting the text tokens (with their mask) changes nothing."""
    model, x = perturbed(small_model_cfg), inputs(small_model_cfg)
    perm = torch.randperm(x["text"][0].shape[1])
    shuffled = (x["text"][0][:, perm], x["text"][1])
    torch.testing.assert_close(model(**{**x, "text": shuffled}), model(**x), rtol=1e-5, atol=1e-5)


def test_learnable_scalars_are_one_element_tensors_and_load_from_0d(small_model_cfg):
    """FSDP2 shards no 0-d parameter, so the learnable scalars are 1-element tensors; a state dict that
    holds them 0-d (as other checkpoints store scalars) loads strictly into the same weights."""
    model = perturbed(small_model_cfg)
    scalars = {name: p for name, p in model.named_parameters() if p.numel() == 1}
    assert set(scalars) == {"txt_in.0.scale", "txt_in.1.scale", "time_in.time_scale"}
    assert all(p.shape == (1,) for p in scalars.values())
    state = {k: v.reshape(()) if k in scalars else v for k, v in model.state_dict().items()}
    fresh = MMDiT(small_model_cfg)
    fresh.load_state_dict(state, strict=True)
    x = inputs(small_model_cfg)
    torch.testing.assert_close(fresh(**x), model(**x))
