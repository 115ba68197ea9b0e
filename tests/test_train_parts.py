"""EMA, optimizer groups and schedule, checkpoints: the pieces a resumable run is made of."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sd3.checkpoint.read import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_config,
    load_train_state,
    load_weights,
)
from sd3.checkpoint.write import CheckpointWriter
from sd3.config import TrainConfig, preset
from sd3.model.mmdit import MMDiT
from sd3.train.ema import EMA
from sd3.train.optim import build_optimizer, lr_at, param_groups
from sd3.train.trainer import validation_times


def test_ema_update_rule_and_interval(small_model_cfg):
    model = MMDiT(small_model_cfg)
    ema = EMA(model, decay=0.9, every=2)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update(1) is False and all(torch.equal(a, b) for a, b in zip(start, ema.shadow))
    assert ema.update(2) is True
    for s0, s, p in zip(start, ema.shadow, model.parameters()):
        torch.testing.assert_close(s, 0.9 * s0 + 0.1 * p.detach())
    copy = MMDiT(small_model_cfg)
    ema.copy_to(copy)
    for s, p in zip(ema.shadow, copy.parameters()):
        assert torch.equal(s, p)
    other = EMA(MMDiT(small_model_cfg), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({})


def test_weight_decay_only_on_block_matrices(small_model_cfg):
    model = MMDiT(small_model_cfg)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.img_attn.qkv.weight" in decayed and "final.linear.weight" in decayed
    for name in ("blocks.0.img_attn.qkv.bias", "blocks.0.img_attn.q_norm.weight", "txt_in.0.scale",
                 "time_in.time_scale", "txt_in.0.norm.weight", "img_in.weight", "txt_in.1.proj.weight",
                 "pooled_in.mlp.0.weight", "time_in.mlp.2.weight"):
        assert name in skipped, name
    assert len(decayed) + len(skipped) == len(names)


def test_lr_schedule_counts_optimizer_steps():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, schedule="cosine", min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    constant = TrainConfig(lr=1e-3, warmup=0, schedule="constant")
    assert lr_at(0, constant) == lr_at(10_000, constant) == 1e-3


def save_one(writer, model, step, cfg):
    ema = EMA(model, decay=0.5)
    optimizer = build_optimizer(model, cfg.train)
    model(**dummy_inputs(cfg.model)).square().mean().backward()
    optimizer.step()
    return writer.save(step, model_state=model.state_dict(), ema_state=ema.state_dict(), cfg=cfg,
                       train_state={"step": step, "optimizer": optimizer.state_dict(), "wandb_id": "abc",
                                    "rng": torch.get_rng_state()}, blocking=True)


def dummy_inputs(m):
    return dict(xt=torch.randn(1, m.in_channels, 8, 8), t=torch.rand(1),
                text=tuple(torch.randn(1, 3, d) for d in m.text_dims),
                text_mask=tuple(torch.ones(1, 3, dtype=torch.bool) for _ in m.text_dims),
                pooled=torch.randn(1, m.pooled_dim))


def test_checkpoints_are_whole_pruned_and_reload(tmp_path, small_model_cfg):
    cfg = preset("tiny")
    cfg.model = small_model_cfg
    cfg.model.text_dims = (24, 16)
    model = MMDiT(cfg.model)
    writer = CheckpointWriter(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        path = save_one(writer, model, step, cfg)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    assert latest_checkpoint(tmp_path) == path == find_checkpoint("auto", tmp_path)
    assert find_checkpoint(str(tmp_path), "elsewhere") == path  # a run directory means its latest
    assert find_checkpoint("auto", tmp_path / "empty") is None   # nothing to resume: a fresh start
    assert sorted(os.listdir(path)) == ["config.json", "ema.safetensors", "manifest.json", "model.safetensors",
                                        "train_state.pt"]
    assert load_config(path) == cfg                     # the config travels with the weights
    state = load_train_state(path)                      # weights_only=True: no pickled code
    assert state["step"] == 30 and state["wandb_id"] == "abc" and "state" in state["optimizer"]
    fresh = MMDiT(cfg.model)
    load_weights(path, fresh, ema=False)
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert set(load_file(path / "ema.safetensors")) == set(dict(model.named_parameters()))
    # A checkpoint of another architecture fails with the path and the reason.
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_weights(path, MMDiT(preset("tiny").model), ema=True)


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_00000050.tmp-123").mkdir(parents=True)   # a write that was killed
    assert latest_checkpoint(tmp_path) is None
    broken = root / "step_00000040"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({}))
    with pytest.raises(CheckpointError, match=r"incomplete: missing model\.safetensors"):
        find_checkpoint(str(broken), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_validation_times_are_training_quantiles():
    cfg = preset("tiny").flow
    ts = validation_times(cfg, 64)
    assert ts.shape == (8,) and torch.all(ts[1:] > ts[:-1])
    torch.testing.assert_close(ts[3] + ts[4], torch.tensor(1.0))  # logit-normal(0, 1) is symmetric
    cfg.t_sampling = "uniform"
    torch.testing.assert_close(validation_times(cfg, 64), (torch.arange(8) + 0.5) / 8)


def test_sample_grids_use_the_shift_training_used(monkeypatch, tmp_path, small_model_cfg):
    """In-training grids sample with the run's own schedule shift (fixed or resolution-dependent) and
    precision: what inference will use."""
    import sd3.train.trainer as trainer
    from sd3.dist.batch import Batch
    from sd3.encode.encoders import PixelAutoencoder

    seen = {}

    def fake(model, **kwargs):
        seen.update(kwargs)
        return torch.zeros(1, 48, 16, 16)

    monkeypatch.setattr(trainer, "generate_latents", fake)
    cfg = preset("tiny")
    prompts = Batch(latents=torch.empty(1, 48, 0, 0), text=(torch.zeros(1, 1, 64), torch.zeros(1, 1, 48)),
                    text_mask=(torch.ones(1, 1, dtype=torch.bool),) * 2, pooled=torch.zeros(1, 32), step=-1,
                    rows=torch.zeros(1, dtype=torch.int64))
    model = MMDiT(small_model_cfg)
    cfg.flow.t_shift = 3.0
    trainer.sample_grid(model, prompts, PixelAutoencoder(4, torch.device("cpu")), cfg, tmp_path / "a.png")
    assert seen["shift"] == 3.0 and seen["precision"] == cfg.train.precision
    cfg.flow.t_shift_by_resolution, cfg.flow.t_shift_base_tokens = True, 16   # 64 px / 4 / 2: 64 tokens
    trainer.sample_grid(model, prompts, PixelAutoencoder(4, torch.device("cpu")), cfg, tmp_path / "b.png")
    assert seen["shift"] == pytest.approx(3.0 * 2)
