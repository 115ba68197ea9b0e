"""The MMDiT of SD3 (Esser et al. 2024, arXiv 2403.03206), with the seed's changes and our fixes.

Reads top-down: helpers, embedders, the joint block, the final layer, the model, then sizes (the
parameter and FLOP counts). Shapes use one vocabulary: B batch, L_img image tokens, L_txt text
tokens (all streams), L = L_img + L_txt, D width, H heads, Dh head width, C latent channels, p patch.

Patch masking (MicroDiT's deferred masking, Sehwag et al. 2024, arXiv 2407.15811): `model.mixer_depth`
patch-mixer blocks see every image token, then the main blocks see only the image tokens the caller keeps
(`kept_tokens`, drawn by the trainer: the model draws nothing), each at its own RoPE2d position; text is never
dropped. Without `kept_tokens` (inference, validation, the unmasked finetune) every token goes through.

The model knows nothing of devices, parallelism, checkpointing or compilation: `sd3.dist.parallel`
applies those from outside.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sd3.config import ModelConfig
from sd3.model.attention import JointAttention, attention, resolve_backend
from sd3.model.rope import apply_rope, rope_frequencies

# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, h, w) -> (B, (h/p)(w/p), C p p), tokens in row-major grid order."""
    B, C, h, w = x.shape
    x = x.reshape(B, C, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (h // p) * (w // p), C * p * p)


def unpatchify(x: Tensor, grid_h: int, grid_w: int, p: int) -> Tensor:
    """(B, L_img, C p p) -> (B, C, h, w); the inverse of `patchify`."""
    B, _, cpp = x.shape
    C = cpp // (p * p)
    x = x.reshape(B, grid_h, grid_w, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, grid_h * p, grid_w * p)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, E) at per-sample token indices (B, L_kept) -> (B, L_kept, E): a gather of static shape (no
    boolean indexing, whose size depends on values and makes the host wait for the device)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, L, D) normalised outside; shift, scale (B, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated(x: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """Gated residual x + gate * update; gate (B, D)."""
    return torch.addcmul(x, gate.unsqueeze(1), update)


def joint_rms_norm(parts: list[Tensor], norms: list[nn.RMSNorm]) -> Tensor:
    """Per-stream RMSNorm of streams (B, H, L_s, Dh), returned concatenated along the sequence.

    Normalises the joint tensor once and then applies each stream's own weight: the same result as one
    RMSNorm per stream, in half the kernels (the concatenation is needed for the joint attention anyway)."""
    x = torch.cat(parts, dim=2)                                                             # (B, H, L, Dh)
    weight = torch.cat([n.weight.expand(p.shape[2], -1) for p, n in zip(parts, norms)])    # (L, Dh)
    return F.rms_norm(x, (x.shape[-1],), eps=norms[0].eps) * weight


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on for this device type, else the weights'."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else param_dtype


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in fp32 (DiT, Peebles & Xie 2023)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------


def learnable_scalar(value: float) -> nn.Parameter:
    """A learnable scalar, stored as a 1-element tensor: a 0-d parameter cannot be sharded (FSDP2)."""
    return nn.Parameter(torch.full((1,), float(value)))


def _scalars_from_0d(module, state_dict, prefix, *_) -> None:
    """Load a 0-d tensor saved under a learnable scalar's name (a checkpoint that stores scalars 0-d)
    into its 1-element parameter."""
    for name, p in module.named_parameters(recurse=False):
        saved = state_dict.get(prefix + name)
        if saved is not None and saved.ndim == 0 and p.shape == (1,):
            state_dict[prefix + name] = saved.reshape(1)


class TextEmbedder(nn.Module):
    """One text stream: RMSNorm -> learnable scalar -> projection to the model width.

    Each encoder gets its own norm because their statistics differ wildly (Gemma's activations reach
    the hundreds); the scalar starts small so text enters the residual stream gently."""

    def __init__(self, in_dim: int, width: int, scale_init: float):
        super().__init__()
        self.norm = nn.RMSNorm(in_dim, eps=1e-6)
        self.scale = learnable_scalar(scale_init)
        self.proj = nn.Linear(in_dim, width)
        self.register_load_state_dict_pre_hook(_scalars_from_0d)

    def forward(self, x: Tensor) -> Tensor:
        # The scalar folds into the norm's weight: one pass over the (wide) token states instead of two. The
        # norm runs in fp32 whatever the encoder's dtype (bf16 states, Gemma's in the hundreds).
        x = F.rms_norm(x.float(), (x.shape[-1],), self.norm.weight * self.scale, self.norm.eps)
        return self.proj(x)                                                      # (B, L_i, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] times a learnable scale (init 1000, the usual DDPM range) -> sinusoid -> MLP."""

    freq_dim = 256

    def __init__(self, width: int, time_scale_init: float):
        super().__init__()
        self.time_scale = learnable_scalar(time_scale_init)
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.register_load_state_dict_pre_hook(_scalars_from_0d)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t * self.time_scale, self.freq_dim))  # (B, D)


