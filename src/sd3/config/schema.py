"""The config schema: one dataclass per section, every field with its docstring, the cross-field checks
(`Config.validate`), the choice lists, and the exact JSON round trip (`to_dict` / `from_dict`) a
checkpoint's `config.json` relies on. Presets live in `sd3.config.presets`, the command line in
`sd3.config.cli`; `sd3.config` re-exports all of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The choices of each string field: the one place they are listed (modules that branch on them import them).
MLP_TYPES = ("swiglu", "gelu")
ATTN_BACKENDS = ("auto", "sdpa", "flash", "xformers")
T_SAMPLINGS = ("logit_normal", "uniform")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("bf16", "fp32")
EMA_DEVICES = ("model", "cpu")
DEVICES = ("auto", "cuda", "cpu")
SMALL_BUCKETS = ("drop", "fill")
ENCODER_DTYPES = ("bfloat16", "float16", "float32")
PROCESS_GROUP_BACKENDS = ("auto", "nccl", "gloo")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
PARALLELS = ("ddp", "fsdp", "hsdp")


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent. The message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    in_channels: int = 16
    """Latent channels the model reads and predicts (16 for the FLUX autoencoder; 3*f*f for the pixel one)."""
    patch_size: int = 2
    """Side of the square latent patch that becomes one image token."""
    depth: int = 19
    """Number of joint (dual-stream) blocks."""
    width: int = 1216
    """Model width D. SD3 (arXiv 2403.03206) sec. 5.2 uses 64 * depth."""
    num_heads: int = 19
    """Attention heads; the head width is width / num_heads."""
    mlp_type: str = "swiglu"
    """MLP of every block: 'swiglu' (three matrices) or 'gelu' (two)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the model width."""
    text_dims: tuple[int, ...] = (2304, 1024)
    """Width of each text token stream, in `encoders.text` order (Gemma-2-2B 2304, ModernBERT-large 1024)."""
    pooled_dim: int = 768
    """Width of the pooled text vector (MetaCLIP ViT-L/14 projection: 768)."""
    text_scale_init: float = 0.01
    """Initial value of each text stream's learnable multiplier (Gemma's activations are huge)."""
    time_scale_init: float = 1000.0
    """Initial value of the learnable scale applied to t in [0, 1] before the sinusoidal embedding."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_res: int = 256
    """Largest image side (pixels) this stage trains on."""
    max_res_orig: int = 256
    """Largest image side of the first stage. RoPE positions are scaled by max_res_orig / max_res, so a
    512 stage started from a 256 checkpoint sees positions in the range it was trained on."""
    attn_backend: str = "auto"
    """'auto' (flash-attn, then xformers on CUDA when importable, else SDPA), 'sdpa', 'flash' or 'xformers'."""
    mask_ratio: float = 0.0
    """Patch masking in training (MicroDiT's deferred masking, arXiv 2407.15811, which uses 0.75): the share of
    image tokens each sample drops after the patch-mixer; the main blocks and the loss see the rest. 0: off.
    Validation, sampling and the last `train.unmasked_steps` steps see every token."""
    mixer_depth: int = 0
    """Patch-mixer blocks: they see every image token before the masking (and at inference, where they are
    simply the first blocks). 0: none (masking then drops tokens straight after the patch embedding)."""
    mixer_joint: bool = True
    """Patch-mixer blocks are joint image/text blocks like the main ones (True), or image-only blocks that see
    the caption only through the pooled vector (False)."""


@dataclass
class EncoderConfig:
    vae: str = "black-forest-labs/FLUX.1-schnell"
    """Local directory or hub id of a diffusers AutoencoderKL, or 'pixel' for the weightless
    space-to-depth autoencoder (small CPU runs)."""
    vae_subfolder: str = "vae"
    """Subfolder of `vae` that holds the autoencoder ('' when `vae` points at it directly)."""
    pixel_factor: int = 4
    """Space-to-depth factor of the pixel autoencoder (latent channels = 3 * factor^2)."""
    text: tuple[str, ...] = ("google/gemma-2-2b", "answerdotai/ModernBERT-large")
    """Text encoders whose token states the model reads, each a local directory or hub id."""
    pooled: str = "facebook/metaclip-l14-400m"
    """CLIP model whose projected text embedding is the pooled vector (a local directory or hub id)."""
    max_tokens: int = 77
    """Captions are truncated to this many tokens per encoder (right padding)."""
    dtype: str = "bfloat16"
    """Encoder weights and outputs dtype ('bfloat16', 'float16', 'float32'), on any device (the pixel
    autoencoder has no weights and always works in float32)."""
    create_tiny: bool = False
    """Create random-init stand-in encoders at the paths above when they are missing (demo and tests
    only: they make the pipeline run, not good images)."""


