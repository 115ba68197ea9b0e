"""The memory estimate (`sd3.train.memory`, `train.py --dry-run`): exact state, an activation formula that
matches what a training step allocates, encoder sizes that match their configs."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sd3.config import FlowConfig, ModelConfig, preset
from sd3.diffusion.flow import Cond, flow_loss
from sd3.dist.parallel import apply_activation_checkpointing
from sd3.model.mmdit import MMDiT
from sd3.train import memory
from sd3.train.ema import EMA
from sd3.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import train  # noqa: E402  (src/train.py)

BASE = ModelConfig(in_channels=4, patch_size=2, depth=3, width=64, num_heads=4, text_dims=(24, 16), pooled_dim=8,
                   max_res=32, max_res_orig=32)
# (model, batch, latent side, text tokens per stream): SwiGLU, a wider two-block model with long text, GELU,
# patch-mixer blocks (joint, image-only).
CONFIGS = {
    "swiglu": (BASE, 4, 32, (5, 7)),
    "mixer": (dataclasses.replace(BASE, depth=2, mixer_depth=2), 4, 32, (5, 7)),
    "image_mixer": (dataclasses.replace(BASE, depth=2, mixer_depth=2, mixer_joint=False), 4, 32, (5, 7)),
    "wide": (dataclasses.replace(BASE, width=128, num_heads=2, depth=2), 2, 64, (10, 20)),
    "gelu": (dataclasses.replace(BASE, mlp_type="gelu", depth=4), 3, 48, (8, 3)),
}


def _inputs(cfg: ModelConfig, batch: int, side: int, txt: tuple[int, ...], device="cpu", text_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device, text_dtype)
    text = tuple(torch.randn(batch, L, d, generator=g).to(device, text_dtype) for L, d in zip(txt, cfg.text_dims))
    masks = tuple(torch.ones(batch, L, dtype=torch.bool, device=device) for L in txt)
    return x0, Cond(text=text, text_mask=masks, pooled=torch.randn(batch, cfg.pooled_dim, generator=g).to(device))


def _step(model, x0, cond, cfg: ModelConfig, *, bf16: bool, device_type: str = "cpu"):
    """One micro-batch as `trainer.train_step` runs it: flow_loss under autocast, then backward."""
    with record_function("forward"), torch.autocast(device_type, torch.bfloat16, enabled=bf16):
        out = flow_loss(model, x0=x0, cond=cond, cfg=FlowConfig(), patch_size=cfg.patch_size,
                        generator=torch.Generator(x0.device).manual_seed(1))
    return out


def _saved_bytes(loss: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the distinct storages the autograd graph of `loss` saved (parameters and inputs excluded)."""
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in exclude:
                        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


def _measure_cpu(cfg: ModelConfig, batch: int, side: int, txt: tuple[int, ...], *, bf16: bool, ckpt: bool):
    """(bytes saved by the graph, bytes alive when the forward ends, peak bytes of forward + backward), all
    on top of what existed before the step. Gradients exist already (an accumulating step's second
    micro-batch); the peak is the running sum of the CPU allocator's allocations and frees that
    torch.profiler records, in time order."""
    torch.manual_seed(0)
    model = MMDiT(cfg)
    if ckpt:
        apply_activation_checkpointing(model)
    x0, cond = _inputs(cfg, batch, side, txt)
    _step(model, x0, cond, cfg, bf16=bf16).loss.backward()      # grads, RoPE cache, autocast warm-up
    saved = None
    if not ckpt:   # with checkpointing, reading the saved tensors would recompute them
        out = _step(model, x0, cond, cfg, bf16=bf16)
        exclude = {t.untyped_storage()._cdata for t in [*model.parameters(), *(p.grad for p in model.parameters()),
                                                        x0, *cond.text]}
        saved = _saved_bytes(out.loss, exclude)
        out.loss.backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, x0, cond, cfg, bf16=bf16).loss.backward()
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == "forward")
    current = peak = kept = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
        if e.start_ns() <= forward_end:
            kept = current
    return saved, kept, peak