class PooledEmbedder(nn.Module):
    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.mlp(pooled.float())  # (B, D)


# ---------------------------------------------------------------------------------------------------
# The joint block
# ---------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Shazeer 2020 (arXiv 2002.05202). Gate and value are separate projections: fusing them into one
    matmul costs a concatenation of their gradients in the backward pass that outweighs the gain."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(width, hidden)
        self.w_value = nn.Linear(width, hidden)
        self.w_out = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_value(x))


class GeluMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(width, hidden)
        self.w_out = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


def make_mlp(kind: str, width: int, ratio: float) -> nn.Module:
    hidden = int(width * ratio)
    return SwiGLU(width, hidden) if kind == "swiglu" else GeluMLP(width, hidden)


class Modulation(nn.Linear):
    """adaLN-Zero: the conditioning vector (B, D) -> `n` named (shift, scale, gate) sets, each (B, D).

    `gated=False` makes (shift, scale) sets, for a stream whose residual update is never taken (the last
    block's text). Zero-initialised by the model, so a fresh block is the identity."""

    def __init__(self, width: int, n: int, *, gated: bool = True):
        super().__init__(width, n * (3 if gated else 2) * width)
        self.n, self.gated = n, gated

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        per = 3 if self.gated else 2
        chunks = super().forward(vec).chunk(self.n * per, dim=-1)
        return [ModulationOut(*chunks[i * per : (i + 1) * per]) for i in range(self.n)]


class ModulationOut(NamedTuple):
    shift: Tensor
    scale: Tensor
    gate: Tensor | None = None

    def apply(self, x: Tensor) -> Tensor:
        """adaLN: x (B, L, D), normalised outside."""
        return modulate(x, self.shift, self.scale)