@dataclass
class DataConfig:
    dataset: str = "data/cc12m_imagenet21k_256"
    """Folder of bucketed parquet shards (made by data/create_phase.py)."""
    index: str = ""
    """Bucket index made by src/create_indices.py; '' means `<dataset>/bucket_index.safetensors`."""
    batch_size: int = 140
    """Samples per model rank per micro-step."""
    short_caption_prob: float = 0.5
    """Probability of training on `recaption_short` instead of `recaption` (the other is used when one is
    empty)."""
    small_buckets: str = "drop"
    """Rows that do not fill a whole global batch (batch_size x model ranks; a small bucket, or the tail of a
    large one): 'drop' them for the epoch (no row twice in an epoch), or 'fill' the batch by repeating rows of
    the same bucket (every row every epoch)."""
    decode_workers: int = 4
    """Threads that read and decode images ahead of the encoders on each loader rank."""
    prefetch: int = 2
    """Batches decoded ahead of the encoders on a loader rank, and batches in flight per model rank."""
    gpu_decode: bool = True
    """On CUDA loader ranks, decode JPEGs on the GPU in one batched nvjpeg call (other formats: CPU)."""
    create_demo: bool = False
    """Build the small demo dataset (photos bundled with scikit-image) at `dataset` when it is missing."""
    val_rows: int = 0
    """Rows held out of training for the fixed-t validation loss, drawn uniformly from the dataset with
    train.seed (the same rows on every rank and on resume); 0: none."""


@dataclass
class FlowConfig:
    t_sampling: str = "logit_normal"
    """How training draws t: 'logit_normal' (SD3 sec. 3.1) or 'uniform'."""
    t_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit-normal)."""
    t_std: float = 1.0
    """Standard deviation of the normal before the sigmoid (logit-normal)."""
    t_shift: float = 1.0
    """Shift alpha applied as t' = a t / (1 + (a - 1) t) (SD3 sec. 5.3.2); 1 means none."""
    t_shift_by_resolution: bool = False
    """Scale the shift by sqrt(image tokens / t_shift_base_tokens), SD3's resolution-dependent shift."""
    t_shift_base_tokens: int = 256
    """Image-token count at which the resolution-dependent shift equals t_shift (256: 256 px, /8 VAE, patch 2)."""
    p_drop_text: tuple[float, ...] = (0.316, 0.316)
    """Per-sample probability of nulling each text stream (seed: 0.316 each, so both ~0.1)."""
    p_drop_pooled: float = 0.1
    """Per-sample probability of nulling the pooled vector."""
    p_drop_all: float = 0.1
    """Per-sample probability of nulling every stream at once: the unconditional branch CFG relies on."""


