"""Peak GPU memory of a training config, estimated before anything is loaded (`train.py --dry-run`).

    report = estimate(cfg)          # a pure function of the config: no weights, no GPU, no torch.distributed
    print(format_report(report))    # one line per item, in GiB

Model GPU (one model rank; the first one also keeps the sample-grid model):

- **State, exact.** Weights, gradients, AdamW's two moments and the EMA are fp32 copies of the real
  parameter tensors, counted by building the MMDiT on the meta device (`count_parameters` does the
  same). DDP keeps gradients in its buckets (`gradient_as_bucket_view`), so no second copy.
- **Activations, a formula.** What autograd keeps for the backward pass, term by term, read off the
  forward of `sd3.model.mmdit` (one `Term` per kept tensor: `block_terms`, `outside_terms`), plus the
  gradients that are alive at the worst moment of the backward pass (`backward_terms`). The bytes per
  element of each term depend on the numerics (`Numerics`): bf16 autocast keeps bf16 copies of linear
  inputs and weights, but on CUDA it runs LayerNorm and RMSNorm in fp32 (their inputs are kept as fp32
  copies); the CPU autocast runs LayerNorm in bf16; CUDA attention kernels write their output in (B, L,
  H, Dh) order where the CPU one needs a copy. Figures are for the largest bucket (`model.max_res`
  square) and every text stream at `encoders.max_tokens` tokens (the loader trims each batch to its
  longest caption, so this is the worst case). With activation checkpointing a forward keeps only each
  block's inputs; the backward recomputes one block at a time, so the peak is the block inputs plus one
  block's activations and gradients. The sum assumes all of it coexists with the gradients, which holds
  from the second micro-batch of an accumulating step on (`train.accumulation_steps > 1`) and is an upper
  bound otherwise. Eager mode: `torch.compile` fuses elementwise ops and keeps less. Patch-mixer blocks
  count as blocks (image-only ones without the text stream); the figure is for an unmasked step (the
  finetune of a patch-masked run, its peak): masked steps keep less.
- **Allowance.** The CUDA context and the caching allocator's fragmentation are not tensors: a fixed
  `CONTEXT_GIB` plus `FRAGMENTATION` of everything else (rules of thumb, stated as such in the report).

How the formula is checked (tests/test_memory.py): on small configs on the CPU, in fp32 and under CPU
bf16 autocast, with and without activation checkpointing, one training forward and backward (the
`flow.flow_loss` the trainer runs, gradients already allocated as in an accumulating step) runs under
`torch.profiler` with memory profiling: every allocation and free the CPU allocator reports is summed in
time order, and the peak of that running sum is the measured activation peak (everything the step
allocates on top of the parameters, gradients and inputs that existed before it). The formula's peak for
the CPU numerics must be within 20% of it, and the terms kept after the forward must match the bytes of
the distinct storages autograd actually saved. The CUDA numerics differ only in the per-op dtypes listed
in `Numerics`; a `gpu`-marked test checks them against `torch.cuda.max_memory_allocated`.

Loader GPU: the frozen encoders' weights in `encoders.dtype` and their inference activations at the
loader's batch (batch_size x models_per_loader captions; images through the autoencoder in chunks of
`loader.vae_chunk`). A local encoder directory is counted exactly from its config (built on the meta
device); a hub id cannot be read here (nothing is downloaded), so the published sizes in `KNOWN_ENCODERS`
are used, and the report says which figures came from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from sd3.config import Config, EncoderConfig, ModelConfig
from sd3.config.schema import PRECISIONS
from sd3.paths import resolve

GIB = 1024**3
CONTEXT_GIB = 1.0
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers: about 0.5-1 GiB per process on H100-class GPUs
(not measured here: a rule of thumb)."""
FRAGMENTATION = 0.10
"""The caching allocator reserves more than it hands out (block rounding, freed blocks too small to reuse);
10% is the usual order of the gap between `memory_reserved` and `max_memory_allocated` (a rule of thumb)."""
GPU_GIB = 80 * 1e9 / GIB
"""An "80 GB" GPU (H100 / A100 80GB) holds 80e9 bytes: 74.5 GiB."""


# ---------------------------------------------------------------------------------------------------
# Numerics: bytes per element of what autograd keeps, by kind of op
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of each kind of kept tensor, for one precision on one device type."""

    name: str
    matmul: int
    """Linear inputs as kept (bf16 copies under autocast), linear outputs, the residual stream, the
    attention kernel's inputs and output."""
    ln_in: int
    """LayerNorm input as kept: CUDA autocast runs LayerNorm in fp32 and keeps the fp32 copy it makes."""
    ln_out: int
    """LayerNorm output (kept by the adaLN modulation) and its mean / rstd."""
    rms_out: int
    """Normalised q / k kept for the per-stream RMSNorm weight's gradient (`joint_rms_norm`): fp32 when
    CUDA autocast runs RMSNorm in fp32; the CPU decomposition returns the input's dtype."""
    rms_weighted: int
    """An RMSNorm that takes its weight inside (the text embedders): the
    CPU decomposes it and keeps x * rstd in fp32 for the weight's gradient; the fused CUDA kernel keeps
    only its input and rstd (0)."""
    attn_copy: bool
    """The attention output needs a copy from (B, H, L, Dh) to (B, L, D): CPU SDPA. CUDA kernels (flash,
    memory-efficient, cuDNN) allocate the output as (B, L, H, Dh), so the transpose back is a view."""
    weight_copies: bool
    """Autocast casts every linear weight to bf16 once per forward and the backward keeps the copy."""

    @property
    def rms_in(self) -> int:
        """q / k as RMSNorm keeps them: fp32 always (the fp32 activations themselves, the CUDA autocast
        fp32 copy, or the CPU decomposition's upcast)."""
        return 4


