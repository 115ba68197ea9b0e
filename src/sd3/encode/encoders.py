"""Frozen encoders a loader rank runs: the autoencoder (images <-> latents) and the text encoders
(captions -> token states + masks, and one pooled vector).

    enc = load_text_encoders(cfg.encoders, device)
    text, text_mask, pooled = enc.encode(captions)    # one (B, L_i, D_i) stream + (B, L_i) mask per encoder
    ae = load_autoencoder(cfg.encoders, device)
    latents = ae.encode(images)                       # (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)
    check_widths(cfg.model, enc, ae)                  # before building the model

Training and inference both tokenise through `TextEncoders.encode`, so they cannot disagree: right
padding, truncation at `max_tokens`, no chat template, padding states zeroed. Each stream is trimmed
to the longest caption of the batch (`padding="longest"`), so a caption encodes the same alone or
beside a longer one, and nothing is padded to 77 tokens or across channels.

Everything here is frozen (eval mode, no gradients, forward passes under `torch.inference_mode`) and
runs in `encoders.dtype`. Outputs stay in that dtype (bf16 halves the bytes a
loader sends) and are ordinary tensors, not inference tensors, so a colocated trainer can feed them to
a model that records gradients.
"""

from __future__ import annotations

import abc
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sd3.config import ConfigError, EncoderConfig, ModelConfig
from sd3.paths import resolve

# FLUX.1 autoencoder latent convention (black-forest-labs/FLUX.1-schnell, vae/config.json:
# scaling_factor 0.3611, shift_factor 0.1159): latents = (z - shift) * scale, zero-centred, unit-ish std.
# The values are read from each autoencoder's own config; nothing here hard-codes them.

# A guard against pathological captions: the tokenizer would otherwise split a multi-megabyte string in
# full before truncating it. Cutting at this many characters per kept token cannot change the kept
# tokens unless they averaged over 256 characters each, which no real vocabulary's tokens do.
_CHARS_PER_TOKEN_LIMIT = 256

# Stand-ins are created only inside data/tiny_encoders (sd3.encode.stand_ins.STAND_IN_DIR, not imported: runtime
# modules never import the stand-in builder), so the hint names the folder as well as the flag.
_STAND_IN_HINT = ("or, for random-init stand-ins (demo and tests only), a path under data/tiny_encoders/ "
                  "with --encoders.create_tiny=true")


def encoder_dtype(cfg: EncoderConfig, device: torch.device | str) -> torch.dtype:
    """`cfg.dtype`, on every device: a CPU run with bfloat16 encoders exercises the GPU path's dtypes."""
    return getattr(torch, cfg.dtype)


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------


