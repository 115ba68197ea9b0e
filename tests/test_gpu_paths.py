"""The contracts the GPU path relies on, checked on the CPU.

bf16 runs under CPU autocast (whose dtype rules match CUDA's for what matters here); flash-attn and
xformers are replaced by stand-ins that reject what the real kernels reject (tests/kernel_stand_ins.py);
"no host sync" is checked by compiling with fullgraph=True (a sync is a graph break) and by a dispatch
mode that records every op that makes a CUDA host wait (`.item()`, `bool()`, `nonzero`, ...).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_stand_ins import (
    KernelContractError,
    flash_attn_varlen_func,
    memory_efficient_attention,
    stand_ins,
)
from model_helpers import perturbed
from torch.utils._python_dispatch import TorchDispatchMode

import sd3.model.mmdit as mmdit
from sd3.model.attention import JointAttention, attention, resolve_backend, use_kernels
from sd3.model.mmdit import MMDiT

BACKENDS = ["sdpa", "flash", "xformers"]


def inputs(cfg, *, B=3, h=8, w=12, lengths=(5, 7), real=None, seed=0) -> dict:
    """Model inputs; `real[i][b]` real tokens of stream i in sample b (right-padded), all by default."""
    g = torch.Generator().manual_seed(seed)
    text = tuple(torch.randn(B, n, d, generator=g) for n, d in zip(lengths, cfg.text_dims))
    if real is None:
        real = [[n] * B for n in lengths]
    masks = tuple(torch.arange(n)[None, :] < torch.tensor(r)[:, None] for n, r in zip(lengths, real))
    return dict(xt=torch.randn(B, cfg.in_channels, h, w, generator=g), t=torch.rand(B, generator=g),
                text=text, text_mask=masks, pooled=torch.randn(B, cfg.pooled_dim, generator=g))


@pytest.fixture
def cfg(small_model_cfg):
    return dataclasses.replace(small_model_cfg, width=64, num_heads=4)  # head width 16: a multiple of 8


def with_backend(model: MMDiT, backend: str) -> MMDiT:
    model.cfg = dataclasses.replace(model.cfg, attn_backend=backend)
    return model


# --- one dtype at the attention entry point ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_sees_one_dtype_under_bf16_autocast(cfg, backend, monkeypatch):
    """Under autocast, QK-norm and RoPE compute in fp32 while v leaves its Linear in bf16: q and k must be
    cast back, or xformers and flash-attn reject the first forward (mixed dtypes)."""
    seen = []

    def recording(q, k, v, *, attn):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, attn=attn)

    monkeypatch.setattr(mmdit, "attention", recording)
    model = with_backend(perturbed(cfg), backend)
    with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16):
        model(**inputs(cfg))
    assert seen == [(torch.bfloat16,) * 3] * cfg.depth, [f"block {i}: q={q} k={k} v={v}" for i, (q, k, v) in
                                                         enumerate(seen)]


def test_backend_is_resolved_once_per_forward(cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(mmdit, "resolve_backend", lambda *a: calls.append(a) or resolve_backend(*a))
    perturbed(cfg)(**inputs(cfg))
    assert len(calls) == 1


def test_auto_takes_the_kernels_only_for_half_precision_on_their_devices():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"  # the real kernels declare CUDA only
    with use_kernels(**stand_ins()):
        assert resolve_backend("auto", cpu, torch.bfloat16) == "flash"
        assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
        assert resolve_backend("xformers", cpu, torch.float32) == "xformers"
        with pytest.raises(RuntimeError, match="bf16/fp16 activations"):
            resolve_backend("flash", cpu, torch.float32)
    with pytest.raises(RuntimeError, match="needs flash-attn installed"):
        resolve_backend("flash", cpu, torch.bfloat16)


# --- the kernel paths equal SDPA -----------------------------------------------------------------------


CAPTIONS = {
    "full": None,
    "padded": [[5, 2, 1], [7, 3, 6]],
    "dropped": [[5, 0, 2], [7, 0, 0]],  # sample 1 has no text at all; sample 2 keeps one stream
}


@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("captions", list(CAPTIONS))
@pytest.mark.parametrize("size", [(8, 8), (6, 12)])
def test_kernel_paths_equal_sdpa_forward_and_backward(cfg, backend, captions, size):
    """The model on the flash and xformers paths (stand-in kernels, bf16 autocast) equals the SDPA path
    within bf16 tolerance, for its output and every parameter's gradient."""
    x = inputs(cfg, h=size[0], w=size[1], real=CAPTIONS[captions])
    results = {}
    for name in ("sdpa", backend):
        model = with_backend(perturbed(cfg), name)
        with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16):
            out = model(**x)
        out.float().square().mean().backward()
        results[name] = (out.float(), {n: p.grad for n, p in model.named_parameters()})
    (ref, ref_grads), (out, grads) = results["sdpa"], results[backend]
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert (g - ref_grads[name]).abs().max() / scale < 0.1, name


# --- the stand-ins reject what the kernels reject --------------------------------------------------------


