"""The one attention call site: flash-attn or xformers when importable on CUDA, else PyTorch SDPA.

Every backend masks keys the same way: a key mask `(B, L)` (True = attend) over the joint
[image; text] sequence. Padding and dropped text streams are masked out as keys; queries at masked
positions still get an output (over the real keys) that the caller ignores. Image keys are always
real, so no query ever sees an empty key set.

Softmax accumulates in fp32 on every path: flash-attn and xformers accumulate in fp32 internally,
and PyTorch's SDPA kernels do too (its math fallback upcasts half types unless
`allow_fp16_bf16_reduction_math_sdp` is set, which we never do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional accelerators (requirements-gpu.txt); absent on CPU machines
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None
try:
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the install
    xops = None

BACKENDS = ("auto", "sdpa", "flash", "xformers")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the backend for this device and dtype; an explicit choice that cannot run is an error."""
    if name not in BACKENDS:
        raise ValueError(f"model.attn_backend={name!r} is not one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if on_cuda and half and flash_attn_varlen_func is not None:
            return "flash"
        if on_cuda and xops is not None:
            return "xformers"
        return "sdpa"
    if name == "flash" and (flash_attn_varlen_func is None or not on_cuda or not half):
        raise RuntimeError(
            "model.attn_backend='flash' needs flash-attn installed (requirements-gpu.txt), CUDA and bf16/fp16 "
            "activations; use --model.attn_backend=sdpa or auto"
        )
    if name == "xformers" and (xops is None or not on_cuda):
        raise RuntimeError(
            "model.attn_backend='xformers' needs xformers installed (requirements-gpu.txt) and CUDA; "
            "use --model.attn_backend=sdpa or auto"
        )
    return name


@dataclass
class KeyMask:
    """The joint sequence's key mask, prepared once per forward and shared by every block."""

    keep: Tensor | None
    """(B, L) bool, True = real token; None when every token is real."""
    _packed: tuple[Tensor, Tensor, int] | None = None

    @classmethod
    def build(cls, img_len: int, txt_masks: list[Tensor], batch: int, device: torch.device) -> KeyMask:
        if not txt_masks:
            return cls(None)
        img = torch.ones(batch, img_len, dtype=torch.bool, device=device)
        return cls(torch.cat([img, *txt_masks], dim=1))  # (B, L)

    def sdpa_mask(self) -> Tensor | None:
        return None if self.keep is None else self.keep[:, None, None, :]  # (B, 1, 1, L)

    def packed(self) -> tuple[Tensor, Tensor, int]:
        """(indices of real tokens in the flattened (B*L) sequence, cu_seqlens (B+1,) int32, max len).

        The varlen kernels (flash-attn, xformers block-diagonal) need the real tokens packed; one host
        sync per forward (the nonzero), computed lazily and reused by every block."""
        if self._packed is None:
            keep = self.keep
            lengths = keep.sum(dim=1, dtype=torch.int32)  # (B,)
            indices = keep.flatten().nonzero().flatten()
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            self._packed = (indices, cu, keep.shape[1])  # max_seqlen: the padded length bounds it
        return self._packed


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: KeyMask, backend: str) -> Tensor:
    """Softmax attention over the joint sequence.

    q (B, H, Lq, Dh), k and v (B, H, L, Dh) -> (B, Lq, H*Dh). Queries are either every token (Lq = L)
    or the leading image tokens only (Lq < L; always real, so they need no mask)."""
    B, H, Lq, Dh = q.shape
    L = k.shape[2]
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.sdpa_mask())  # (B, H, Lq, Dh)
        return out.transpose(1, 2).reshape(B, Lq, H * Dh)
    # Varlen kernels take packed (tokens, H, Dh): masked keys are dropped (and cost no FLOPs).
    q, k, v = (x.transpose(1, 2).reshape(-1, H, Dh) for x in (q, k, v))  # (B*L_s, H, Dh)
    if mask.keep is None:
        k_index, cu_k, max_k = None, _dense_cu(B, L, q.device), L
    else:
        k_index, cu_k, max_k = mask.packed()
        k, v = k.index_select(0, k_index), v.index_select(0, k_index)
    q_index, cu_q, max_q = (k_index, cu_k, max_k) if Lq == L else (None, _dense_cu(B, Lq, q.device), Lq)
    if q_index is not None:
        q = q.index_select(0, q_index)
    if backend == "flash":
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)  # (N_q, H, Dh)
    elif backend == "xformers":
        bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(
            q_seqlen=(cu_q[1:] - cu_q[:-1]).tolist(), kv_seqlen=(cu_k[1:] - cu_k[:-1]).tolist()
        )
        out = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    if q_index is not None:  # masked query positions read zeros; the caller ignores them
        out = out.new_zeros(B * Lq, H, Dh).index_copy_(0, q_index, out)
    return out.reshape(B, Lq, H * Dh)


def _dense_cu(batch: int, length: int, device: torch.device) -> Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
