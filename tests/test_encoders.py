"""The frozen encoders, through the real loading code, on tiny random-init stand-ins saved to disk."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported: never download

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd3.config import ConfigError
from sd3.encode.encoders import (
    KLAutoencoder,
    PixelAutoencoder,
    check_widths,
    load_autoencoder,
    load_text_encoders,
)
from sd3.encode.stand_ins import _write_atomically, caption_corpus, make_tiny_encoders, tiny_config

CAPTIONS = ["a cat", "a photograph of an astronaut riding a horse on the moon, golden hour light", ""]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # In case huggingface_hub was imported (reading HF_HUB_OFFLINE) before this module.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("enc"), vae="flux")


@pytest.fixture(scope="module")
def enc(cfg):
    return load_text_encoders(cfg.encoders, "cpu")


@pytest.fixture(scope="module")
def ae(cfg):
    return load_autoencoder(cfg.encoders, "cpu")


def _tokenizers(cfg):
    """The saved tokenizers, loaded independently of sd3.encode.encoders (the reference for masks)."""
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(p) for p in (*cfg.encoders.text, cfg.encoders.pooled)]


def _lengths(tokenizer, captions, max_len=77):
    return [len(tokenizer(c, truncation=True, max_length=max_len)["input_ids"]) for c in captions]


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------


def test_shapes_widths_and_dtype(cfg, enc):
    text, masks, pooled = enc.encode(CAPTIONS)
    assert enc.text_dims == cfg.model.text_dims == (64, 48)
    assert enc.pooled_dim == cfg.model.pooled_dim == 32
    assert len(text) == len(masks) == len(cfg.encoders.text)
    for states, mask, width in zip(text, masks, enc.text_dims):
        assert states.shape == (*mask.shape, width) and states.shape[0] == len(CAPTIONS)
        assert mask.dtype == torch.bool
        assert states.dtype == torch.float32  # the tiny preset's encoders.dtype
    assert pooled.shape == (len(CAPTIONS), 32) and pooled.dtype == torch.float32


def test_masks_right_padding_trimming_and_zeroed_padding(cfg, enc):
    text, masks, _ = enc.encode(CAPTIONS)
    for states, mask, tokenizer in zip(text, masks, _tokenizers(cfg)):
        lengths = _lengths(tokenizer, CAPTIONS)
        # Trimmed to the longest caption of the batch, never padded to 77.
        assert mask.shape[1] == max(lengths) < 77
        # Right padding: each row is its real tokens, then padding.
        expected = torch.arange(mask.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        assert torch.equal(mask, expected)
        assert torch.all(states[~mask] == 0)
        assert torch.all(states[mask].abs().sum(-1) > 0)


def test_same_caption_alone_and_beside_a_longer_one(enc):
    """What makes training (batches) and inference (one prompt) agree."""
    short = "a red fox in the snow"
    long = "The image shows a small red fox sleeping in the snow at night, " * 3
    text_1, masks_1, pooled_1 = enc.encode([short])
    text_2, masks_2, pooled_2 = enc.encode([short, long])
    for s1, m1, s2, m2 in zip(text_1, masks_1, text_2, masks_2):
        n = s1.shape[1]
        assert m2.shape[1] > n and torch.equal(m2[0, :n], m1[0]) and not m2[0, n:].any()
        torch.testing.assert_close(s2[0, :n], s1[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pooled_2[0], pooled_1[0], atol=1e-5, rtol=1e-4)


def test_empty_and_huge_captions(cfg, enc):
    huge = " ".join(caption_corpus(2000))[:100_000]
    _, masks, pooled = enc.encode(["", huge])
    for mask in masks:
        assert mask[0].sum() >= 1  # BOS / CLS still there for an empty caption
        assert mask.shape[1] == mask[1].sum() == cfg.encoders.max_tokens
    assert torch.isfinite(pooled).all()


def test_pooled_is_the_projected_eos_state(cfg, enc):
    """The pooled vector is taken at the tokenizer's real EOS (last real token), also after truncation."""
    captions = ["a cat", " ".join(caption_corpus(200)), ""]
    _, _, pooled = enc.encode(captions)
    tokens = enc.pooled_tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        states = enc.pooled_model.text_model(**tokens).last_hidden_state
        last = tokens["attention_mask"].sum(1) - 1
        assert torch.all(tokens["input_ids"][torch.arange(3), last] == enc.pooled_tokenizer.eos_token_id)
        expected = enc.pooled_model.text_projection(states[torch.arange(3), last])
    torch.testing.assert_close(pooled, expected)