def flash_args(total=10, H=2, Dh=16, dtype=torch.bfloat16):
    q, k, v = (torch.randn(total, H, Dh, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, 4, total], dtype=torch.int32)
    return [q, k, v, cu, cu.clone(), 6, 6]


@pytest.mark.parametrize("break_it, message", [
    (lambda a: a.__setitem__(1, a[1].float()), "same dtype"),
    (lambda a: [a.__setitem__(i, a[i].float()) for i in range(3)], "fp16 and bf16"),
    (lambda a: a.__setitem__(0, a[0][None]), "packed"),
    (lambda a: a.__setitem__(0, torch.randn(10, 16, 2, dtype=torch.bfloat16).transpose(1, 2)), "contiguous last"),
    (lambda a: a.__setitem__(3, a[3].long()), "int32"),
    (lambda a: a.__setitem__(4, torch.tensor([0, 10], dtype=torch.int32)), "batch_size \\+ 1"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 4, 9], dtype=torch.int32)), "packs 10 tokens"),
    (lambda a: a.__setitem__(5, 3), "max_seqlen_q=3"),
])
def test_flash_stand_in_rejects_what_flash_attn_rejects(break_it, message):
    args = flash_args()
    flash_attn_varlen_func(*args)  # the unbroken call is accepted
    break_it(args)
    with pytest.raises(KernelContractError, match=message):
        flash_attn_varlen_func(*args)


@pytest.mark.parametrize("Dh, message", [(12, "multiple of 8"), (264, "at most 256")])
def test_flash_stand_in_rejects_head_widths(Dh, message):
    with pytest.raises(KernelContractError, match=message):
        flash_attn_varlen_func(*flash_args(Dh=Dh))


def xformers_args(B=2, Mq=5, Mkv=7, H=2, K=16, dtype=torch.bfloat16):
    q = torch.randn(B, Mq, H, K, dtype=dtype)
    k, v = (torch.randn(B, Mkv, H, K, dtype=dtype) for _ in range(2))
    bias = torch.zeros(B, 1, 1, 8, dtype=dtype)[..., :Mkv].expand(B, H, Mq, Mkv)
    return [q, k, v, bias]


@pytest.mark.parametrize("break_it, message", [
    (lambda a: a.__setitem__(2, a[2].float()), "same dtype"),
    (lambda a: a.__setitem__(0, a[0].flatten(2)), "BMHK"),
    (lambda a: a.__setitem__(1, a[1][:1]), "Incompatible shapes"),
    (lambda a: a.__setitem__(0, torch.randn(2, 5, 16, 2, dtype=torch.bfloat16).transpose(2, 3)), "stride"),
    (lambda a: a.__setitem__(3, a[3].float()), "must match the query"),
    (lambda a: a.__setitem__(3, torch.zeros(2, 1, 1, 7, dtype=torch.bfloat16).expand(2, 2, 5, 7)), "stride\\(-2\\)"),
    (lambda a: a.__setitem__(3, a[3][:, :1]), "Invalid shape for attention bias"),
])
def test_xformers_stand_in_rejects_what_xformers_rejects(break_it, message):
    args = xformers_args()
    memory_efficient_attention(*args[:3], attn_bias=args[3])
    break_it(args)
    with pytest.raises(KernelContractError, match=message):
        memory_efficient_attention(*args[:3], attn_bias=args[3])


def test_stand_ins_compute_attention():
    """Against a per-sequence loop: the stand-ins are references, not just validators."""
    q, k, v, cu, _, _, _ = flash_args(dtype=torch.float16)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 6, 6).float()
    for a, b in ((0, 4), (4, 10)):
        qs, ks, vs = q[a:b].float(), k[a:b].float(), v[a:b].float()
        w = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) / qs.shape[-1] ** 0.5, dim=-1)
        torch.testing.assert_close(out[a:b], torch.einsum("hqk,khd->qhd", w, vs), rtol=1e-2, atol=1e-2)
    q, k, v, _ = xformers_args(dtype=torch.float32)
    bias = torch.zeros(2, 1, 1, 8)[..., :7]
    bias[1, ..., 5:] = float("-inf")
    out = memory_efficient_attention(q, k, v, attn_bias=bias.expand(2, 2, 5, 7))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=bias).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_flash_plan_packs_real_tokens_first():
    masks = [torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool), torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)]
    plan = JointAttention.build("flash", img_len=4, txt_masks=masks, batch=2, dtype=torch.bfloat16,
                                device=torch.device("cpu"))
    assert plan.order.tolist() == [[0, 3, 4, 1, 2], [0, 1, 2, 3, 4]]
    assert plan.lengths.tolist() == [7, 7] and plan.lengths.dtype == torch.int32
    assert plan.keep[0].tolist() == [True] * 7 + [False] * 2


# --- no host syncs ---------------------------------------------------------------------------------------