class TextEncoders:
    """The token-state encoders (`encoders.text` order) and the pooled CLIP text tower, frozen."""

    def __init__(self, *, tokenizers: list, models: list, pooled_tokenizer, pooled_model,
                 max_tokens: int, names: tuple[str, ...], device: torch.device, dtype: torch.dtype):
        self.tokenizers = tokenizers
        self.models = [_freeze(m) for m in models]
        self.pooled_tokenizer = pooled_tokenizer
        self.pooled_model = _freeze(pooled_model)
        self.names = names
        """Config key = value of each encoder, for messages (text streams, then pooled)."""
        self.device = device
        self.dtype = dtype
        # CLIP has 77 positions; Gemma and ModernBERT have thousands: the config's cap applies to all.
        self.max_lengths = [_max_length(m, max_tokens) for m in (*self.models, self.pooled_model)]

    @property
    def text_dims(self) -> tuple[int, ...]:
        """Width of each token stream (e.g. Gemma-2-2B 2304, ModernBERT-large 1024)."""
        return tuple(int(m.config.hidden_size) for m in self.models)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector (the CLIP text projection's output, 768 for MetaCLIP L/14)."""
        return int(self.pooled_model.text_projection.out_features)

    def encode(self, captions: list[str]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
        """Captions -> (one (B, L_i, D_i) state tensor per stream, one (B, L_i) bool mask per stream,
        (B, P) pooled). L_i is the longest caption of this batch in encoder i's tokens (<= max_tokens);
        states at padding positions are exactly zero."""
        captions = _check_captions(captions)
        text, masks = [], []
        for tokenizer, model, max_len in zip(self.tokenizers, self.models, self.max_lengths):
            ids, mask = self._tokenize(tokenizer, captions, max_len)                  # (B, L), (B, L)
            with torch.inference_mode():
                states = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
            # Outside inference mode, so the product is an ordinary tensor (see the module docstring).
            text.append(states * mask[..., None].to(states.dtype))                  # (B, L, D)
            masks.append(mask)
        ids, mask = self._tokenize(self.pooled_tokenizer, captions, self.max_lengths[-1])
        with torch.inference_mode():
            # The projected EOS state, not normalised (as the original system does).
            pooled = self.pooled_model(input_ids=ids, attention_mask=mask.long()).text_embeds  # (B, P)
        return tuple(text), tuple(masks), pooled.clone()

    def _tokenize(self, tokenizer, captions: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        cut = max_len * _CHARS_PER_TOKEN_LIMIT
        tokens = tokenizer([c[:cut] for c in captions], padding="longest", truncation=True,
                           max_length=max_len, return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device).bool()


def load_text_encoders(cfg: EncoderConfig, device: torch.device | str) -> TextEncoders:
    """Load `cfg.text` (AutoTokenizer + AutoModel, `last_hidden_state`) and `cfg.pooled` (a CLIP
    checkpoint: its text tower with projection), each from a local directory or a hub id, frozen,
    on `device` in `encoder_dtype`. A gated model (Gemma) reads HF_TOKEN from the environment."""
    from transformers import AutoModel, CLIPTextModelWithProjection

    device = torch.device(device)
    dtype = encoder_dtype(cfg, device)
    tokenizers, models = [], []
    for i, source in enumerate(cfg.text):
        key = f"encoders.text[{i}]"
        tokenizers.append(_load_tokenizer(key, source))
        models.append(_load_weights(key, source, AutoModel, dtype).to(device))
    key = "encoders.pooled"
    pooled_tokenizer = _load_tokenizer(key, cfg.pooled)
    pooled_model = _load_weights(key, cfg.pooled, CLIPTextModelWithProjection, dtype,
                                 config=_clip_text_config(key, cfg.pooled))
    _check_clip_eos(key, cfg.pooled, pooled_tokenizer, pooled_model.config)
    names = (*(f"encoders.text[{i}]={s!r}" for i, s in enumerate(cfg.text)),
             f"encoders.pooled={cfg.pooled!r}")
    return TextEncoders(tokenizers=tokenizers, models=models, pooled_tokenizer=pooled_tokenizer,
                        pooled_model=pooled_model.to(device), max_tokens=cfg.max_tokens, names=names,
                        device=device, dtype=dtype)


def _load_tokenizer(key: str, source: str):
    from transformers import AutoTokenizer

    tokenizer = _load(key, source, AutoTokenizer.from_pretrained)
    # Right padding and right truncation everywhere, in training and at inference: real tokens first.
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{key}={source!r}: the tokenizer has neither a pad nor an eos token to pad "
                              "with; use the tokenizer the model was trained with")
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer("")["input_ids"]:
        raise ConfigError(
            f"{key}={source!r}: the tokenizer adds no special token (BOS/CLS/EOS), so an empty caption would "
            "have no token at all; use the tokenizer the model was trained with"
        )
    return tokenizer


def _clip_text_config(key: str, source: str):
    """The text-tower config of a CLIP checkpoint. A full CLIP checkpoint (as MetaCLIP ships) states its
    projection width at the top level; the nested text config's own `projection_dim` is often left at
    its default (512) and would not match the saved projection, so the top-level value wins."""
    from transformers import AutoConfig

    config = _load(key, source, AutoConfig.from_pretrained)
    if getattr(config, "text_config", None) is None:
        return config  # a bare CLIPTextConfig (a text-tower-only checkpoint)
    text_config = config.text_config
    text_config.projection_dim = config.projection_dim
    return text_config


def _load_weights(key: str, source: str, cls, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    """`cls.from_pretrained(source)`, failing when any weight of the model is missing from the checkpoint
    (it would silently stay random). Unused checkpoint weights are expected and not reported: the
    masked-LM head of a ModernBERT checkpoint, the vision tower of a full CLIP one."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one bar per encoder per rank clutters the training log
    try:
        model, info = _load(key, source,
                            lambda s: cls.from_pretrained(s, dtype=dtype, output_loading_info=True, **kwargs))
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    _check_missing(key, source, type(model).__name__, info["missing_keys"])
    return model


def _check_missing(key: str, source: str, what: str, missing) -> None:
    if missing:
        some = ", ".join(sorted(missing)[:3])
        raise ConfigError(f"{key}={source!r}: the checkpoint lacks {len(missing)} weights of {what} "
                          f"({some}, ...); they would stay random: point it at the complete checkpoint")


def _load(key: str, source: str, load):
    """`load(source)`, turning any failure into a ConfigError that names the key and the fix."""
    local = resolve(source)
    try:
        return load(str(local) if local.is_dir() else source)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if local.is_dir():
            raise ConfigError(
                f"{key}={source!r}: could not load from this directory ({reason}); it must hold the "
                f"files save_pretrained writes (config, weights, tokenizer), {_STAND_IN_HINT}"
            ) from e
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(
            f"{key}={source!r} is not a local directory and could not be loaded as a hub id{offline} "
            f"({reason}): point it at a local directory, set HF_TOKEN for gated models (Gemma), "
            f"{_STAND_IN_HINT}"
        ) from e


def _check_clip_eos(key: str, source: str, tokenizer, config) -> None:
    """CLIP's pooled output is the state at the EOS token: make sure the model looks where the tokenizer
    puts it. transformers' CLIPTextTransformer takes the first `eos_token_id` of each row, except for
    configs with the legacy id 2, where it takes the largest token id."""
    eos = tokenizer.eos_token_id
    ids = tokenizer("")["input_ids"]
    legacy = config.eos_token_id == 2 and eos is not None and eos >= len(tokenizer) - 1
    looks_at_eos = eos is not None and ids[-1] == eos and (config.eos_token_id == eos or legacy)
    if not looks_at_eos:
        raise ConfigError(
            f"{key}={source!r}: the CLIP text config's eos_token_id={config.eos_token_id} does not match the "
            f"tokenizer, which ends a caption with token {ids[-1]} (eos {eos}); the pooled vector would be "
            "taken at the wrong position: use the tokenizer saved with the model"
        )


def prompt_warnings(cfg: EncoderConfig, prompts: list[str]) -> list[str]:
    """One line per prompt that some encoder will cut (it reads `max_tokens`, CLIP at most 77): the token
    count and the words that are ignored. Loads the tokenizers only (a second), not the models."""
    from transformers import AutoConfig

    out = []
    sources = [(f"encoders.text[{i}]", s) for i, s in enumerate(cfg.text)] + [("encoders.pooled", cfg.pooled)]
    for key, source in sources:
        tokenizer = _load_tokenizer(key, source)
        config = _load(key, source, AutoConfig.from_pretrained)
        positions = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        limit = min(cfg.max_tokens, positions) if positions else cfg.max_tokens
        for n, prompt in enumerate(prompts, 1):
            ids = tokenizer(prompt[: limit * _CHARS_PER_TOKEN_LIMIT * 4])["input_ids"]
            if len(ids) > limit:
                cut = tokenizer.decode(ids[limit:], skip_special_tokens=True).strip()
                shown = cut if len(cut) <= 40 else cut[:37] + "..."
                out.append(f"prompt {n} is {len(ids)} tokens for {key} ({source}), which reads {limit}: "
                           f"the last {len(ids) - limit} are cut, from {shown!r} on")
    return out


def _check_captions(captions: list[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("encode takes a list of captions, got one string: wrap it as [caption]")
    captions = list(captions)
    if not captions:
        raise ValueError("encode needs at least one caption")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"caption {i} is {type(c).__name__}, not str: replace missing captions with ''")
    return captions


def _max_length(model: torch.nn.Module, max_tokens: int) -> int:
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(max_tokens, positions) if positions else max_tokens


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Autoencoders
# --------------------------------------------------------------------------------------------------


class Autoencoder(abc.ABC):
    """Images (B, 3, H, W) in [-1, 1] <-> latents (B, channels, H / factor, W / factor)."""

    channels: int
    factor: int
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> latents (B, channels, H / factor, W / factor)."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float32 images (B, 3, H, W), clamped to [-1, 1]."""

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, H, W) in [-1, 1], got {tuple(images.shape)} "
                             f"{images.dtype}")
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not a multiple of the autoencoder factor {self.factor}: "
                             "resize or crop to the bucket sizes")

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must be (B, {self.channels}, h, w), got {tuple(latents.shape)}")


class KLAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL (the FLUX one: 16 channels, factor 8), frozen.
    latents = (z - shift_factor) * scaling_factor with z ~ the encoder's posterior."""

    def __init__(self, vae, device: torch.device, dtype: torch.dtype):
        self.vae = _freeze(vae).to(device)  # loaded in `dtype` already
        self.device, self.dtype = device, dtype
        self.channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)   # one /2 per block but the last
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)             # SD-style autoencoders have none

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check_images(images)
        with torch.inference_mode():
            z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.sample(generator)
        return ((z.float() - self.shift) * self.scale).to(self.dtype)      # (B, C, H/f, W/f)

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        z = latents.to(self.device, torch.float32) / self.scale + self.shift
        with torch.inference_mode():
            images = self.vae.decode(z.to(self.dtype)).sample               # (B, 3, H, W)
        return images.float().clamp(-1.0, 1.0)


class PixelAutoencoder(Autoencoder):
    """Space-to-depth: each f x f pixel block becomes 3 f^2 channels. No weights, an exact round trip,
    and a model trained on it shows recognisable pictures after minutes on a CPU. Always float32."""

    def __init__(self, factor: int, device: torch.device):
        if factor < 1:
            raise ConfigError(f"encoders.pixel_factor={factor} must be a positive integer")
        self.factor = factor
        self.channels = 3 * factor * factor
        self.device, self.dtype = device, torch.float32

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check_images(images)
        return F.pixel_unshuffle(images.to(self.device, self.dtype), self.factor)  # (B, 3f^2, H/f, W/f)

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        return F.pixel_shuffle(latents.to(self.device, self.dtype), self.factor).clamp(-1.0, 1.0)