def numerics(precision: str, device_type: str) -> Numerics:
    """`train.precision` ('bf16' or 'fp32') on 'cuda' or 'cpu'. bf16 means autocast: fp32 master weights."""
    if precision not in PRECISIONS or device_type not in ("cuda", "cpu"):
        raise ValueError(f"numerics: precision={precision!r} on {device_type!r}; expected bf16/fp32 on cuda/cpu")
    cuda = device_type == "cuda"
    if precision == "fp32":
        return Numerics(f"fp32 ({device_type})", matmul=4, ln_in=4, ln_out=4, rms_out=4,
                        rms_weighted=0 if cuda else 4, attn_copy=not cuda, weight_copies=False)
    if cuda:  # torch's CUDA autocast lists: layer_norm, rms_norm, pow, rsqrt run in fp32
        return Numerics("bf16 autocast (cuda)", matmul=2, ln_in=4, ln_out=4, rms_out=4, rms_weighted=0,
                        attn_copy=False, weight_copies=True)
    return Numerics("bf16 autocast (cpu)", matmul=2, ln_in=2, ln_out=2, rms_out=2, rms_weighted=4,
                    attn_copy=True, weight_copies=True)


# ---------------------------------------------------------------------------------------------------
# The activation formula
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float


def _mlp_hidden(cfg: ModelConfig) -> tuple[int, int]:
    """(hidden width, hidden-wide tensors the MLP keeps): SwiGLU keeps gate, SiLU(gate), value and their
    product; GELU keeps its input and output."""
    return int(cfg.width * cfg.mlp_ratio), (4 if cfg.mlp_type == "swiglu" else 2)


