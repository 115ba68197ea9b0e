"""Training-step speed of our MMDiT against diffusers' SD3Transformer2DModel at matched shapes.

    python tests/benchmarks/bench_model_step.py [--repeats 15] [--threads 2] [--no-compile]

Both models: 4 blocks, width 256, 4 heads of 64, batch 4, 256 image tokens (32x32 latents, patch 2),
154 text tokens, pooled 768; forward + backward + AdamW step in fp32 on the CPU. diffusers reads
154 tokens of width 2304; ours reads its two streams at their native widths (77 Gemma tokens of 2304
+ 77 ModernBERT tokens of 1024). Our blocks do more work (SwiGLU's third matrix, QK-norm, two text
streams), so the fair figure is time per FLOP, FLOPs counted by FlopCounterMode for both. Note that
the elementwise work of SwiGLU (silu, the gating product, their gradients) and of QK-norm counts as
time but not as FLOPs.
Runs alternate between the two models and the medians are compared:
`model_step_ratio_vs_diffusers: X` = (ours s/FLOP) / (theirs s/FLOP); below 1 is better. Then the same
with both models compiled (`torch.compile`, inductor, whole model: how a GPU user trains), last line
`model_step_ratio_vs_diffusers_compiled: X`. Both use the trainer's fused AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from sd3.config import ModelConfig
from sd3.model.mmdit import MMDiT, train_flops_per_sample

BATCH, LATENT, TXT, POOLED = 4, 32, 77, 768


def ours():
    cfg = ModelConfig(in_channels=16, patch_size=2, depth=4, width=256, num_heads=4, mlp_type="swiglu",
                      text_dims=(2304, 1024), pooled_dim=POOLED, max_res=256, max_res_orig=256)
    model = MMDiT(cfg)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        xt=torch.randn(BATCH, 16, LATENT, LATENT, generator=g), t=torch.rand(BATCH, generator=g),
        text=(torch.randn(BATCH, TXT, 2304, generator=g), torch.randn(BATCH, TXT, 1024, generator=g)),
        text_mask=(torch.ones(BATCH, TXT, dtype=torch.bool), torch.ones(BATCH, TXT, dtype=torch.bool)),
        pooled=torch.randn(BATCH, POOLED, generator=g),
    )
    return model, (lambda: model(**inputs)), cfg


def theirs():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=2304, caption_projection_dim=256,
        pooled_projection_dim=POOLED, out_channels=16, pos_embed_max_size=LATENT // 2,
    )
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(BATCH, 16, LATENT, LATENT, generator=g),
        encoder_hidden_states=torch.randn(BATCH, 2 * TXT, 2304, generator=g),
        pooled_projections=torch.randn(BATCH, POOLED, generator=g),
        timestep=torch.rand(BATCH, generator=g) * 1000,
    )
    return model, (lambda: model(**inputs, return_dict=False)[0]), None


def make_step(model, forward):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        loss = forward().float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(forward) -> float:
    # Count attention through the math kernel: FlopCounterMode has no formula for the fused CPU one.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward().float().square().mean().backward()
    return float(counter.get_total_flops())


def time_steps(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per step of each model, runs interleaved so drift in the machine hits both alike."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(median: dict[str, float], flops: dict[str, float], models: dict, repeats: int, suffix: str) -> None:
    for name in median:
        print(f"{name}{suffix}: median {median[name] * 1e3:.1f} ms/step over {repeats} runs, "
              f"{flops[name] / median[name] / 1e9:.1f} GFLOP/s, "
              f"{sum(p.numel() for p in models[name][0].parameters()) / 1e6:.2f} M parameters")
    raw = median["ours"] / median["diffusers"]
    per_flop = (median["ours"] / flops["ours"]) / (median["diffusers"] / flops["diffusers"])
    print(f"raw_step_time_ratio_vs_diffusers{suffix}: {raw:.3f}")
    print(f"model_step_ratio_vs_diffusers{suffix}: {per_flop:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {"ours": ours(), "diffusers": theirs()}
    flops, steps = {}, {}
    for name, (model, forward, _) in models.items():
        # Start every zero-initialised gate away from zero so both models do their full work.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        flops[name] = count_flops(forward)
        model.zero_grad(set_to_none=True)
        steps[name] = make_step(model, forward)
        for _ in range(args.warmup):
            steps[name]()
    cfg = models["ours"][2]
    analytic = BATCH * train_flops_per_sample(cfg, (LATENT // 2) ** 2, (TXT, TXT))
    print(f"ours: {flops['ours'] / 1e9:.2f} GFLOP/step counted, {analytic / 1e9:.2f} from our formula "
          f"({analytic / flops['ours'] - 1:+.2%})")
    print(f"diffusers: {flops['diffusers'] / 1e9:.2f} GFLOP/step counted")
    report(time_steps(steps, args.repeats), flops, models, args.repeats, "")
    if args.no_compile:
        return
    compiled = {}
    for name, (model, forward, _) in models.items():
        model.compile()  # in place: forward() now runs the compiled graph
        start = time.perf_counter()
        compiled[name] = make_step(model, forward)
        for _ in range(args.warmup):
            compiled[name]()
        print(f"{name}: compiled (inductor) and warmed up in {time.perf_counter() - start:.0f} s")
    report(time_steps(compiled, args.repeats), flops, models, args.repeats, "_compiled")


if __name__ == "__main__":
    main()