@dataclass
class TrainConfig:
    steps: int = 300_000
    """Optimizer steps to train for (each is `accumulation_steps` micro-batches)."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    schedule: str = "constant"
    """After warmup: 'constant' or 'cosine' (down to min_lr at `steps`)."""
    warmup: int = 1000
    """Linear warmup from 0, in optimizer steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (never on norms, biases, scalars or embedders)."""
    grad_clip: float = 1.0
    """Gradient-norm clip, always applied."""
    max_bad_steps: int = 20
    """Stop the run after this many bad steps in a row (non-finite or exploding gradient: not applied),
    naming the last good step; no checkpoint of a bad stretch is ever written."""
    grad_spike_factor: float = 20.0
    """A step whose gradient norm exceeds this multiple of the running mean of good ones is bad (not
    applied); 0 turns the check off (non-finite gradients are always bad)."""
    accumulation_steps: int = 2
    """Micro-batches per optimizer step."""
    ema_decay: float = 0.99
    """EMA decay per EMA update."""
    ema_every: int = 100
    """Update the EMA every this many optimizer steps."""
    ema_device: str = "model"
    """Where the EMA weights live: 'model' (the model's device) or 'cpu'."""
    precision: str = "bf16"
    """'bf16' autocast (fp32 master weights), on CUDA and on the CPU alike, or 'fp32'."""
    activation_checkpointing: bool = True
    """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""
    compile: bool = False
    """torch.compile each block (applied from outside the model)."""
    compile_backend: str = "inductor"
    """torch.compile's backend: 'inductor' (generated kernels: the fast one), or, to tell a capture problem
    from a code-generation one, 'aot_eager' (traced forward and backward, eager kernels) or 'eager'."""
    seed: int = 0
    """Seeds the initial weights, the data order and every per-step random draw."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda' or 'cpu'."""
    unmasked_steps: int = 0
    """With model.mask_ratio > 0: the last this many optimizer steps train without masking (MicroDiT's
    unmasked finetune, which closes most of the gap masking leaves)."""
    parallel: str = "ddp"
    """How the model ranks share the model: 'ddp' (each holds all of it: weights, gradients, optimizer
    state, EMA), 'fsdp' (FSDP2: each holds 1/N of every tensor, gathered per block for compute), or 'hsdp'
    (sharded within a group of `hsdp_shard_size` model ranks, replicated across the groups)."""
    reshard_after_forward: bool = True
    """fsdp/hsdp: free each block's gathered weights after its forward and gather them again for the
    backward (less memory, one more all-gather per block), as ZeRO-3; false keeps them until the backward."""
    hsdp_shard_size: int = 0
    """hsdp: model ranks per shard group (consecutive model ranks); 0 = the model ranks of one node, so
    weights are sharded within a node and replicated across nodes."""


@dataclass
class RankConfig:
    loader_to_model: dict[int, list[int]] | None = None
    """Seed-format map {loader rank: [model ranks]}; overrides the per-node generator below."""
    loaders_per_node: int = 2
    """Generated map: the first ranks of every node that load (seed: 2 of 8)."""
    models_per_loader: int = 3
    """Generated map: model ranks each loader feeds (seed: 3)."""
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    timeout_s: int = 600
    """Collective and receive timeout: a silent peer ends the job after this many seconds."""


@dataclass
class LogConfig:
    every: int = 10
    """Log metrics every this many optimizer steps."""
    save_every: int = 1000
    """Write a checkpoint every this many optimizer steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted once a new one is whole."""
    async_save: bool = True
    """train.parallel=fsdp/hsdp: copy each model rank's part of a checkpoint to host memory and write it on a
    background thread while training goes on (host memory: the rank's share of weights, EMA and optimizer
    state, about 16 bytes per parameter / model ranks, kept between saves); false writes it before the
    next step. Under ddp the first model rank always writes in the background."""
    sample_every: int = 1000
    """Write a sample grid from the EMA weights every this many optimizer steps (0: only at the end)."""
    val_every: int = 1000
    """Fixed-t validation loss every this many optimizer steps (0: never)."""
    sample_prompts: tuple[str, ...] = (
        "a photograph of an astronaut riding a horse",
        "a cat sitting on a windowsill at sunset",
        "a cup of coffee on a wooden table",
        "a rocket launching into a clear blue sky",
    )
    """Prompts of the in-training sample grid."""
    sample_steps: int = 30
    """Sampler steps of the in-training sample grid."""
    sample_cfg: float = 5.0
    """Guidance scale of the in-training sample grid."""
    wandb_project: str = "sd3-from-scratch"
    """wandb project; WANDB_MODE=offline or disabled is honoured, the key comes from WANDB_API_KEY."""
    wandb_name: str = ""
    """wandb run name; '' uses the run directory's name."""
    wandb: bool = True
    """Log to wandb at all."""
    eval_every: int = 0
    """FID of the EMA weights on held-out rows every this many optimizer steps (0: never). Needs
    data.val_rows >= eval_num and the Inception weights (eval_inception)."""
    eval_num: int = 0
    """Held-out rows (the first of data.val_rows) generated and scored per evaluation, split over the model
    ranks."""
    eval_steps: int = 30
    """Sampler steps of each generated image (euler)."""
    eval_cfg: float = 5.0
    """Guidance scale of the generated images."""
    eval_inception: str = ""
    """FID Inception weights: a local file (weights-inception-2015-12-05-6726825d.pth, or .safetensors), ''
    to fetch them once into the torch hub cache (needs network), or 'random' for smoke tests (figures not
    comparable with published ones)."""
    eval_clip: str = ""
    """CLIP model (hub id or local directory) for the CLIP score of the generated images; '' for none."""
    peak_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s of one model GPU, for MFU (989: H100 SXM)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ranks: RankConfig = field(default_factory=RankConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run_dir: str = "runs/default"
    """Where checkpoints, samples and logs go."""
    preset: str = ""
    """The preset this config started from (informational)."""

    # -- derived sizes ------------------------------------------------------------------------------
    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along a side (8 for the FLUX autoencoder)."""
        return self.encoders.pixel_factor if self.encoders.vae == "pixel" else 8

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (latent factor x patch)."""
        return self.latent_factor * self.model.patch_size

    def validate(self) -> Config:
        """Cross-field checks that must hold before any heavy work. Returns self."""
        m, e, f, t, d = self.model, self.encoders, self.flow, self.train, self.data
        # inf or nan in any float is a typo, never a setting; checked first, as nan fails every comparison
        # below with a message that misses the point ("train.lr=nan must be positive").
        for key, (owner, spec) in field_paths(self).items():
            value = getattr(owner, spec.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"{key}={value} must be a finite number")
        _choice("model.mlp_type", m.mlp_type, MLP_TYPES)
        _choice("model.attn_backend", m.attn_backend, ATTN_BACKENDS)
        _choice("flow.t_sampling", f.t_sampling, T_SAMPLINGS)
        _choice("train.schedule", t.schedule, SCHEDULES)
        _choice("train.precision", t.precision, PRECISIONS)
        _choice("train.ema_device", t.ema_device, EMA_DEVICES)
        _choice("train.device", t.device, DEVICES)
        _choice("train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
        _choice("train.parallel", t.parallel, PARALLELS)
        _choice("data.small_buckets", d.small_buckets, SMALL_BUCKETS)
        _choice("encoders.dtype", e.dtype, ENCODER_DTYPES)
        _choice("ranks.backend", self.ranks.backend, PROCESS_GROUP_BACKENDS)
        if m.width % m.num_heads:
            raise ConfigError(f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}")
        head_dim = m.width // m.num_heads
        if head_dim % 4:
            raise ConfigError(
                f"model: head width {head_dim} must be a multiple of 4 (RoPE2d rotates pairs in two halves)"
            )
        if e.vae == "pixel" and m.in_channels != 3 * e.pixel_factor**2:
            raise ConfigError(
                f"model.in_channels={m.in_channels} does not match the pixel autoencoder "
                f"(3 * encoders.pixel_factor^2 = {3 * e.pixel_factor**2}); set --model.in_channels="
                f"{3 * e.pixel_factor**2}"
            )
        if len(m.text_dims) != len(e.text):
            raise ConfigError(
                f"model.text_dims has {len(m.text_dims)} entries but encoders.text names {len(e.text)} "
                "encoders: give one width per text encoder"
            )
        if len(f.p_drop_text) != len(e.text):
            raise ConfigError(
                f"flow.p_drop_text has {len(f.p_drop_text)} entries but encoders.text names "
                f"{len(e.text)} encoders: give one probability per text encoder"
            )
        for key, p in [("flow.p_drop_pooled", f.p_drop_pooled), ("flow.p_drop_all", f.p_drop_all),
                       ("data.short_caption_prob", d.short_caption_prob),
                       *((f"flow.p_drop_text[{i}]", p) for i, p in enumerate(f.p_drop_text))]:
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{key}={p} is not a probability in [0, 1]")
        if m.max_res % self.pixel_multiple or m.max_res_orig % self.pixel_multiple:
            raise ConfigError(
                f"model.max_res={m.max_res} and model.max_res_orig={m.max_res_orig} must be multiples of "
                f"{self.pixel_multiple} (latent factor {self.latent_factor} x patch {m.patch_size})"
            )
        positive = {
            "train.steps": t.steps, "train.accumulation_steps": t.accumulation_steps,
            "train.grad_clip": t.grad_clip, "train.lr": t.lr, "train.ema_every": t.ema_every,
            "data.batch_size": d.batch_size, "data.prefetch": d.prefetch,
            "data.decode_workers": d.decode_workers, "log.every": self.log.every,
            "log.save_every": self.log.save_every, "log.keep_last": self.log.keep_last,
            "encoders.max_tokens": e.max_tokens, "ranks.timeout_s": self.ranks.timeout_s,
            "model.depth": m.depth, "model.width": m.width,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key}={value} must be positive")
        if t.min_lr < 0 or t.min_lr > t.lr:
            raise ConfigError(f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
        if t.eps <= 0 or t.weight_decay < 0 or not all(0 <= b < 1 for b in t.betas):
            raise ConfigError(f"train.eps={t.eps} must be positive, train.weight_decay={t.weight_decay} >= 0 and "
                              f"train.betas={t.betas} in [0, 1)")
        if t.max_bad_steps < 1 or t.grad_spike_factor < 0:
            raise ConfigError(f"train.max_bad_steps={t.max_bad_steps} must be >= 1 and train.grad_spike_factor="
                              f"{t.grad_spike_factor} >= 0 (0: off)")
        if m.rope_theta <= 0 or self.log.peak_tflops <= 0:
            raise ConfigError("model.rope_theta and log.peak_tflops must be positive")
        if not 0.0 <= m.mask_ratio < 1.0 or m.mixer_depth < 0 or t.unmasked_steps < 0:
            raise ConfigError(f"model.mask_ratio={m.mask_ratio} must be in [0, 1), model.mixer_depth={m.mixer_depth} "
                              f"and train.unmasked_steps={t.unmasked_steps} >= 0")
        if m.mask_ratio > 0 and t.unmasked_steps >= t.steps:
            raise ConfigError(f"train.unmasked_steps={t.unmasked_steps} leaves no masked step of train.steps="
                              f"{t.steps}: lower it, or set --model.mask_ratio=0")
        if d.val_rows < 0:
            raise ConfigError(f"data.val_rows={d.val_rows} must be >= 0")
        if t.hsdp_shard_size < 0 or (t.hsdp_shard_size and t.parallel != "hsdp"):
            raise ConfigError(f"train.hsdp_shard_size={t.hsdp_shard_size} must be >= 0 and is for "
                              f"--train.parallel=hsdp only (this config has train.parallel={t.parallel!r})")
        lg = self.log
        if lg.eval_every < 0 or lg.eval_steps < 1:
            raise ConfigError(f"log.eval_every={lg.eval_every} must be >= 0 and log.eval_steps={lg.eval_steps} >= 1")
        if lg.eval_every and not 2 <= lg.eval_num <= d.val_rows:
            raise ConfigError(f"log.eval_every={lg.eval_every} evaluates log.eval_num={lg.eval_num} held-out rows "
                              f"out of data.val_rows={d.val_rows}: set 2 <= --log.eval_num <= --data.val_rows")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
        if t.warmup < 0 or f.t_std <= 0 or f.t_shift <= 0:
            raise ConfigError("train.warmup must be >= 0; flow.t_std and flow.t_shift must be positive")
        return self


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, options))}")


# --------------------------------------------------------------------------------------------------
# Introspection and the JSON round trip
# --------------------------------------------------------------------------------------------------


def field_paths(cfg: Any = None, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every leaf key (e.g. 'train.lr') -> (owning dataclass instance, its Field)."""
    cfg = Config() if cfg is None else cfg
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(field_paths(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (cfg, f)
    return out


def _coerce(value: Any, hints: Any, key: str) -> Any:
    """Check a parsed (or JSON-loaded) value against a type and convert lists to tuples, keys to int."""
    hints = _resolve(hints)
    origin, args = typing.get_origin(hints), typing.get_args(hints)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a dict, got {value!r}")
        kt, vt = args
        return {_coerce(int(k) if kt is int else k, kt, key): _coerce(v, vt, key) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if hints is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hints is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hints in (str, bool) and isinstance(value, hints):
        return value
    raise ConfigError(f"{key}: expected {getattr(hints, '__name__', hints)}, got {value!r}")


_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _resolve(annotation: Any) -> Any:
    if isinstance(annotation, str):  # `from __future__ import annotations` leaves strings
        return eval(annotation, vars(typing) | {"types": types})
    return annotation


def _field_type(owner: Any, f: dataclasses.Field) -> Any:
    cls = type(owner)
    if cls not in _TYPE_CACHE:
        _TYPE_CACHE[cls] = typing.get_type_hints(cls)
    return _TYPE_CACHE[cls][f.name]


def to_dict(cfg: Any) -> dict:
    out = dataclasses.asdict(cfg)
    # JSON keys must be strings: the rank map's int keys are restored by from_dict.
    loader_map = out["ranks"]["loader_to_model"] if "ranks" in out else None
    if loader_map is not None:
        out["ranks"]["loader_to_model"] = {str(k): v for k, v in loader_map.items()}
    return out


def from_dict(data: dict, cls: type = Config) -> Any:
    """Rebuild a config from `to_dict` output; unknown keys fail (a config from a newer version)."""
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=3)
            raise ConfigError(f"{cls.__name__}: unknown key {key!r} in saved config (close: {close})")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(value, sub)
        else:
            kwargs[key] = _coerce(value, sub, f"{cls.__name__}.{key}")
    return cls(**kwargs)


def save_json(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))