def block_terms(cfg: ModelConfig, *, batch: int, img_tokens: int, txt_tokens: int, nx: Numerics,
                last: bool, image_only: bool = False) -> list[Term]:
    """What one `JointBlock` forward keeps for its backward (read off `JointBlock.forward`, in order).

    Per stream: the norm's input and output, the modulated input of the fused qkv projection; then the
    joint attention (q and k through QK-RMSNorm and RoPE, v, the kernel's output); then per stream again
    the projection's output, the second norm, the MLP. The last block has image queries only and no text
    projection or MLP. `image_only`: the patch-mixer's `ImageBlock` (call it with `txt_tokens=0`)."""
    D, H = cfg.width, cfg.num_heads
    Dh = D // H
    M, hidden_kept = _mlp_hidden(cfg)
    n_img, n_txt = batch * img_tokens, batch * txt_tokens
    n = n_img + n_txt                                # joint keys
    nq = n_img if last else n                        # queries
    mm = nx.matmul
    terms: list[Term] = []

    def stream_in(tag: str, tokens: int) -> None:
        terms.extend([
            Term(f"{tag} norm1 input", tokens * D * nx.ln_in),
            Term(f"{tag} norm1 output", tokens * D * nx.ln_out),
            Term(f"{tag} norm1 mean, rstd", tokens * 2 * nx.ln_out),
            Term(f"{tag} qkv input (modulated)", tokens * D * mm),
        ])

    def stream_out(tag: str, tokens: int) -> None:
        terms.extend([
            Term(f"{tag} attention projection output", tokens * D * mm),   # kept by the gated residual
            Term(f"{tag} norm2 input", tokens * D * nx.ln_in),
            Term(f"{tag} norm2 output", tokens * D * nx.ln_out),
            Term(f"{tag} norm2 mean, rstd", tokens * 2 * nx.ln_out),
            Term(f"{tag} MLP input (modulated)", tokens * D * mm),
            Term(f"{tag} MLP hidden ({hidden_kept} x {M} wide)", tokens * hidden_kept * M * mm),
            Term(f"{tag} MLP output", tokens * D * mm),                     # kept by the gated residual
        ])

    stream_in("img", n_img)
    stream_in("txt", n_txt)
    # adaLN: each gate is a view of its stream's (B, 6D) modulation output, 1 + scale a new (B, D).
    mods = (6 + 2) * D + (D if last else 8 * D)
    terms.append(Term("adaLN modulation vectors", batch * mods * mm))

    # Keys: joint QK-RMSNorm (fp32 input kept, normalised output kept for the weight), RoPE, the kernel.
    terms.extend([
        Term("k RMSNorm input", n * D * nx.rms_in),
        Term("k RMSNorm output", n * D * nx.rms_out),
        Term("k RMSNorm rstd", n * H * 4),
        Term("k after RoPE (attention input)", n * D * mm),
        # The joint block's v is a concatenation (a copy); an image-only block's is a view of the fused
        # qkv output, which the attention then keeps whole.
        Term("qkv output (v is a view of it)" if image_only else "v (attention input)", n * D * mm * (
            3 if image_only else 1)),
        # `joint_rms_norm` keeps each stream's weight expanded over its tokens: keys, then queries.
        Term("RMSNorm weights over the sequence", (img_tokens + txt_tokens + nq // batch) * Dh * 4),
        # Queries (the last block: image only) through the same joint norm, which copies them first.
        Term("q RMSNorm input", nq * D * nx.rms_in),
        Term("q RMSNorm output", nq * D * nx.rms_out),
        Term("q RMSNorm rstd", nq * H * 4),
    ])
    terms.extend([
        Term("q after RoPE (attention input)", nq * D * mm),
        Term("attention output", nq * D * mm),
        Term("attention logsumexp", nq * H * 4),
        Term("attention mask bias", batch * (img_tokens + txt_tokens) * mm),
    ])
    if nx.attn_copy:
        terms.append(Term("attention output as (B, L, D)", nq * D * mm))
    stream_out("img", n_img)
    if not last:
        stream_out("txt", n_txt)
    return terms


def embedder_terms(cfg: ModelConfig, *, batch: int, img_tokens: int, txt_tokens: tuple[int, ...],
                   nx: Numerics, text_arrives_as: int) -> list[Term]:
    """What the forward keeps before the blocks: the patch and text embedders, the conditioning vector.

    `text_arrives_as`: bytes per element of the batch's text states. `flow_loss` casts them to fp32;
    from bf16 (CUDA encoders) that makes new tensors the text norms keep, from fp32 it is the batch itself."""
    C, p = cfg.in_channels, cfg.patch_size
    terms = [Term("patchified latents (img_in input)", batch * img_tokens * C * p * p * nx.matmul)]
    for i, (L, d) in enumerate(zip(txt_tokens, cfg.text_dims)):
        tokens = batch * L
        if text_arrives_as != 4:
            terms.append(Term(f"text[{i}] as fp32", tokens * d * 4))
        terms.extend([Term(f"text[{i}] RMSNorm x*rstd", tokens * d * nx.rms_weighted),
                      Term(f"text[{i}] projection input", tokens * d * nx.matmul)])
    terms.append(Term("conditioning vectors (t, pooled, SiLU)", batch * (2 * 256 + 8 * cfg.width) * 4))
    return terms


def head_terms(cfg: ModelConfig, *, batch: int, img_tokens: int, nx: Numerics) -> list[Term]:
    """What the forward keeps after the blocks: the final layer and the loss (freed first in the backward)."""
    D, C, p = cfg.width, cfg.in_channels, cfg.patch_size
    n_img = batch * img_tokens
    return [
        Term("final norm input", n_img * D * nx.ln_in),
        Term("final norm output", n_img * D * nx.ln_out),
        Term("final norm mean, rstd", n_img * 2 * nx.ln_out),
        Term("final linear input (modulated)", n_img * D * nx.matmul),
        Term("v_pred and v_target (fp32, the MSE)", 2 * n_img * C * p * p * 4),
    ]


def boundary_bytes(cfg: ModelConfig, *, batch: int, img_tokens: int, txt_tokens: int, nx: Numerics) -> float:
    """With activation checkpointing a block keeps only its inputs (img, txt; the shared vec, rope and mask
    are per-forward constants); its activations come back in the backward pass, one block at a time."""
    return batch * (img_tokens + txt_tokens) * cfg.width * nx.matmul


def backward_terms(cfg: ModelConfig, *, batch: int, img_tokens: int, txt_tokens: int, nx: Numerics) -> list[Term]:
    """What a block's backward allocates beyond what it frees, at its worst moment (the MLP's backward).

    Each kept hidden-wide tensor is freed once its op's backward has run, but SwiGLU's product backward
    holds the incoming hidden gradient and the gradients of both factors while only the product has been
    freed (+2 hidden-wide tensors); GELU's holds two gradients with its output freed (+1). The incoming
    residual-stream gradients (img and txt) are alive throughout, and a weight's gradient exists on its own
    (bf16 under autocast, then fp32) before it is added into `.grad`."""
    D = cfg.width
    M, kept = _mlp_hidden(cfg)
    n_img, n = batch * img_tokens, batch * (img_tokens + txt_tokens)
    return [Term("MLP backward (hidden-wide gradients)", (kept // 2) * n_img * M * nx.matmul),
            Term("residual-stream gradients", n * D * nx.matmul),
            Term("an MLP weight's gradient before accumulation", D * M * (4 + (2 if nx.weight_copies else 0)))]


def forward_work_terms(cfg: ModelConfig, *, batch: int, img_tokens: int, txt_tokens: int, nx: Numerics,
                       last: bool) -> list[Term]:
    """Under activation checkpointing a block's forward keeps nothing, but its locals are alive until it
    returns; the worst moment is the image MLP: the qkv outputs (held by the q, k, v views), q and k after
    RoPE (fp32: RoPE computes in fp32 and returns its input's dtype, fp32 after the weighted norm), v, the
    attention output, the new image residual, and the MLP's hidden tensors of the moment."""
    D = cfg.width
    M, kept = _mlp_hidden(cfg)
    n_img, n_txt = batch * img_tokens, batch * txt_tokens
    n = n_img + n_txt
    nq = n_img if last else n
    mm = nx.matmul
    return [
        Term("qkv outputs", (n_img * 3 + n_txt * (2 if last else 3)) * D * mm),
        Term("q, k after RoPE", (nq + n) * D * 4),
        Term("v, attention output", (n + nq) * D * mm),
        Term("image residual", n_img * D * mm),
        Term("MLP hidden tensors", (kept - 1) * n_img * M * mm),
    ]


def linear_weight_elements(cfg: ModelConfig) -> tuple[int, int]:
    """(elements of every block's linear weights, elements of every other linear weight): what autocast
    copies to bf16 in one forward. Counted on the meta device."""
    from sd3.model.mmdit import MMDiT

    with torch.device("meta"):
        model = MMDiT(cfg)
    blocks = sum(m.weight.numel() for blocks in (model.mixer, model.blocks) for m in blocks.modules()
                 if isinstance(m, torch.nn.Linear))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return blocks, total - blocks


@dataclass
class Activations:
    """Activation memory of one micro-batch: kept after the forward, and the peak of the step."""

    kept: float
    """Bytes kept for the backward when the forward ends."""
    peak: float
    """Bytes at the worst moment of forward + backward (kept + what the backward allocates)."""
    terms: list[Term] = field(default_factory=list)
    """The largest contributions, for the curious."""


def activation_bytes(cfg: ModelConfig, *, batch: int, img_tokens: int, txt_tokens: tuple[int, ...], nx: Numerics,
                     checkpointing: bool, text_arrives_as: int = 4) -> Activations:
    """The formula: the kept terms of every block, the embedders and the head, bf16 weight copies under
    autocast, and the backward's working set, at the moments where their sum is largest.

    Without checkpointing the peak is the start of the backward: everything the forward kept, less the
    head (freed first), plus the last block's backward working set. With checkpointing the forward keeps
    block inputs only, and the peak is the larger of the forward's last block (every block's bf16 weights
    are cached until autocast exits) and the backward's first recomputed blocks."""
    Lt = sum(txt_tokens)
    kw = dict(batch=batch, img_tokens=img_tokens, txt_tokens=Lt, nx=nx)
    inner = sum(t.bytes for t in block_terms(cfg, last=False, **kw))
    last = sum(t.bytes for t in block_terms(cfg, last=True, **kw))
    # The patch-mixer's blocks: inner blocks, without the text stream when they are image-only.
    mixer_kw = kw if cfg.mixer_joint else {**kw, "txt_tokens": 0}
    mixer_block = sum(t.bytes for t in block_terms(cfg, last=False, image_only=not cfg.mixer_joint, **mixer_kw)
                      ) if cfg.mixer_depth else 0
    embed = sum(t.bytes for t in embedder_terms(cfg, batch=batch, img_tokens=img_tokens, txt_tokens=tuple(txt_tokens),
                                                nx=nx, text_arrives_as=text_arrives_as))
    head = sum(t.bytes for t in head_terms(cfg, batch=batch, img_tokens=img_tokens, nx=nx))
    work = sum(t.bytes for t in backward_terms(cfg, **kw))
    block_w, other_w = linear_weight_elements(cfg) if nx.weight_copies else (0, 0)
    copies, block_copies = 2 * (block_w + other_w), 2 * block_w / (cfg.depth + cfg.mixer_depth)
    if not checkpointing:
        blocks = cfg.mixer_depth * mixer_block + (cfg.depth - 1) * inner + last
        kept = blocks + embed + head + copies
        peak = max(kept, kept - head + work)
        terms = [Term("blocks (all activations)", blocks), Term("embedders, final layer, loss", embed + head),
                 Term("bf16 weight copies", copies), Term("backward working set", peak - kept)]
        return Activations(kept=kept, peak=peak, terms=terms)
    boundary = boundary_bytes(cfg, **kw)
    mixer_boundary = boundary_bytes(cfg, **mixer_kw) if cfg.mixer_depth else 0
    inputs = cfg.depth * boundary + cfg.mixer_depth * mixer_boundary
    kept = inputs + embed + head + 2 * other_w
    # flow_loss's locals (x0 in fp32, the noise x1, xt) live until the forward returns.
    loss_locals = 3 * batch * img_tokens * cfg.in_channels * cfg.patch_size**2 * 4
    forward = (inputs + embed + copies + loss_locals
               + sum(t.bytes for t in forward_work_terms(cfg, last=True, **kw)))
    backward = kept - head + block_copies + work + max(last, inner - boundary if cfg.depth > 1 else 0,
                                                        mixer_block - mixer_boundary)
    peak = max(kept, forward, backward)
    terms = [Term(f"block inputs ({cfg.depth + cfg.mixer_depth} blocks)", inputs),
             Term("embedders, final layer, loss", embed + head), Term("one block recomputed", max(last, inner)),
             Term("backward working set", work)]
    return Activations(kept=kept, peak=peak, terms=terms)


# ---------------------------------------------------------------------------------------------------
# Encoders (loader GPU)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSize:
    """What the loader-GPU estimate needs of one frozen encoder."""

    params: int
    width: int
    """Text: hidden size. Autoencoder: channels of its first (full-resolution) block."""
    mlp: int = 0
    """Text: MLP hidden width."""
    mlp_live: int = 3
    """Text: MLP-hidden-wide tensors alive at once in inference (gated MLPs 3-4, plain 2)."""
    heads: int = 0
    eager_scores: bool = False
    """Text: the attention materialises (rows, heads, L, L) scores (Gemma-2's soft-capped logits)."""
    source: str = "config"
    """'config' (read from a local directory), 'stand-in' (the tiny random encoders) or 'published'."""


# Published sizes of the default encoders (nothing can be downloaded to count them). Each count equals
# the encoder class built from the published config on the meta device (checked in tests/test_memory.py).
KNOWN_ENCODERS: dict[str, EncoderSize] = {
    # google/gemma-2-2b config.json: hidden 2304, MLP 9216 (GeGLU), 26 layers, 8 heads (4 kv) of 256,
    # vocab 256000; eager attention (soft-capped logits). Model card: 2.6B parameters.
    "google/gemma-2-2b": EncoderSize(2_614_341_888, 2304, 9216, 3, 8, True, "published"),
    # answerdotai/ModernBERT-large config.json: hidden 1024, MLP 2624 (GLU: one 2 x 2624 projection),
    # 28 layers, 16 heads, vocab 50368. Model card: 395M parameters.
    "answerdotai/ModernBERT-large": EncoderSize(394_781_696, 1024, 2624, 4, 16, False, "published"),
    # facebook/metaclip-l14-400m config.json, text tower + projection (CLIPTextModelWithProjection):
    # hidden 768, MLP 3072, 12 layers, 12 heads, vocab 49408, 77 positions, projection 768.
    "facebook/metaclip-l14-400m": EncoderSize(123_650_304, 768, 3072, 2, 12, False, "published"),
    # black-forest-labs/FLUX.1-{schnell,dev} vae/config.json: AutoencoderKL, block_out_channels
    # (128, 256, 512, 512), 2 layers per block, 16 latent channels, no quant convs (encoder 34.3M +
    # decoder 49.5M: the loader loads both).
    "black-forest-labs/FLUX.1-schnell": EncoderSize(83_819_683, 128, source="published"),
    "black-forest-labs/FLUX.1-dev": EncoderSize(83_819_683, 128, source="published"),
}

_MLP_LIVE = {"modernbert": 4, "clip_text_model": 2, "clip": 2}   # model_type -> hidden-wide tensors at once
_EAGER = ("gemma2", "gemma3_text")                              # soft-capped attention: eager scores


def _text_size(config, model, source: str) -> EncoderSize:
    text = getattr(config, "text_config", None) or config
    kind = getattr(text, "model_type", "")
    return EncoderSize(
        params=sum(p.numel() for p in model.parameters()), width=int(text.hidden_size),
        mlp=int(getattr(text, "intermediate_size", 4 * text.hidden_size)), mlp_live=_MLP_LIVE.get(kind, 3),
        heads=int(text.num_attention_heads), eager_scores=kind in _EAGER, source=source)


def _count_text(config, *, pooled: bool, source: str) -> EncoderSize:
    """Build the encoder the loader would build from `config`, on the meta device, and measure it."""
    from transformers import AutoModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if pooled:
            text = getattr(config, "text_config", None)
            if text is not None:   # a full CLIP config: the loader takes the text tower + projection
                text.projection_dim = config.projection_dim
                config = text
            model = CLIPTextModelWithProjection(config)
        else:
            model = AutoModel.from_config(config)
    return _text_size(config, model, source)


def _count_vae(kwargs_or_config: dict, source: str) -> EncoderSize:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(kwargs_or_config)
    return EncoderSize(params=sum(p.numel() for p in vae.parameters()),
                       width=int(vae.config.block_out_channels[0]), source=source)


def encoder_sizes(enc: EncoderConfig, model: ModelConfig, *, stand_in_configs=None
                  ) -> dict[str, tuple[str, EncoderSize | None]]:
    """config key -> (what it names, its size or None when unknown). A local directory is read (its
    config only, built on the meta device); missing stand-ins (`encoders.create_tiny`) are counted from
    the configs they would be written with, given `stand_in_configs` (`sd3.encode.stand_ins.stand_in_configs`,
    which only entry scripts and tests import); a hub id comes from `KNOWN_ENCODERS`."""
    entries = [(f"encoders.text[{i}]", s, False) for i, s in enumerate(enc.text)]
    entries.append(("encoders.pooled", enc.pooled, True))
    out: dict[str, tuple[str, EncoderSize | None]] = {}
    stand_ins = None
    for key, source, pooled in entries:
        local = resolve(source)
        if (local / "config.json").is_file():
            from transformers import AutoConfig

            out[key] = (source, _count_text(AutoConfig.from_pretrained(local), pooled=pooled, source="config"))
        elif enc.create_tiny and stand_in_configs is not None:
            stand_ins = stand_ins or stand_in_configs(enc, model)
            out[key] = (source, _count_text(stand_ins[key], pooled=pooled, source="stand-in"))
        else:
            out[key] = (source, KNOWN_ENCODERS.get(source))
    if enc.vae != "pixel":
        local = resolve(enc.vae) / (enc.vae_subfolder or "")
        if (local / "config.json").is_file():
            out["encoders.vae"] = (enc.vae, _count_vae(json.loads((local / "config.json").read_text()), "config"))
        elif enc.create_tiny and stand_in_configs is not None:
            stand_ins = stand_ins or stand_in_configs(enc, model)
            out["encoders.vae"] = (enc.vae, _count_vae(stand_ins["encoders.vae"], "stand-in"))
        else:
            out["encoders.vae"] = (enc.vae, KNOWN_ENCODERS.get(enc.vae))
    return out


def text_activation_bytes(size: EncoderSize, *, rows: int, tokens: int, dtype_bytes: int) -> float:
    """One text encoder's inference forward at its worst layer: the residual stream and its normalised
    copy, the MLP's hidden-wide tensors of the moment and, with eager attention, the (rows, heads, L, L)
    scores (in the weights' dtype, softmax in fp32, probabilities cast back: 2 + 4 + 2 bytes)."""
    per_token = (2 * size.width + size.mlp_live * size.mlp) * dtype_bytes
    scores = rows * size.heads * tokens * tokens * (2 * dtype_bytes + 4) if size.eager_scores else 0
    return rows * tokens * per_token + scores


def vae_encode_bytes(size: EncoderSize, *, images: int, side: int, dtype_bytes: int) -> float:
    """AutoencoderKL encoder in inference at full resolution, where it is widest: a ResNet block holds its
    input (the residual), the normalised and activated copy and the convolution's output, plus the next
    norm's output: 4 tensors of `width` channels at the image's size. The input images (fp32) too."""
    return images * side * side * (4 * size.width * dtype_bytes + 3 * 4)


# ---------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------


@dataclass
class Line:
    label: str
    bytes: float
    note: str = ""


@dataclass
class Estimate:
    model_title: str
    model: list[Line]
    loader_title: str
    loader: list[Line]
    notes: list[str]
    model_total: float
    """Configured activation checkpointing, with the allowance."""
    loader_total: float
    colocated: float
    """World size 1 (one GPU loads and trains, batch_size rows): model + loader tensors, no allowance."""


def _allowance(tensors: float) -> float:
    return CONTEXT_GIB * GIB + FRAGMENTATION * tensors


def _fits(total: float) -> str:
    return (f"fits an 80 GB GPU ({GPU_GIB:.1f} GiB)" if total <= GPU_GIB * GIB
            else f"does NOT fit an 80 GB GPU ({GPU_GIB:.1f} GiB)")


def models_per_loader(cfg: Config) -> int:
    if cfg.ranks.loader_to_model:
        return max(len(v) for v in cfg.ranks.loader_to_model.values())
    return cfg.ranks.models_per_loader


def model_rank_count(cfg: Config) -> int:
    """The model ranks the rank map gives: those of `ranks.loader_to_model`, else one node's."""
    if cfg.ranks.loader_to_model:
        return sum(len(v) for v in cfg.ranks.loader_to_model.values())
    return cfg.ranks.loaders_per_node * cfg.ranks.models_per_loader


def shard_count(cfg: Config, parallel: str, model_ranks: int) -> int:
    """Over how many model ranks each tensor of the training state is split under `parallel`."""
    if parallel == "fsdp":
        return model_ranks
    if parallel == "hsdp":
        return cfg.train.hsdp_shard_size or min(model_ranks, model_rank_count(cfg))
    return 1


def can_shard(parallel: str, shards: int, model_ranks: int) -> bool:
    """Whether `parallel` can split `model_ranks` model ranks into shard groups of `shards` (what
    `sd3.dist.parallel.shard_groups` requires of a launched run): ddp always; fsdp and hsdp over groups of
    at least 2 that divide the model ranks, hsdp into at least 2 groups."""
    if parallel == "ddp":
        return model_ranks >= 1
    return model_ranks >= 2 and shards >= 2 and model_ranks % shards == 0 and \
        not (parallel == "hsdp" and shards == model_ranks)


def _state_lines(cfg: Config, parallel: str, shards: int, *, n_params: int, weights: float, root: float,
                 largest_block: float) -> list[Line]:
    """The training state on one model rank: everything split `shards` ways, plus, when sharded, the
    weights gathered for compute and the gradients before their reduce-scatter."""
    t = cfg.train
    part = "" if shards == 1 else f", 1/{shards} of it"
    ema_on_gpu = t.ema_device != "cpu"
    lines = [
        Line(f"weights (fp32 master, {n_params:,} parameters{part})", weights / shards),
        Line(f"gradients (fp32{part})", weights / shards),
        Line(f"AdamW moments (2 x fp32{part})", 2 * weights / shards),
        Line("EMA (fp32" + (f", on the model GPU{part})" if ema_on_gpu else "; train.ema_device=cpu: host memory)"),
             weights / shards if ema_on_gpu else 0.0),
    ]
    if shards == 1:
        lines.append(Line("EMA model for sample grids and in-training evaluation (fp32, every model rank)"
                          if cfg.log.eval_every else "sample-grid model (fp32; first model rank only)", weights))
    else:
        lines.append(Line(f"sample-grid and evaluation model (the EMA in shards like the weights, while in use"
                          f"{part})", weights / shards))
    if shards > 1:
        compute = 0.5 if t.precision == "bf16" else 1.0      # bf16 gathers half the bytes of the fp32 shards
        blocks = 2 if t.reshard_after_forward else cfg.model.depth + cfg.model.mixer_depth
        held = "2 blocks (computing + prefetched)" if t.reshard_after_forward else \
            "every block (train.reshard_after_forward=false)"
        lines.append(Line(f"gathered weights for compute ({held} + embedders and final layer, "
                          f"{'bf16' if compute == 0.5 else 'fp32'})", compute * (blocks * largest_block + root)))
        lines.append(Line("whole gradients of 2 blocks before their reduce-scatter (fp32)", 2 * largest_block))
    return lines


def estimate(cfg: Config, *, stand_in_configs=None, model_ranks: int | None = None) -> Estimate:
    """Per-GPU peak memory of `cfg` on CUDA (the configured precision and checkpointing, both shown), at
    `model_ranks` model ranks (default: `model_rank_count`); the training state is shown for the
    configured `train.parallel`, and the totals for every mode."""
    from sd3.model.mmdit import MMDiT

    m, t, d, e = cfg.model, cfg.train, cfg.data, cfg.encoders
    n_model = model_ranks or model_rank_count(cfg)
    with torch.device("meta"):
        meta = MMDiT(m)
    params = list(meta.parameters())
    n_params = sum(p.numel() for p in params)
    weights = float(sum(p.numel() * p.element_size() for p in params))     # fp32 master weights

    def nbytes(module) -> float:
        return float(sum(p.numel() * p.element_size() for p in module.parameters()))

    block_bytes = [nbytes(b) for b in (*meta.mixer, *meta.blocks)]
    sizes = dict(n_params=n_params, weights=weights, root=weights - sum(block_bytes),
                 largest_block=max(block_bytes))
    side = m.max_res // cfg.latent_factor                                   # latent side
    img_tokens = (side // m.patch_size) ** 2
    txt_tokens = tuple(e.max_tokens for _ in m.text_dims)
    enc_bytes = getattr(torch, e.dtype).itemsize
    nx = numerics(t.precision, "cuda")
    B = d.batch_size
    acts = {ckpt: activation_bytes(m, batch=B, img_tokens=img_tokens, txt_tokens=txt_tokens, nx=nx,
                                   checkpointing=ckpt, text_arrives_as=enc_bytes)
            for ckpt in (True, False)}
    batch_bytes = B * (m.in_channels * side * side + sum(L * w for L, w in zip(txt_tokens, m.text_dims))
                       + m.pooled_dim) * enc_bytes
    in_flight = (d.prefetch + 1) * batch_bytes
    shared = [Line(f"batches in flight ({d.prefetch} + 1 of {B} samples)", in_flight)]
    state = _state_lines(cfg, t.parallel, shard_count(cfg, t.parallel, n_model), **sizes) + shared
    state_b = sum(x.bytes for x in state)
    model_lines = list(state)
    totals = {}
    for ckpt in (True, False):
        mark = " (configured)" if ckpt == t.activation_checkpointing else ""
        model_lines.append(Line(f"activations, checkpointing {'on' if ckpt else 'off'}{mark}", acts[ckpt].peak))
        totals[ckpt] = state_b + acts[ckpt].peak
    configured = t.activation_checkpointing
    model_lines.append(Line(f"allowance (CUDA context {CONTEXT_GIB:.1f} GiB + {FRAGMENTATION:.0%} fragmentation)",
                            _allowance(totals[configured])))
    for ckpt in (configured, not configured):
        total = totals[ckpt] + _allowance(totals[ckpt])
        mark = " (configured)" if ckpt == configured else ""
        model_lines.append(Line(f"total, checkpointing {'on' if ckpt else 'off'}{mark}", total, _fits(total)))
    model_total = totals[configured] + _allowance(totals[configured])
    for parallel in ("ddp", "fsdp", "hsdp"):
        shards = shard_count(cfg, parallel, n_model)
        if not can_shard(parallel, shards, n_model):
            continue      # a shape that cannot shard (train.py refuses it)
        mode_state = sum(x.bytes for x in _state_lines(cfg, parallel, shards, **sizes) + shared)
        mode_total = mode_state + acts[configured].peak
        mode_total += _allowance(mode_total)
        how = {"ddp": "whole model on every rank", "fsdp": f"sharded over all {n_model}",
               "hsdp": f"sharded over {shards}, {n_model // shards} copies"}[parallel]
        mark = " (configured)" if parallel == t.parallel else ""
        model_lines.append(Line(f"total with train.parallel={parallel}{mark} at {n_model} model ranks ({how})",
                                mode_total, _fits(mode_total)))

    loader_lines, published, unknown = _loader(cfg, models_per_loader(cfg), stand_in_configs, txt_tokens=txt_tokens,
                                               batch_bytes=batch_bytes, sends=True)
    loader_tensors = sum(x.bytes for x in loader_lines)
    loader_total = loader_tensors + _allowance(loader_tensors)
    loader_lines.append(Line(f"allowance (CUDA context {CONTEXT_GIB:.1f} GiB + {FRAGMENTATION:.0%} fragmentation)",
                             _allowance(loader_tensors)))
    loader_lines.append(Line("total", loader_total, _fits(loader_total)))
    # World size 1: the same process encodes batch_size rows and trains on them; nothing is sent.
    colocated_loader = _loader(cfg, 1, stand_in_configs, txt_tokens=txt_tokens, batch_bytes=batch_bytes,
                               sends=False)[0]
    whole_state = sum(x.bytes for x in _state_lines(cfg, "ddp", 1, **sizes) + shared)   # one rank: no sharding
    colocated = whole_state + acts[configured].peak + sum(x.bytes for x in colocated_loader)

    feeds = models_per_loader(cfg)
    model_title = (f"model GPU: micro-batch {B} at the largest bucket ({m.max_res}x{m.max_res} px = {img_tokens} "
                   f"image tokens) + {' + '.join(map(str, txt_tokens))} text tokens, {nx.name}, "
                   f"train.parallel={t.parallel} at {n_model} model ranks")
    loader_title = (f"loader GPU: {B * feeds} captions and images per step ({B} x {feeds} model ranks), "
                    f"encoders in {e.dtype}")
    notes = []
    if t.parallel != "ddp":
        notes.append(f"a checkpoint save gathers whole tensors (weights, EMA, both moments: {4 * weights / GIB:.1f} "
                     "GiB) into the first model rank's host memory, one tensor at a time through its GPU")
    if published:
        notes.append("* parameter count from published configs (constants in sd3/train/memory.py), not read from "
                     "the model")
    if unknown:
        notes.append("unknown hub ids, not counted (point the config at a local directory to count them): "
                     + ", ".join(unknown))
    return Estimate(model_title=model_title, model=model_lines, loader_title=loader_title, loader=loader_lines,
                    notes=notes, model_total=model_total, loader_total=loader_total, colocated=colocated)


def _loader(cfg: Config, feeds: int, stand_in_configs, *, txt_tokens: tuple[int, ...], batch_bytes: float,
            sends: bool) -> tuple[list[Line], list[str], list[str]]:
    """Loader-GPU lines for a loader feeding `feeds` model ranks; also the encoders counted from published
    constants and the unknown ones."""
    from sd3.dist.loader import vae_chunk

    e, d, side = cfg.encoders, cfg.data, cfg.model.max_res
    rows = d.batch_size * feeds
    enc_bytes = getattr(torch, e.dtype).itemsize
    lines: list[Line] = []
    published, unknown = [], []
    text_acts = 0.0
    sizes = encoder_sizes(e, cfg.model, stand_in_configs=stand_in_configs)
    # Tokens each encoder sees: the text streams' cap, CLIP's 77 positions for the pooled one.
    tokens = {f"encoders.text[{i}]": L for i, L in enumerate(txt_tokens)} | {"encoders.pooled": min(77, e.max_tokens)}
    for key, (name, size) in sizes.items():
        if size is None:
            unknown.append(f"{key}={name}")
            continue
        star = {"published": "*", "stand-in": " of the stand-in"}.get(size.source, "")
        if size.source == "published":
            published.append(name)
        kind = "autoencoder" if key == "encoders.vae" else "text encoder"
        lines.append(Line(f"{kind} {name} ({size.params:,} params{star}, {e.dtype})", size.params * enc_bytes))
        if key == "encoders.vae":
            chunk = min(vae_chunk(side, side), rows)
            lines.append(Line(f"autoencoder encode ({chunk} images of {side}x{side} per chunk)",
                              vae_encode_bytes(size, images=chunk, side=side, dtype_bytes=enc_bytes)))
        else:   # the encoders run one after another: the largest one's working set counts
            text_acts = max(text_acts, text_activation_bytes(size, rows=rows, tokens=tokens[key],
                                                             dtype_bytes=enc_bytes))
    if e.vae == "pixel":
        lines.append(Line("pixel autoencoder (no weights)", 0.0))
    lines.append(Line(f"text encoders' activations ({rows} captions x {max(txt_tokens)} tokens, largest encoder)",
                      text_acts))
    ahead = max(d.prefetch, d.decode_workers)
    images = rows * 3 * side * side
    lines.append(Line(f"decoded images ({ahead} batches ahead, uint8) and one batch in fp32",
                      ahead * images + images * 4))
    if sends:
        lines.append(Line(f"encoded batches in flight ({d.prefetch} x {feeds} sends + the one encoding)",
                          (d.prefetch + 1) * feeds * batch_bytes))
    return lines, published, unknown


def format_report(est: Estimate) -> str:
    """The estimate as a compact table: one line per item, GiB."""
    colocated = Line("world size 1 (one GPU loads and trains; no allowance)", est.colocated)
    width = max(len(x.label) for x in [*est.model, *est.loader, colocated]) + 2
    out = ["memory estimate per GPU, GiB (eager mode: torch.compile keeps less)"]

    def row(x: Line) -> str:
        return f"  {x.label:<{width}}{x.bytes / GIB:9.3f}" + (f"  {x.note}" if x.note else "")

    out += [est.model_title, *map(row, est.model), est.loader_title, *map(row, est.loader), row(colocated)]
    return "\n".join(out + est.notes)