@pytest.mark.parametrize("ckpt", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["swiglu", *(pytest.param(n, marks=pytest.mark.slow) for n in ("wide", "gelu", "mixer",
                                                                                                  "image_mixer"))])
def test_activation_formula_matches_a_measured_cpu_step(name, bf16, ckpt):
    cfg, batch, side, txt = CONFIGS[name]
    nx = memory.numerics("bf16" if bf16 else "fp32", "cpu")
    est = memory.activation_bytes(cfg, batch=batch, img_tokens=(side // cfg.patch_size) ** 2, txt_tokens=txt,
                                  nx=nx, checkpointing=ckpt)
    saved, kept, peak = _measure_cpu(cfg, batch, side, txt, bf16=bf16, ckpt=ckpt)
    print(f"{name} {nx.name} checkpointing={ckpt}: formula kept {est.kept / 1e6:.3f} MB, peak "
          f"{est.peak / 1e6:.3f} MB; measured kept {kept / 1e6:.3f} MB, peak {peak / 1e6:.3f} MB "
          f"(formula / measured {est.peak / peak:.3f})")
    assert est.peak == pytest.approx(peak, rel=0.20)
    assert est.kept == pytest.approx(kept, rel=0.20)
    if saved is not None:   # the kept terms are the storages autograd saved, one by one
        assert est.kept == pytest.approx(saved, rel=0.02)


def test_the_formula_follows_each_op():
    """Doubling the batch doubles every per-sample term; checkpointing keeps only block inputs; the last
    block keeps less than an inner one (no text queries, projection or MLP)."""
    cfg, batch, side, txt = CONFIGS["swiglu"]
    nx = memory.numerics("bf16", "cuda")
    kw = dict(img_tokens=(side // 2) ** 2, txt_tokens=sum(txt), nx=nx)
    one, two, three = (sum(t.bytes for t in memory.block_terms(cfg, batch=b, last=False, **kw)) for b in (1, 2, 3))
    assert three - two == two - one > 0.95 * one    # per-sample terms, and the small per-forward constants
    inner = sum(t.bytes for t in memory.block_terms(cfg, batch=batch, last=False, **kw))
    last = sum(t.bytes for t in memory.block_terms(cfg, batch=batch, last=True, **kw))
    assert last < inner
    full = memory.activation_bytes(cfg, batch=batch, img_tokens=kw["img_tokens"], txt_tokens=txt, nx=nx,
                                   checkpointing=False)
    ckpt = memory.activation_bytes(cfg, batch=batch, img_tokens=kw["img_tokens"], txt_tokens=txt, nx=nx,
                                   checkpointing=True)
    assert ckpt.kept < full.kept / 4 and ckpt.peak < full.peak
    # CUDA autocast runs the norms in fp32: it keeps more than the CPU autocast, less than fp32.
    cpu = sum(t.bytes for t in memory.block_terms(cfg, batch=batch, last=False, **{**kw, "nx": memory.numerics(
        "bf16", "cpu")}))
    fp32 = sum(t.bytes for t in memory.block_terms(cfg, batch=batch, last=False, **{**kw, "nx": memory.numerics(
        "fp32", "cuda")}))
    assert cpu < inner < fp32


def test_state_is_the_bytes_of_the_real_tensors():
    """Weights, gradients, AdamW moments and EMA as the trainer allocates them, byte for byte."""
    cfg = preset("tiny")
    cfg.model = dataclasses.replace(BASE)
    est = memory.estimate(cfg)
    lines = {line.label.split(" (")[0]: line.bytes for line in est.model}
    model = MMDiT(cfg.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    x0, cond = _inputs(cfg.model, 2, 32, (5, 7))
    _step(model, x0, cond, cfg.model, bf16=False).loss.backward()
    optimizer = build_optimizer(model, cfg.train)
    optimizer.step()
    moments = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values()
                  for k in ("exp_avg", "exp_avg_sq"))
    ema = EMA(model, decay=0.9)
    assert lines["weights"] == weights
    assert lines["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert lines["AdamW moments"] == moments
    assert lines["EMA"] == sum(s.numel() * s.element_size() for s in ema.shadow)


def test_encoder_constants_match_their_published_configs():
    """Each published size equals the loader's model class built from the published config (meta device)."""
    from diffusers import AutoencoderKL
    from transformers import AutoModel, CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, ModernBertConfig

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        gemma = AutoModel.from_config(Gemma2Config(
            vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256))
        bert = AutoModel.from_config(ModernBertConfig(
            vocab_size=50368, hidden_size=1024, intermediate_size=2624, num_hidden_layers=28, num_attention_heads=16))
        clip = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            use_quant_conv=False, use_post_quant_conv=False)
    known = memory.KNOWN_ENCODERS
    assert known["google/gemma-2-2b"].params == count(gemma) == 2_614_341_888
    assert known["answerdotai/ModernBERT-large"].params == count(bert)
    assert known["facebook/metaclip-l14-400m"].params == count(clip)
    assert known["black-forest-labs/FLUX.1-schnell"].params == count(vae)
    sizes = memory.encoder_sizes(preset("sd3_256").encoders, preset("sd3_256").model)
    assert all(size.source == "published" for _, size in sizes.values())


def test_local_encoders_are_counted_from_their_configs(tmp_path):
    """A local directory is read; missing stand-ins are counted from the configs they would be written with;
    both equal the parameters the loader actually loads."""
    from sd3.encode.encoders import load_autoencoder, load_text_encoders
    from sd3.encode.stand_ins import tiny_config

    cfg = preset("tiny")
    cfg.encoders.text = (str(tmp_path / "gemma"), str(tmp_path / "bert"))
    cfg.encoders.pooled = str(tmp_path / "clip")
    cfg.encoders.vae, cfg.encoders.vae_subfolder, cfg.model.in_channels = str(tmp_path / "flux"), "vae", 16
    from sd3.encode.stand_ins import stand_in_configs

    before = memory.encoder_sizes(cfg.encoders, cfg.model, stand_in_configs=stand_in_configs)  # nothing on disk yet
    assert {size.source for _, size in before.values()} == {"stand-in"}
    cfg = tiny_config(tmp_path, vae="flux")
    after = memory.encoder_sizes(cfg.encoders, cfg.model)
    assert {size.source for _, size in after.values()} == {"config"}
    text, ae = load_text_encoders(cfg.encoders, "cpu"), load_autoencoder(cfg.encoders, "cpu")
    loaded = [sum(p.numel() for p in m.parameters()) for m in (*text.models, text.pooled_model, ae.vae)]
    assert [size.params for _, size in before.values()] == [size.params for _, size in after.values()] == loaded
    assert [size.width for _, size in after.values()][:2] == list(cfg.model.text_dims)


def test_unknown_hub_ids_are_named_not_guessed():
    cfg = preset("sd3_256")
    cfg.encoders.text = ("someone/private-encoder", "answerdotai/ModernBERT-large")
    report = memory.format_report(memory.estimate(cfg))
    assert "unknown hub ids, not counted" in report and "encoders.text[0]=someone/private-encoder" in report


def test_dry_run_prints_the_estimate_before_the_parameter_count(capsys):
    assert train.main(["--preset", "sd3_256", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "parameters: 1221781763"
    text = "\n".join(lines)
    on = next(x for x in lines if "total, checkpointing on (configured)" in x)
    assert "fits an 80 GB GPU" in on and "NOT" not in on
    for item in ("weights (fp32 master", "gradients (fp32)", "AdamW moments", "EMA (fp32, on the model GPU)",
                 "activations, checkpointing off", "allowance (CUDA context", "loader GPU: 420 captions",
                 "google/gemma-2-2b (2,614,341,888 params*", "autoencoder encode (64 images of 256x256",
                 "bf16 autocast (cuda)", "parameter count from published configs"):
        assert item in text, item
    assert train.main(["--preset", "sd3_256", "--dry-run", "--train.activation_checkpointing=false",
                       "--train.ema_device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "activations, checkpointing off (configured)" in out and "total, checkpointing off (configured)" in out
    assert gib(out, "EMA (fp32; train.ema_device=cpu: host memory)") == 0.0
    assert gib(out, "activations, checkpointing off") > 10 * gib(out, "activations, checkpointing on")


def test_the_dry_run_shows_each_mode_at_the_model_ranks_given(capsys):
    """Sharding divides the training state by the shard count; the SD3.5-Large-sized preset (built on the
    meta device: nothing is allocated) fits an 80 GB GPU sharded over one node's 6 model ranks, never as ddp."""
    assert train.main(["--preset", "sd3_large", "--dry-run"]) == 0
    out = capsys.readouterr().out
    n = int(out.strip().splitlines()[-1].split()[-1])
    assert 6e9 <= n <= 10e9
    assert "train.parallel=fsdp at 6 model ranks" in out
    fsdp = next(x for x in out.splitlines() if "total with train.parallel=fsdp (configured) at 6 model ranks" in x)
    ddp = next(x for x in out.splitlines() if "total with train.parallel=ddp at 6 model ranks" in x)
    assert "fits an 80 GB GPU" in fsdp and "NOT" not in fsdp and "does NOT fit" in ddp
    sixth = gib(out, "AdamW moments (2 x fp32, 1/6 of it)")
    assert sixth == pytest.approx(2 * 4 * n / 6 / 2**30, abs=1e-3)
    assert "first model rank's host memory" in out

    assert train.main(["--preset", "sd3_large", "--dry-run", "--model_ranks", "12", "--train.parallel=hsdp"]) == 0
    out = capsys.readouterr().out
    assert gib(out, "AdamW moments (2 x fp32, 1/6 of it)") == pytest.approx(sixth, abs=1e-3)   # 6 per node
    assert "total with train.parallel=fsdp at 12 model ranks (sharded over all 12)" in out
    assert "total with train.parallel=hsdp (configured) at 12 model ranks (sharded over 6, 2 copies)" in out

    assert train.main(["--preset", "sd3_256", "--dry-run"]) == 0     # ddp: the whole state, as before
    out = capsys.readouterr().out
    assert gib(out, "AdamW moments (2 x fp32)") == pytest.approx(2 * 4 * 1221781763 / 2**30, abs=1e-3)
    assert "total with train.parallel=ddp (configured) at 6 model ranks" in out


def test_the_dry_run_refuses_a_count_the_mode_cannot_shard():
    with pytest.raises(train.ConfigError, match=r"--dry-run at 1 model ranks: train.parallel=fsdp cannot shard"):
        train.main(["--preset", "sd3_large", "--dry-run", "--model_ranks", "1"])


def gib(report: str, label: str) -> float:
    """The figure on the report line that starts with `label`."""
    line = next(x for x in report.splitlines() if x.strip().startswith(label))
    return float(next(word for word in line[line.index(label) + len(label):].split() if word[0].isdigit()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ckpt", [False, True], ids=["full", "checkpointed"])
def test_activation_formula_matches_cuda_bf16(ckpt):
    """The CUDA numerics (fp32 norms under autocast, (B, L, H, Dh) attention output) against
    torch.cuda.max_memory_allocated over one step, text arriving in bf16 as from a CUDA loader."""
    cfg = dataclasses.replace(BASE, width=256, num_heads=4, depth=4, text_dims=(64, 48), pooled_dim=32)
    batch, side, txt = 16, 32, (77, 60)
    torch.manual_seed(0)
    model = MMDiT(cfg).cuda()
    if ckpt:
        apply_activation_checkpointing(model)
    x0, cond = _inputs(cfg, batch, side, txt, device="cuda", text_dtype=torch.bfloat16)
    for _ in range(2):   # grads, workspaces, the RoPE cache
        _step(model, x0, cond, cfg, bf16=True, device_type="cuda").loss.backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(model, x0, cond, cfg, bf16=True, device_type="cuda").loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    est = memory.activation_bytes(cfg, batch=batch, img_tokens=(side // 2) ** 2, txt_tokens=txt,
                                  nx=memory.numerics("bf16", "cuda"), checkpointing=ckpt, text_arrives_as=2)
    print(f"cuda bf16 checkpointing={ckpt}: formula {est.peak / 1e6:.1f} MB, measured {peak / 1e6:.1f} MB "
          f"(formula / measured {est.peak / peak:.3f})")
    assert est.peak == pytest.approx(peak, rel=0.20)
