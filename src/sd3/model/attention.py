"""The one attention call site: flash-attn or xformers when installed (CUDA), else PyTorch SDPA.

    attn = JointAttention.build(backend, img_len=L_img, txt_masks=masks, batch=B, dtype=..., device=...)
    txt = attn.arrange(txt)               # flash only: each sample's real text tokens first
    out = attention(q, k, v, attn=attn)   # q (B, H, Lq, Dh), k and v (B, H, L, Dh) -> (B, Lq, H Dh)

Every backend masks keys the same way, over the joint [image; text] sequence: padding and dropped text
streams are never attended to. Queries at masked positions still get an output (over real keys, or
over other masked keys on the flash path) that the caller ignores; image keys are always real, so no
query of interest ever sees an empty key set.

What the GPU kernels require, and how each path meets it without a host sync or a data-dependent
shape (so the step never waits on the GPU and compiles as one graph):

- q, k and v share one dtype. The caller casts q and k (which leave QK-norm and RoPE in fp32) to v's
  dtype, the autocast dtype under autocast, as flux's QKNorm does.
- `flash` (`flash_attn_varlen_func`): fp16/bf16, packed (tokens, H, Dh) with a contiguous last
  dimension, int32 `cu_seqlens`, head width a multiple of 8 and at most 256. Varlen kernels want each
  sequence's tokens contiguous, but packing only the real tokens (`nonzero`) has a data-dependent size.
  Instead `arrange` moves each caption's real tokens in front of its padding (a stable sort of the
  mask: text is not rotated, so its order carries no meaning), and every sample becomes two
  sequences, real then padding: `cu_seqlens` = cumsum([n_0, L - n_0, n_1, L - n_1, ...]), computed on
  the device from static shapes. Padding attends only to padding; its outputs are ignored.
- `xformers` (`memory_efficient_attention`): BMHK layout with a contiguous last dimension; an additive
  key bias given as a tensor of shape (B, H, Lq, L) in the query's dtype, whose strides are multiples
  of 16 bytes. The bias is built once per forward as (B, 1, 1, L rounded up to 8), 0 or -inf, and
  expanded (stride 0) to each call's shape: no copy, no host sync. (Its block-diagonal masks need the
  sequence lengths as Python ints, i.e. a sync per forward, and the backward pass does not support
  the padded-keys variant.)
- `sdpa`: a boolean key mask (B, 1, 1, L), broadcast over heads and queries.

Softmax accumulates in fp32 on every path: flash-attn and xformers do internally, and PyTorch's SDPA
kernels do too (its math fallback upcasts half types unless `allow_fp16_bf16_reduction_math_sdp` is
set, which we never do).

The backend is resolved once per forward (`resolve_backend`), not per block. The real kernels run on
CUDA only; tests put pure-PyTorch stand-ins that enforce the kernels' contracts on the CPU through
`use_kernels` (tests/kernel_stand_ins.py), which leaves the CUDA-only check of the real kernels intact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sd3.config.schema import ATTN_BACKENDS

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kernel:
    """An attention kernel of an optional package and the device types it can run on."""

    fn: Callable
    devices: tuple[str, ...] = ("cuda",)


def _installed_kernels() -> dict[str, Kernel]:
    kernels = {}
    try:  # optional accelerators (requirements-gpu.txt); absent on CPU machines
        from flash_attn import flash_attn_varlen_func

        kernels["flash"] = Kernel(flash_attn_varlen_func)
    except ImportError:  # pragma: no cover - depends on the install
        pass
    try:
        import xformers.ops as xops

        kernels["xformers"] = Kernel(xops.memory_efficient_attention)
    except ImportError:  # pragma: no cover - depends on the install
        pass
    return kernels


KERNELS: dict[str, Kernel] = _installed_kernels()
"""Installed kernels by backend name: the real ones always declare CUDA only."""


@contextlib.contextmanager
def use_kernels(**kernels: Kernel) -> Iterator[None]:
    """Tests only: run with these kernels in place of the installed ones (e.g. CPU stand-ins that
    enforce the real kernels' contracts), restoring the installed ones afterwards."""
    saved = dict(KERNELS)
    KERNELS.update(kernels)
    try:
        yield
    finally:
        KERNELS.clear()
        KERNELS.update(saved)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend for activations of `dtype` on `device`; an explicit choice that cannot run is an error.

    `auto` takes flash-attn, then xformers, for half-precision activations on a device the kernel
    supports, else SDPA."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"model.attn_backend={name!r} is not one of {ATTN_BACKENDS}")
    half = dtype in HALF
    if name == "auto":
        for candidate in ("flash", "xformers"):
            kernel = KERNELS.get(candidate)
            if kernel is not None and half and device.type in kernel.devices:
                return candidate
        return "sdpa"
    if name == "sdpa":
        return name
    package = {"flash": "flash-attn", "xformers": "xformers"}[name]
    kernel = KERNELS.get(name)
    if kernel is None or device.type not in kernel.devices:
        raise RuntimeError(
            f"model.attn_backend={name!r} needs {package} installed (requirements-gpu.txt) and CUDA "
            f"(this run: {'not installed' if kernel is None else device.type}); use --model.attn_backend=sdpa or auto"
        )
    if name == "flash" and not half:
        raise RuntimeError(
            f"model.attn_backend='flash' needs bf16/fp16 activations, got {dtype}: train with "
            "--train.precision=bf16, or use --model.attn_backend=sdpa or auto"
        )
    return name


@dataclass
class JointAttention:
    """How one forward attends, prepared once and shared by every block: the backend and the key mask
    in the form that backend takes."""

    backend: str
    keep: Tensor | None
    """(B, L) bool, True = real token; None when every token is real."""
    order: Tensor | None = None
    """flash: (B, L_txt) the text permutation that puts each sample's real tokens first."""
    lengths: Tensor | None = None
    """flash: (B,) int32 real tokens per sample (image and text)."""
    bias: Tensor | None = None
    """xformers: (B, 1, 1, L) additive key bias, 0 or -inf, sliced from a 16-byte aligned buffer."""

    @classmethod
    def build(cls, backend: str, *, img_len: int, txt_masks: list[Tensor], batch: int, dtype: torch.dtype,
              device: torch.device) -> JointAttention:
        """`txt_masks`: one (B, L_i) bool mask per text stream, in the order the streams are joined."""
        if not txt_masks:
            return cls(backend, None)
        txt_keep = torch.cat(txt_masks, dim=1)                                           # (B, L_txt)
        order = lengths = bias = None
        if backend == "flash":
            order = torch.argsort((~txt_keep).to(torch.uint8), dim=1, stable=True)      # real tokens first
            txt_keep = txt_keep.gather(1, order)
            lengths = (img_len + txt_keep.sum(dim=1)).to(torch.int32)                    # (B,)
        img_keep = torch.ones(batch, img_len, dtype=torch.bool, device=device)
        keep = torch.cat([img_keep, txt_keep], dim=1)                                    # (B, L)
        if backend == "xformers":
            L = keep.shape[1]
            aligned = torch.zeros(batch, 1, 1, -(-L // 8) * 8, dtype=dtype, device=device)
            bias = aligned[..., :L].masked_fill_(~keep[:, None, None, :], float("-inf"))  # (B, 1, 1, L)
        return cls(backend, keep, order=order, lengths=lengths, bias=bias)

    def arrange(self, txt: Tensor) -> Tensor:
        """Text tokens (B, L_txt, D) in the order this backend attends them (the flash path moves each
        sample's real tokens first; every other path keeps the order)."""
        if self.order is None:
            return txt
        return txt.gather(1, self.order[..., None].expand(-1, -1, txt.shape[-1]))


def attention(q: Tensor, k: Tensor, v: Tensor, *, attn: JointAttention) -> Tensor:
    """Softmax attention over the joint sequence.

    q (B, H, Lq, Dh), k and v (B, H, L, Dh), all of one dtype -> (B, Lq, H Dh). Queries are either every
    token (Lq = L) or the leading image tokens only (Lq < L; always real)."""
    B, H, Lq, Dh = q.shape
    L = k.shape[2]
    if attn.backend == "sdpa":
        mask = None if attn.keep is None else attn.keep[:, None, None, :]               # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                    # (B, H, Lq, Dh)
        return out.transpose(1, 2).reshape(B, Lq, H * Dh)
    kernel = KERNELS[attn.backend].fn
    if attn.backend == "xformers":
        bias = None if attn.bias is None else attn.bias.expand(B, H, Lq, L)
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)  # (B, Lq, H, Dh)
        return out.reshape(B, Lq, H * Dh)
    if attn.backend == "flash":
        pairs = attn.lengths is not None  # two sequences per sample: real tokens, then padding
        cu_k = _cu_seqlens(attn.lengths, L, batch=B, device=q.device, pairs=pairs)
        cu_q = cu_k if Lq == L else _cu_seqlens(None, Lq, batch=B, device=q.device, pairs=pairs)
        q, k, v = (x.transpose(1, 2).reshape(-1, H, Dh) for x in (q, k, v))             # (B L_s, H, Dh)
        out = kernel(q, k, v, cu_q, cu_k, Lq, L)                                         # (B Lq, H, Dh)
        return out.reshape(B, Lq, H * Dh)
    raise ValueError(f"unknown attention backend {attn.backend!r}")


def _cu_seqlens(real: Tensor | None, length: int, *, batch: int, device: torch.device, pairs: bool) -> Tensor:
    """int32 sequence starts of a padded (B, length) layout for the varlen kernel. Without `pairs`, each
    sample is one sequence. With `pairs`, each sample is two: its `real[b]` real tokens (all `length`
    when `real` is None), then its padding, `length - real[b]` tokens (possibly none)."""
    if not pairs:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    if real is None:
        real = torch.full((batch,), length, dtype=torch.int32, device=device)
    seqlens = torch.stack([real, length - real], dim=1).flatten()                   # (2B,)
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
