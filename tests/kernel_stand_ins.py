"""Pure-PyTorch stand-ins for the GPU attention kernels, for CPU tests of the paths that call them.

Each computes exactly what its kernel computes and rejects what its kernel rejects, with the kernel's
own words where it has them: so a call that would fail on the first GPU step fails here, in CI.

- `flash_attn_varlen_func` (flash-attn 2.x, `mha_varlen_fwd` in csrc/flash_attn/flash_api.cpp): q, k, v
  packed as (tokens, heads, head_dim), one dtype, fp16 or bf16, contiguous last dimension; int32
  contiguous `cu_seqlens` of equal length on the same device; head_dim <= 256. The public wrapper pads a
  head_dim that is not a multiple of 8 (a silent copy per call): the stand-in refuses it instead, so
  our configs never take that slow path.
- `memory_efficient_attention` (xformers 0.0.35, cutlass op; `Inputs.validate_inputs` and
  `_check_bias_alignment`): BMHK tensors of one dtype (fp16, bf16 or fp32) and matching shapes, last
  dimension contiguous and 16-byte aligned (head_dim and stride(-2) multiples of 8 for half types,
  4 for fp32); a tensor `attn_bias` of exactly (B, H, Mq, Mkv) in the query's dtype with 16-byte
  aligned strides (0 is fine: an expanded bias) and stride(-1) <= 1.

They are written with static shapes only (segment ids from `searchsorted`, a dense mask), so a model
that calls them compiles with `fullgraph=True`; the checks that read tensor values (the content of
`cu_seqlens`) run only in eager mode, where reading them costs nothing that matters in a test.

    from sd3.model.attention import use_kernels
    with use_kernels(**stand_ins()):
        model(...)   # flash and xformers paths on the CPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from sd3.model.attention import Kernel

HALF = (torch.float16, torch.bfloat16)


class KernelContractError(RuntimeError):
    """The call would be rejected by the real kernel."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KernelContractError(message)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False) -> Tensor:
    """Attention within each packed sequence: q (total_q, H, Dh), k and v (total_k, H_k, Dh) -> (total_q, H, Dh)."""
    _require(q.dim() == 3 and k.dim() == 3 and v.dim() == 3,
             f"flash-attn varlen takes packed (tokens, heads, head_dim) tensors, got q {tuple(q.shape)}, "
             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    _require(q.dtype in HALF, f"FlashAttention only support fp16 and bf16 data type (q is {q.dtype})")
    _require(k.dtype == q.dtype, f"query and key must have the same dtype ({q.dtype} vs {k.dtype})")
    _require(v.dtype == q.dtype, f"query and value must have the same dtype ({q.dtype} vs {v.dtype})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require(x.stride(-1) == 1, f"Input tensor must have contiguous last dimension ({name} strides {x.stride()})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _require(cu.dtype == torch.int32, f"{name} must have dtype int32 (got {cu.dtype})")
        _require(cu.dim() == 1 and cu.is_contiguous(), f"{name} must be a contiguous 1-D tensor")
        _require(cu.device == q.device, f"{name} is on {cu.device}, q on {q.device}")
    _require(k.device == q.device and v.device == q.device, "q, k and v must be on one device")
    total_q, H, Dh = q.shape
    total_k, H_k, _ = k.shape
    _require(Dh <= 256, f"FlashAttention forward only supports head dimension at most 256 (got {Dh})")
    _require(Dh % 8 == 0, f"head dimension {Dh} is not a multiple of 8 (the wrapper would pad every call)")
    _require(k.shape == v.shape and k.shape[2] == Dh, f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, "
             f"head_dim {Dh}")
    _require(H % H_k == 0, "Number of heads in key/value must divide number of heads in query")
    _require(cu_seqlens_q.numel() == cu_seqlens_k.numel() >= 2,
             f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) must both be "
             "batch_size + 1 long")
    _require(isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen must be Python ints")
    _require(dropout_p == 0.0 and not causal, "the stand-in covers non-causal attention without dropout")
    if not _compiling():  # reads tensor values: eager only, and unseen by tests that look for host syncs
        _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k)
    seg_q = torch.searchsorted(cu_seqlens_q[1:], torch.arange(total_q, device=q.device, dtype=torch.int32),
                               right=True)
    seg_k = torch.searchsorted(cu_seqlens_k[1:], torch.arange(total_k, device=q.device, dtype=torch.int32),
                               right=True)
    mask = seg_q[:, None] == seg_k[None, :]                                              # (total_q, total_k)
    kf, vf = (x.float()[:, :, None].expand(-1, -1, H // H_k, -1).reshape(total_k, H, Dh) for x in (k, v))
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1),
                                         attn_mask=mask, scale=softmax_scale)           # (H, total_q, Dh)
    out = torch.where(mask.any(dim=1)[None, :, None], out, 0.0)   # a query with no key gets 0, as flash does
    return out.transpose(0, 1).to(q.dtype)


def _check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    with _disable_current_modes():
        for name, cu, total, longest in (("q", cu_q, total_q, max_q), ("k", cu_k, total_k, max_k)):
            values = torch._C.TensorBase.tolist(cu)  # the C method: a sync detector may wrap Tensor.tolist
            lengths = [b - a for a, b in zip(values, values[1:])]
            _require(values[0] == 0 and min(lengths) >= 0, f"cu_seqlens_{name} must start at 0 and never "
                     f"decrease: {values}")
            _require(values[-1] == total, f"cu_seqlens_{name} ends at {values[-1]} but {name} packs {total} tokens")
            _require(max(lengths) <= longest, f"max_seqlen_{name}={longest} is below the longest sequence "
                     f"({max(lengths)})")


def memory_efficient_attention(query: Tensor, key: Tensor, value: Tensor, attn_bias: Tensor | None = None,
                               p: float = 0.0, scale: float | None = None) -> Tensor:
    """BMHK attention with an optional additive tensor bias: (B, Mq, H, K) -> (B, Mq, H, K)."""
    qkv = (query, key, value)
    _require(all(x.dim() == 4 for x in qkv), "the stand-in takes BMHK tensors (B, M, H, K), got "
             f"{[tuple(x.shape) for x in qkv]}")
    _require(all(x.device == query.device for x in qkv), "Query/Key/Value should all be on the same device")
    _require(all(x.dtype == query.dtype for x in qkv), "Query/Key/Value should either all have the same dtype "
             f"(query {query.dtype}, key {key.dtype}, value {value.dtype})")
    _require(query.dtype in (*HALF, torch.float32), f"dtype={query.dtype} (supported: fp16, bf16, fp32)")
    B, Mq, H, K = query.shape
    Mkv = key.shape[1]
    _require(key.shape == (B, Mkv, H, K) and value.shape == (B, Mkv, H, K),
             f"Incompatible shapes for attention inputs: query {tuple(query.shape)}, key {tuple(key.shape)}, "
             f"value {tuple(value.shape)}")
    alignment = 128 // torch.finfo(query.dtype).bits
    for name, x in (("query", query), ("key", key), ("value", value)):
        _require(x.shape[-1] % alignment == 0, f"{name}.shape[-1] % {alignment} != 0")
        _require(x.stride(-2) % alignment == 0, f"{name}.stride(-2) % {alignment} != 0 ({name}.stride() = "
                 f"{x.stride()})")
        _require(x.stride(-1) <= 1, f"{name}.stride(-1) > 1: call .contiguous() on the input")
    _require(p == 0.0, "the stand-in covers attention without dropout")
    mask = None
    if attn_bias is not None:
        _require(isinstance(attn_bias, Tensor), "the stand-in covers tensor biases only")
        _require(tuple(attn_bias.shape) == (B, H, Mq, Mkv), f"Invalid shape for attention bias: "
                 f"{tuple(attn_bias.shape)} (expected {(B, H, Mq, Mkv)})")
        _require(attn_bias.dtype == query.dtype, f"attn_bias dtype {attn_bias.dtype} must match the query's "
                 f"({query.dtype})")
        _require(attn_bias.device == query.device, "attn_bias must be on the query's device")
        bias_alignment = 128 // torch.finfo(attn_bias.dtype).bits
        for d in range(attn_bias.dim() - 1):
            _require(attn_bias.stride(d) % bias_alignment == 0,
                     f"attn_bias.stride(-2) % {bias_alignment} != 0 (attn_bias.stride() = {attn_bias.stride()}); "
                     "slice the bias from a buffer whose last dimension is padded to a multiple of "
                     f"{bias_alignment}")
        _require(attn_bias.stride(-1) <= 1, "attn_bias.stride(-1) > 1: call .contiguous() on the bias")
        mask = attn_bias.float()
    out = F.scaled_dot_product_attention(query.float().transpose(1, 2), key.float().transpose(1, 2),
                                         value.float().transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(query.dtype)                                          # (B, Mq, H, K)


def stand_ins() -> dict[str, Kernel]:
    """Both stand-ins, declared to run on the CPU (and CUDA), for `sd3.model.attention.use_kernels`."""
    return {"flash": Kernel(flash_attn_varlen_func, ("cpu", "cuda")),
            "xformers": Kernel(memory_efficient_attention, ("cpu", "cuda"))}