class HostSyncs(TorchDispatchMode):
    """Records every op that makes the host wait for a CUDA device: reading a value (`.item()`,
    `bool()`, `int()`, `.tolist()`) and ops whose output size depends on values (`nonzero`, boolean
    indexing, `masked_select`, `unique`)."""

    WAITS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2", "equal"})

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        # `.tolist()` reads values without dispatching an op: watch it directly.
        def tolist(tensor, *args, **kwargs):
            self.ops.append("tolist")
            return self._tolist(tensor, *args, **kwargs)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in self.WAITS or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sync", [lambda x: bool(x.sum() > 0), lambda x: x[x > 0], lambda x: x.tolist(),
                                  lambda x: x.nonzero(), lambda x: float(x.max())])
def test_host_sync_detector_sees_syncs(sync):
    with HostSyncs() as syncs:
        sync(torch.randn(4))
    assert syncs.ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_have_no_host_sync(cfg, backend):
    model = with_backend(perturbed(cfg), backend)
    x = inputs(cfg, real=CAPTIONS["dropped"])
    with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16), HostSyncs() as syncs:
        model(**x).float().square().mean().backward()
    assert syncs.ops == []


# --- the training step -------------------------------------------------------------------------------


def step_setup(cfg, *, accumulation=2, precision="bf16"):
    from sd3.config import preset
    from sd3.dist.batch import Batch
    from sd3.train.optim import build_optimizer

    run = preset("tiny")
    run.model = dataclasses.replace(cfg, in_channels=4)
    run.train.accumulation_steps, run.train.precision = accumulation, precision
    run.flow.p_drop_text = (0.3, 0.3)
    model = perturbed(run.model)
    optimizer = build_optimizer(model, run.train)
    g = torch.Generator().manual_seed(0)

    def batch(step):
        x = inputs(run.model, B=4, real=[[5, 2, 0, 4], [7, 3, 6, 0]], seed=step)
        return Batch(latents=torch.randn(4, 4, 8, 8, generator=g), text=x["text"], text_mask=x["text_mask"],
                     pooled=x["pooled"], step=step, rows=torch.arange(4))

    return run, model, optimizer, batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_has_no_host_sync(cfg, backend):
    """A whole optimizer step (two micro-batches, clipping, the skip decision, AdamW) never waits for
    the device: the loss, gradient norm and skip flag stay on it."""
    from sd3.train.trainer import train_step

    run, model, optimizer, batch = step_setup(dataclasses.replace(cfg, attn_backend=backend))
    batches = iter([batch(0), batch(1)])
    with use_kernels(**stand_ins()), HostSyncs() as syncs:
        result = train_step(model, optimizer, batches, step=0, cfg=run, rank_index=0, device=torch.device("cpu"))
    assert syncs.ops == []
    assert torch.isfinite(result.loss) and not result.skipped


def test_a_non_finite_gradient_skips_the_update_on_the_device(cfg):
    from sd3.train.trainer import train_step

    run, model, optimizer, batch = step_setup(cfg, accumulation=1, precision="fp32")
    train_step(model, optimizer, iter([batch(0)]), step=0, cfg=run, rank_index=0, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    poisoned = batch(1)
    poisoned.latents[0, 0, 0, 0] = float("nan")
    result = train_step(model, optimizer, iter([poisoned]), step=1, cfg=run, rank_index=0,
                        device=torch.device("cpu"))
    assert bool(result.skipped)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    after = optimizer.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in state.items())   # moments and step count untouched
    result = train_step(model, optimizer, iter([batch(2)]), step=2, cfg=run, rank_index=0,
                        device=torch.device("cpu"))
    assert not bool(result.skipped) and int(optimizer.state[next(model.parameters())]["step"]) == 2


# --- compile --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_compile_as_one_graph(cfg, backend):
    """`fullgraph=True` turns any graph break (a host sync, a data-dependent shape, an untraceable call)
    into an error. The graph check is dynamo's, whatever compiles the graph after it: AOT autograd
    without code generation (`aot_eager`) traces the backward too, at a fraction of inductor's compile
    time; inductor itself is exercised by the compiled training run in test_train.py."""
    torch._dynamo.reset()
    model = with_backend(perturbed(dataclasses.replace(cfg, depth=2)), backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = inputs(cfg, real=CAPTIONS["dropped"])
    with use_kernels(**stand_ins()), torch.autocast("cpu", torch.bfloat16):
        out = compiled(**x)
        ref = model(**x)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), ref.float())


def test_checkpoint_keys_do_not_depend_on_wrappers(cfg):
    """What the trainer saves (the plain model's state_dict) has the same keys with activation
    checkpointing, compile and DDP applied as without: any checkpoint loads into any setup."""
    from torch.nn.parallel import DistributedDataParallel

    from sd3.config import TrainConfig
    from sd3.dist.parallel import parallelize

    plain = set(MMDiT(cfg).state_dict())
    model = MMDiT(cfg)
    wrapped = parallelize(model, TrainConfig(activation_checkpointing=True, compile=True), group=None,
                          device=torch.device("cpu"))
    assert wrapped is model and set(model.state_dict()) == plain
    assert all(type(b).__name__ == "CheckpointWrapper" and b._compiled_call_impl is not None for b in model.blocks)
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert set(ddp.module.state_dict()) == plain
    finally:
        torch.distributed.destroy_process_group()