def load_autoencoder(cfg: EncoderConfig, device: torch.device | str) -> Autoencoder:
    """`cfg.vae == 'pixel'`: the weightless PixelAutoencoder; otherwise a diffusers AutoencoderKL from
    `cfg.vae` (local directory or hub id) and `cfg.vae_subfolder`."""
    device = torch.device(device)
    if cfg.vae == "pixel":
        return PixelAutoencoder(cfg.pixel_factor, device)
    from diffusers import AutoencoderKL

    dtype = encoder_dtype(cfg, device)
    # `encoders.vae_subfolder` names where inside `encoders.vae` the autoencoder lives ('vae' for FLUX).
    # Low-memory loading needs accelerate, an optional package: ask for it only when it is there.
    low_mem = importlib.util.find_spec("accelerate") is not None
    vae, info = _load("encoders.vae", cfg.vae, lambda s: AutoencoderKL.from_pretrained(
        s, subfolder=cfg.vae_subfolder or None, dtype=dtype, low_cpu_mem_usage=low_mem,
        output_loading_info=True))
    _check_missing("encoders.vae", cfg.vae, "AutoencoderKL", info["missing_keys"])
    return KLAutoencoder(vae, device, dtype)


# --------------------------------------------------------------------------------------------------
# Config agreement
# --------------------------------------------------------------------------------------------------


def check_widths(model: ModelConfig, enc: TextEncoders, ae: Autoencoder) -> None:
    """Fail before the model is built when its input widths disagree with the loaded encoders."""
    dims = enc.text_dims
    if tuple(model.text_dims) != dims:
        wrong = [f"model.text_dims[{i}]={a} but {name} gives {b}-wide states"
                 for i, (a, b, name) in enumerate(zip(model.text_dims, dims, enc.names)) if a != b]
        if len(model.text_dims) != len(dims):
            wrong.append(f"model.text_dims has {len(model.text_dims)} entries for {len(dims)} text encoders")
        raise ConfigError(f"{'; '.join(wrong)}: set --model.text_dims='{dims}'")
    if model.pooled_dim != enc.pooled_dim:
        raise ConfigError(f"model.pooled_dim={model.pooled_dim} but {enc.names[-1]} gives a {enc.pooled_dim}-"
                          f"wide pooled vector: set --model.pooled_dim={enc.pooled_dim}")
    if model.in_channels != ae.channels:
        raise ConfigError(f"model.in_channels={model.in_channels} but the autoencoder makes {ae.channels}-"
                          f"channel latents: set --model.in_channels={ae.channels}")
    multiple = ae.factor * model.patch_size
    for key, res in (("model.max_res", model.max_res), ("model.max_res_orig", model.max_res_orig)):
        if res % multiple:
            raise ConfigError(f"{key}={res} is not a multiple of {multiple} (autoencoder factor {ae.factor} "
                              f"x model.patch_size {model.patch_size}): pick a multiple of {multiple}")