def test_frozen_and_usable_by_a_trainer(enc):
    assert not any(p.requires_grad for m in (*enc.models, enc.pooled_model) for p in m.parameters())
    assert not any(m.training for m in (*enc.models, enc.pooled_model))
    text, _, pooled = enc.encode(CAPTIONS)
    for t in (*text, pooled):
        assert not t.requires_grad
        assert not t.is_inference()  # a colocated trainer's layers must be able to save them for backward
    head = torch.nn.Linear(text[0].shape[-1], 3)
    head(text[0]).sum().backward()
    assert head.weight.grad is not None


def test_bad_captions_are_named(enc):
    with pytest.raises(TypeError, match="wrap it"):
        enc.encode("a cat")
    with pytest.raises(TypeError, match="caption 1"):
        enc.encode(["a cat", None])
    with pytest.raises(ValueError, match="at least one"):
        enc.encode([])


# --------------------------------------------------------------------------------------------------
# Autoencoders
# --------------------------------------------------------------------------------------------------


def _photo(size: int) -> torch.Tensor:
    """skimage's astronaut, resized, as a (1, 3, size, size) tensor in [-1, 1]."""
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1


def test_pixel_autoencoder_exact_round_trip(cfg):
    ae = load_autoencoder(dataclasses.replace(cfg.encoders, vae="pixel", pixel_factor=4), "cpu")
    assert isinstance(ae, PixelAutoencoder) and (ae.channels, ae.factor) == (48, 4)
    images = torch.cat([_photo(64), torch.rand(1, 3, 64, 64) * 2 - 1])
    latents = ae.encode(images)
    assert latents.shape == (2, 48, 16, 16)
    # Each latent cell holds exactly its 4 x 4 pixel block.
    assert torch.equal(latents[0, :, 2, 3].reshape(3, 4, 4), images[0, :, 8:12, 12:16])
    assert torch.equal(ae.decode(latents), images)
    with pytest.raises(ValueError, match="multiple of the autoencoder factor 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))


def test_flux_autoencoder_convention(ae):
    """latents = (z - shift) * scale with z the raw diffusers posterior sample; decode inverts it."""
    assert isinstance(ae, KLAutoencoder)
    assert (ae.channels, ae.factor) == (16, 8)
    assert (ae.shift, ae.scale) == pytest.approx((0.1159, 0.3611))
    images = torch.cat([_photo(64), torch.rand(1, 3, 64, 64) * 2 - 1])
    latents = ae.encode(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 16, 8, 8) and not latents.is_inference()
    assert ae.encode(images[:, :, :, :48]).shape == (2, 16, 8, 6)
    with torch.no_grad():
        z = ae.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
        raw_images = ae.vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611)
    torch.testing.assert_close(ae.decode(latents), raw_images, atol=1e-5, rtol=1e-4)
    # A different generator draws a different sample; the same one, the same sample.
    assert not torch.equal(latents, ae.encode(images, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(latents, ae.encode(images, generator=torch.Generator().manual_seed(0)))
    assert not any(p.requires_grad for p in ae.vae.parameters())
    with pytest.raises(ValueError, match="latents must be"):
        ae.decode(torch.zeros(1, 4, 8, 8))


# --------------------------------------------------------------------------------------------------
# Config agreement and errors
# --------------------------------------------------------------------------------------------------


def test_check_widths(cfg, enc, ae):
    check_widths(cfg.model, enc, ae)
    cases = [
        (dict(text_dims=(64, 32)), r"model.text_dims\[1\]=32 .*--model.text_dims='\(64, 48\)'"),
        (dict(text_dims=(64,)), "1 entries for 2 text encoders"),
        (dict(pooled_dim=768), "model.pooled_dim=768 .*--model.pooled_dim=32"),
        (dict(in_channels=48), "model.in_channels=48 .*--model.in_channels=16"),
        (dict(max_res=72), "model.max_res=72 is not a multiple of 16"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_widths(dataclasses.replace(cfg.model, **change), enc, ae)


def test_missing_paths_name_the_key_and_the_fix(cfg, tmp_path):
    missing = dataclasses.replace(cfg.encoders, text=(cfg.encoders.text[0], str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"encoders.text\[1\]=.*nowhere.*create_tiny=true"):
        load_text_encoders(missing, "cpu")
    hub_id = dataclasses.replace(cfg.encoders, pooled="nobody-here/no-such-model")
    with pytest.raises(ConfigError, match=r"encoders.pooled=.*not a local directory.*HF_TOKEN"):
        load_text_encoders(hub_id, "cpu")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"encoders.vae=.*could not load from this directory"):
        load_autoencoder(dataclasses.replace(cfg.encoders, vae=str(tmp_path / "junk")), "cpu")


def test_checkpoint_missing_weights_fails(cfg, tmp_path):
    """A CLIP text tower saved without its projection must not load with a random projection."""
    from transformers import CLIPTextModel

    bare = tmp_path / "clip_text_only"
    CLIPTextModel.from_pretrained(cfg.encoders.pooled).save_pretrained(bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(cfg.encoders.pooled, name), bare / name)
    with pytest.raises(ConfigError, match=r"lacks .*text_projection"):
        load_text_encoders(dataclasses.replace(cfg.encoders, pooled=str(bare)), "cpu")


def test_clip_eos_mismatch_fails(cfg, tmp_path):
    wrong = tmp_path / "clip"
    shutil.copytree(cfg.encoders.pooled, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 5
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="eos_token_id=5 does not match"):
        load_text_encoders(dataclasses.replace(cfg.encoders, pooled=str(wrong)), "cpu")


# --------------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------------


def test_stand_ins_are_full_checkpoints(cfg):
    def model_type(path):
        return json.loads(Path(path, "config.json").read_text())["model_type"]

    assert model_type(cfg.encoders.pooled) == "clip"  # a full CLIPModel, as MetaCLIP ships
    weights = load_file(Path(cfg.encoders.pooled, "model.safetensors"))
    assert any(k.startswith("vision_model.") for k in weights) and "text_projection.weight" in weights
    assert [model_type(p) for p in cfg.encoders.text] == ["gemma2", "modernbert"]


def test_make_tiny_encoders_is_idempotent_and_deterministic(cfg, tmp_path):
    root = os.path.dirname(cfg.encoders.pooled)
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert make_tiny_encoders(cfg.encoders, cfg.model) == []
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
    assert not [f for f in os.listdir(root) if ".tmp-" in f]
    # A second copy elsewhere has the same weights: racing processes write the same thing.
    other = tiny_config(tmp_path)
    first, second = (load_file(os.path.join(c.encoders.text[1], "model.safetensors")) for c in (cfg, other))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_atomic_write_loses_a_race_cleanly(cfg, tmp_path):
    """Another process renames its complete copy into place while this one builds: ours is dropped."""
    target = tmp_path / "clip"

    def build(out):
        shutil.copytree(cfg.encoders.pooled, target)  # the other process wins meanwhile
        shutil.copytree(cfg.encoders.pooled, out, dirs_exist_ok=True)

    assert _write_atomically(target, build, tokenizer=True) is False
    assert sorted(os.listdir(tmp_path)) == ["clip"]
    assert _write_atomically(tmp_path / "fresh", lambda out: (out / "config.json").write_text("{}"),
                             tokenizer=False) is True
    assert sorted(os.listdir(tmp_path / "fresh")) == ["config.json"]


def test_refuses_to_overwrite_an_incomplete_directory(cfg, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "half_written.bin").write_bytes(b"\0")
    enc = dataclasses.replace(cfg.encoders, text=(str(tmp_path / "gemma"), str(tmp_path / "bert")),
                              pooled=str(tmp_path / "clip"))
    with pytest.raises(ConfigError, match=r"encoders.text\[1\].*holds no complete model"):
        make_tiny_encoders(enc, cfg.model)


def test_tiny_config_pixel(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.encoders.vae == "pixel" and cfg.model.in_channels == 48
    assert sorted(os.listdir(tmp_path)) == ["bert", "clip", "gemma"]
    check_widths(cfg.model, load_text_encoders(cfg.encoders, "cpu"), load_autoencoder(cfg.encoders, "cpu"))


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bf16_encoders(cfg, enc, device):
    """`encoders.dtype=bfloat16`, as a GPU loader runs them: states, pooled vector and latents in bf16 on the
    device, padding still zero and masks unchanged, within bf16 tolerance of the float32 encoders. The CPU
    run checks the same contract (dtypes, masks, values) that the CUDA one adds the device to."""
    bf16 = dataclasses.replace(cfg.encoders, dtype="bfloat16")
    dev_enc, dev_ae = load_text_encoders(bf16, device), load_autoencoder(bf16, device)
    text, masks, pooled = dev_enc.encode(CAPTIONS)
    ref_text, ref_masks, ref_pooled = enc.encode(CAPTIONS)
    for states, mask, ref, ref_mask in zip(text, masks, ref_text, ref_masks):
        assert states.dtype == torch.bfloat16 and states.device.type == device
        assert torch.equal(mask.cpu(), ref_mask) and torch.all(states[~mask] == 0)
        torch.testing.assert_close(states.float().cpu(), ref, atol=0.1, rtol=0.05)
    assert pooled.dtype == torch.bfloat16 and pooled.device.type == device
    torch.testing.assert_close(pooled.float().cpu(), ref_pooled, atol=0.1, rtol=0.05)
    images = _photo(64)
    latents = dev_ae.encode(images.to(device))
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, 16, 8, 8) and latents.device.type == device
    out = dev_ae.decode(latents)
    assert out.dtype == torch.float32 and out.shape == images.shape and out.abs().max() <= 1