class StreamAttention(nn.Module):
    """One stream's half of the joint attention: fused projections, per-head QK-RMSNorm, output projection.

    `queries=False` makes a keys-and-values-only stream (the last block's text: nothing reads its output)."""

    def __init__(self, width: int, heads: int, *, queries: bool = True):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.queries = queries
        self.qkv = nn.Linear(width, (3 if queries else 2) * width)
        # QK-norm keeps attention logits bounded in bf16 (SD3 sec. 5.3.1).
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if queries else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width) if queries else None

    def heads_of(self, x: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """(B, L_s, D) -> q (or None), k, v, each (B, H, L_s, Dh), before QK-norm (the block applies it
        to both streams at once)."""
        parts = self.qkv(x).unflatten(-1, (-1, self.heads, x.shape[-1] // self.heads)).permute(2, 0, 3, 1, 4)
        return (None, *parts) if not self.queries else tuple(parts)


class JointBlock(nn.Module):
    """Dual-stream block: image and text keep their own weights and share one softmax attention.

    Per stream: adaLN-Zero modulation from the conditioning vector (shift, scale, gate for attention
    and MLP). The last block only lets text act as keys and values: its text output would be
    discarded, so it has no text queries, output projection, MLP or gates (less work, and unused
    parameters would break DDP)."""

    def __init__(self, cfg: ModelConfig, *, last: bool):
        super().__init__()
        D = cfg.width
        self.last = last
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # shared: no parameters
        self.img_mod = Modulation(D, 2)
        self.img_attn = StreamAttention(D, cfg.num_heads)
        self.img_mlp = make_mlp(cfg.mlp_type, D, cfg.mlp_ratio)
        self.txt_mod = Modulation(D, 1, gated=False) if last else Modulation(D, 2)
        self.txt_attn = StreamAttention(D, cfg.num_heads, queries=not last)
        self.txt_mlp = None if last else make_mlp(cfg.mlp_type, D, cfg.mlp_ratio)

    def forward(
        self, *, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, attn: JointAttention
    ) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, *txt_mod2 = self.txt_mod(vec)  # the last block: attention modulation only

        # Prepare image, prepare text, one joint attention (queries: image, then text unless last).
        img_q, img_k, img_v = self.img_attn.heads_of(img_mod1.apply(self.norm(img)))
        txt_q, txt_k, txt_v = self.txt_attn.heads_of(txt_mod1.apply(self.norm(txt)))
        q, k, v = self.joint_qkv(img_q, txt_q, img_k, txt_k, img_v, txt_v, pe)
        out = attention(q, k, v, attn=attn)                                    # (B, L_img or L, D)

        # Split, then two residual updates per stream.
        img = self.update(img, out[:, : img.shape[1]], self.img_attn.proj, img_mod1, self.img_mlp, img_mod2)
        if self.last:
            return img, txt
        txt = self.update(txt, out[:, img.shape[1] :], self.txt_attn.proj, txt_mod1, self.txt_mlp, txt_mod2[0])
        return img, txt

    def joint_qkv(self, img_q, txt_q, img_k, txt_k, img_v, txt_v, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """QK-norm and RoPE over the joint sequence; q, k and v leave in one dtype, v's (the autocast
        dtype under autocast), since the norms and rotations compute in fp32 (flux's QKNorm does the same).
        `pe`: rotations (L, Dh/2) shared by the batch, or (B, 1, L, Dh/2) per sample (masked training)."""
        v = torch.cat([img_v, txt_v], dim=2)                                              # (B, H, L, Dh)
        k = apply_rope(joint_rms_norm([img_k, txt_k], [self.img_attn.k_norm, self.txt_attn.k_norm]), pe)
        if self.last:  # image queries only
            q = apply_rope(joint_rms_norm([img_q], [self.img_attn.q_norm]), pe[..., : img_q.shape[2], :])
        else:
            q = apply_rope(joint_rms_norm([img_q, txt_q], [self.img_attn.q_norm, self.txt_attn.q_norm]), pe)
        return q.to(v.dtype), k.to(v.dtype), v

    def update(self, x: Tensor, attn_out: Tensor, proj: nn.Linear, mod1: ModulationOut, mlp: nn.Module,
               mod2: ModulationOut) -> Tensor:
        """The gated residual updates of one stream: attention output, then the modulated MLP."""
        x = gated(x, mod1.gate, proj(attn_out))
        return gated(x, mod2.gate, mlp(mod2.apply(self.norm(x))))


class ImageBlock(nn.Module):
    """An image-only block: the joint block's image half (adaLN-Zero, QK-norm, RoPE2d, gated attention and
    MLP updates) attending to image tokens only. The patch-mixer's block when `model.mixer_joint` is off; text
    then reaches it only through the pooled vector in the modulation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.width
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mod = Modulation(D, 2)
        self.attn = StreamAttention(D, cfg.num_heads)
        self.mlp = make_mlp(cfg.mlp_type, D, cfg.mlp_ratio)

    def forward(self, *, img: Tensor, vec: Tensor, pe: Tensor, attn: JointAttention) -> Tensor:
        mod1, mod2 = self.mod(vec)
        q, k, v = self.attn.heads_of(mod1.apply(self.norm(img)))                        # (B, H, L_img, Dh)
        q = apply_rope(joint_rms_norm([q], [self.attn.q_norm]), pe)
        k = apply_rope(joint_rms_norm([k], [self.attn.k_norm]), pe)
        out = attention(q.to(v.dtype), k.to(v.dtype), v, attn=attn)                      # (B, L_img, D)
        img = gated(img, mod1.gate, self.attn.proj(out))
        return gated(img, mod2.gate, self.mlp(mod2.apply(self.norm(img))))


# ---------------------------------------------------------------------------------------------------
# Final layer
# ---------------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """Modulated norm -> linear to C p p values per token; zero-initialised so a fresh model predicts 0."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, img: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.mod(vec).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(img), shift, scale))  # (B, L_img, C p p)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """Predicts the rectified-flow velocity v = x1 - x0 of noisy latents xt at time t."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.width, cfg.patch_size, cfg.in_channels
        self.img_in = nn.Linear(C * p * p, D)
        self.txt_in = nn.ModuleList(TextEmbedder(d, D, cfg.text_scale_init) for d in cfg.text_dims)
        self.time_in = TimestepEmbedder(D, cfg.time_scale_init)
        self.pooled_in = PooledEmbedder(cfg.pooled_dim, D)
        # The patch-mixer (registered first: an empty one leaves the initialisation of the rest unchanged).
        self.mixer = nn.ModuleList(JointBlock(cfg, last=False) if cfg.mixer_joint else ImageBlock(cfg)
                                   for _ in range(cfg.mixer_depth))
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final = FinalLayer(D, C * p * p)
        self._rope_cache: dict[tuple, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, zero biases, then adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_in.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_in.mlp[2].weight, std=0.02)
        for block in (*self.mixer, *self.blocks):
            for mod in (block.img_mod, block.txt_mod) if isinstance(block, JointBlock) else (block.mod,):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for layer in (self.final.mod, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def rope_scale(self) -> float:
        return self.cfg.max_res_orig / self.cfg.max_res

    def attn_backend(self, device: torch.device) -> str:
        """The attention backend of this forward, resolved once for every block."""
        return resolve_backend(self.cfg.attn_backend, device, compute_dtype(device, self.img_in.weight.dtype))

    def rope(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        key = (grid_h, grid_w, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_frequencies(
                grid_h, grid_w, self.cfg.width // self.cfg.num_heads,
                theta=self.cfg.rope_theta, scale=self.rope_scale, device=device,
            )
        return self._rope_cache[key]

    def forward(
        self, *, xt: Tensor, t: Tensor, text: tuple[Tensor, ...], text_mask: tuple[Tensor, ...], pooled: Tensor,
        kept_tokens: Tensor | None = None,
    ) -> Tensor:
        """xt (B, C, h, w), t (B,) in [0, 1], text[i] (B, L_i, D_i), text_mask[i] (B, L_i) bool,
        pooled (B, P) -> v_pred (B, C, h, w).

        `kept_tokens` (B, L_kept) int64, training with patch masking only: indices into the row-major image
        grid of the tokens the main blocks see once the patch-mixer has seen them all. The prediction is then
        for those tokens, v_pred (B, L_kept, C p p) in their order (`patchify` the target alike)."""
        p = self.cfg.patch_size
        B, _, h, w = xt.shape
        grid_h, grid_w = h // p, w // p
        img = self.img_in(patchify(xt, p))                                          # (B, L_img, D)
        txt = torch.cat([embed(x) for embed, x in zip(self.txt_in, text)], dim=1)   # (B, L_txt, D)
        # SiLU once here instead of in every block's modulation (same function, one op per forward).
        vec = F.silu(self.time_in(t) + self.pooled_in(pooled))                      # (B, D)
        # Rotations for the joint sequence: the image grid's, then identity for text (not rotated).
        img_pe = self.rope(grid_h, grid_w, xt.device)                               # (L_img, Dh/2)
        pe = F.pad(img_pe, (0, 0, 0, txt.shape[1]), value=1.0)                      # (L, Dh/2)
        plan = dict(txt_masks=[m.bool() for m in text_mask], batch=B, dtype=compute_dtype(xt.device, img.dtype),
                    device=xt.device)
        backend = self.attn_backend(xt.device)
        attn = JointAttention.build(backend, img_len=img.shape[1], **plan)
        txt = attn.arrange(txt)
        for block in self.mixer:  # (the config says which kind: a wrapper from sd3.dist.parallel hides the class)
            if self.cfg.mixer_joint:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn=attn)
            else:
                img = block(img=img, vec=vec, pe=img_pe, attn=JointAttention(backend, None))
        if kept_tokens is not None:
            # Kept tokens keep their grid positions: each sample's rotations are gathered with its tokens.
            img = gather_tokens(img, kept_tokens)                                   # (B, L_kept, D)
            img_pe = torch.view_as_complex(gather_tokens(torch.view_as_real(img_pe).flatten(1).expand(B, -1, -1),
                                                         kept_tokens).unflatten(-1, (-1, 2)))  # (B, L_kept, Dh/2)
            pe = F.pad(img_pe, (0, 0, 0, txt.shape[1]), value=1.0)[:, None]         # (B, 1, L_kept + L_txt, Dh/2)
            attn = JointAttention.build(backend, img_len=img.shape[1], **plan)     # same text order as `arrange`
        for block in self.blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn=attn)
        out = self.final(img, vec)                                                  # (B, L_img or L_kept, C p p)
        return out if kept_tokens is not None else unpatchify(out, grid_h, grid_w, p)  # (B, C, h, w)


# ---------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------


def check_image_size(cfg: ModelConfig, latent_factor: int, width: int, height: int) -> None:
    """A pixel size the model cannot take raises a ValueError that names the nearest valid sizes."""
    multiple = latent_factor * cfg.patch_size
    for name, side in (("width", width), ("height", height)):
        if side <= 0 or side % multiple:
            lower = max(multiple, side // multiple * multiple)
            raise ValueError(
                f"{name}={side} is not a positive multiple of {multiple} (latent factor {latent_factor} x "
                f"patch {cfg.patch_size}); try {lower} or {lower + multiple}"
            )


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, without allocating the weights."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(p.numel() for p in model.parameters())


def train_flops_per_sample(cfg: ModelConfig, img_tokens: int, txt_tokens: tuple[int, ...], *,
                           kept_tokens: int | None = None) -> float:
    """Matmul FLOPs of one training sample (forward + backward, no activation recomputation).

    Counts 2 m n k per matmul, as `torch.utils.flop_counter` does. The backward costs two matmuls per
    forward matmul (input and weight gradients), except where the input needs no gradient: the patch
    embedding and the pooled embedding's first layer (data in) only compute weight gradients. With patch
    masking (`kept_tokens` of the `img_tokens` image tokens reach the main blocks) the patch embedding and the
    patch-mixer work on every image token, the main blocks and the final layer on the kept ones."""
    D, C, p, P = cfg.width, cfg.in_channels, cfg.patch_size, cfg.pooled_dim
    hidden = int(D * cfg.mlp_ratio)
    mlp_mults = 3 if cfg.mlp_type == "swiglu" else 2  # matmuls of D x hidden per token
    L_txt = sum(txt_tokens)
    kept = img_tokens if kept_tokens is None else kept_tokens

    def linear(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * tokens * fan_in * fan_out

    def block(n_img: int, n_txt: int, *, last: bool = False, text: bool = True) -> int:
        """A joint block's forward (`last`: image queries only), or an image-only one (`text=False`)."""
        L, queries = n_img + n_txt, n_img if last else n_img + n_txt
        flops = linear(1, D, 6 * D) + (linear(1, D, (2 if last else 6) * D) if text else 0)  # modulation
        flops += linear(n_img, D, 3 * D) + linear(n_txt, D, (2 if last else 3) * D)         # q, k, v
        flops += 2 * (2 * queries * L * D)                                                  # QK^T and AV
        return flops + linear(queries, D, D) + mlp_mults * linear(queries, D, hidden)

    data_in = linear(img_tokens, C * p * p, D) + linear(1, P, D)  # backward: weight gradient only
    fwd = data_in + linear(1, D, D)                               # pooled MLP's second layer
    fwd += sum(linear(n, d, D) for n, d in zip(txt_tokens, cfg.text_dims))
    fwd += linear(1, TimestepEmbedder.freq_dim, D) + linear(1, D, D)
    joint = cfg.mixer_joint
    fwd += cfg.mixer_depth * block(img_tokens, L_txt if joint else 0, text=joint)  # the patch-mixer: every token
    fwd += sum(block(kept, L_txt, last=i == cfg.depth - 1) for i in range(cfg.depth))
    fwd += linear(1, D, 2 * D) + linear(kept, D, C * p * p)                      # final layer
    return float(3 * fwd - data_in)
