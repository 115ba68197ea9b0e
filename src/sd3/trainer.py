"""Model ranks: the training step and the loop around it.

`train_step` is one optimizer step over `accumulation_steps` micro-batches; it is the same function
at world size 1 (batches encoded in-process) and under torchrun (batches received from a loader,
model wrapped in DDP over the model ranks). `run_trainer` adds what a run needs around it: resume,
EMA, logging averaged over model ranks, sample grids, validation, checkpoints and a clean stop.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from sd3.batch import Batch
from sd3.checkpoint import CheckpointWriter, load_train_state, load_weights
from sd3.config import Config, FlowConfig, to_dict
from sd3.ema import EMA
from sd3.flow import Cond, dropout_keep, flow_loss, shift_for, shift_t, step_generator
from sd3.inference import generate_latents, make_grid, to_pil
from sd3.metrics import Logger, TimeBins, format_line, mfu, print0
from sd3.model.mmdit import MMDiT, train_flops_per_sample
from sd3.optim import build_optimizer, lr_at, set_lr
from sd3.parallel import parallelize
from sd3.runtime import Runtime, StopSignal
from sd3.transport import PROMPTS, VALIDATION

PREEMPTED = "PREEMPTED"  # marker the SLURM script reads: the run stopped early and wants a requeue


# ---------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: Tensor
    """Mean loss over the micro-batches (this rank), detached."""
    per_sample: Tensor
    t: Tensor
    grad_norm: Tensor
    lr: float
    samples: int
    flops: float
    finite: bool
    """False when the gradient was not finite and the update was skipped."""


def autocast_for(cfg: Config, device: torch.device):
    enabled = device.type == "cuda" and cfg.train.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def cond_of(batch: Batch) -> Cond:
    return Cond(text=batch.text, text_mask=batch.text_mask, pooled=batch.pooled)


def train_step(model, optimizer, batches, *, step: int, cfg: Config, rank_index: int,
               device: torch.device) -> StepResult:
    """Optimizer step `step` (0-based) over the next `accumulation_steps` batches of `batches`.

    Gradients are synchronised only on the last micro-batch (DDP's no_sync before it). Every random
    draw comes from a generator of (seed, batch.step, rank), so the step is reproducible."""
    n = cfg.train.accumulation_steps
    losses, per_sample, ts = [], [], []
    samples, flops = 0, 0.0
    for i, batch in enumerate(itertools.islice(batches, n)):
        batch = batch.to(device, non_blocking=True)
        last = i == n - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        generator = step_generator(cfg.train.seed, batch.step, rank_index, device)
        keep = dropout_keep(cfg.flow, seed=cfg.train.seed, step=batch.step, rank=rank_index, batch_size=batch.size)
        with sync:
            with autocast_for(cfg, device):
                out = flow_loss(model, x0=batch.latents, cond=cond_of(batch), cfg=cfg.flow,
                                patch_size=cfg.model.patch_size, generator=generator, keep=keep)
            (out.loss / n).backward()
        losses.append(out.loss.detach())
        per_sample.append(out.per_sample)
        ts.append(out.t)
        samples += batch.size
        p = cfg.model.patch_size
        img_tokens = (batch.latents.shape[-2] // p) * (batch.latents.shape[-1] // p)
        flops += batch.size * train_flops_per_sample(cfg.model, img_tokens, tuple(x.shape[1] for x in batch.text))
    if len(losses) < n:
        raise RuntimeError(f"the data ended inside optimizer step {step} ({len(losses)} of {n} micro-batches)")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    # A non-finite gradient (the same on every rank after the all-reduce) skips the update instead of
    # poisoning the weights and the optimizer state (MicroDiT's NaN catcher does the same).
    finite = bool(torch.isfinite(grad_norm))
    lr = lr_at(step, cfg.train)
    if finite:
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=torch.stack(losses).mean(), per_sample=torch.cat(per_sample), t=torch.cat(ts),
                      grad_norm=grad_norm.detach(), lr=lr, samples=samples, flops=flops, finite=finite)


# ---------------------------------------------------------------------------------------------------
# Agreeing to stop
# ---------------------------------------------------------------------------------------------------


class StopVote:
    """Model ranks stop after the same step. Each step's local request is all-reduced (MAX) without
    blocking and read one step later, so no rank waits for it and a signal that reaches the ranks at
    different moments still stops them together."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self._pending: tuple | None = None

    def __call__(self, requested: bool) -> bool:
        if self.group is None:
            return requested
        decided = self.close()
        flag = torch.tensor([int(requested)], device=self.device)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return decided

    def close(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())


# ---------------------------------------------------------------------------------------------------
# Validation and samples (first model rank)
# ---------------------------------------------------------------------------------------------------


def validation_times(cfg: FlowConfig, img_tokens: int, n: int = 8) -> Tensor:
    """The n quantiles (i + 1/2) / n of the training t distribution (stratified fixed-t evaluation,
    as MLPerf's text-to-image benchmark and torchtitan's FLUX validation do)."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if cfg.t_sampling == "logit_normal":
        t = torch.sigmoid(cfg.t_mean + cfg.t_std * math.sqrt(2) * torch.erfinv(2 * q - 1))
    else:
        t = q
    return shift_t(t, shift_for(cfg, img_tokens)).float()


@torch.no_grad()
def validation_loss(model: MMDiT, batches: list[Batch], cfg: Config, device: torch.device) -> dict[str, float]:
    """Mean loss at fixed t quantiles with fixed noise: comparable from step to step."""
    was_training = model.training
    model.eval()
    per_q = None
    count = 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        p = cfg.model.patch_size
        ts = validation_times(cfg.flow, (batch.latents.shape[-2] // p) * (batch.latents.shape[-1] // p))
        g = step_generator(cfg.train.seed, i, 0, "cpu")
        x1 = torch.randn(batch.latents.shape, generator=g).to(device)
        losses = []
        for t in ts:
            with autocast_for(cfg, device):
                out = flow_loss(model, x0=batch.latents, cond=cond_of(batch), cfg=cfg.flow, patch_size=p,
                                generator=None, t=torch.full((batch.size,), float(t), device=device), x1=x1)
            losses.append(out.per_sample.sum())
        per_q = torch.stack(losses) if per_q is None else per_q + torch.stack(losses)
        count += batch.size
    model.train(was_training)
    per_q = (per_q / count).cpu()
    out = {"val/loss": float(per_q.mean())}
    out.update({f"val/loss_t{float(t):.2f}": float(v) for t, v in zip(ts, per_q)})
    return out


def sample_grid(model: MMDiT, prompts: Batch, ae, cfg: Config, path: Path) -> Path:
    """Sample every prompt at max_res x max_res with the configured sampler settings; save a grid."""
    cond = cond_of(prompts.to(next(model.parameters()).device))
    latents = generate_latents(model, cond=cond, uncond=None, width=cfg.model.max_res, height=cfg.model.max_res,
                               latent_factor=ae.factor, steps=cfg.log.sample_steps, cfg=cfg.log.sample_cfg,
                               sampler="euler", seed=cfg.train.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(to_pil(ae.decode(latents))).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# The model-rank loop
# ---------------------------------------------------------------------------------------------------


def build_model(cfg: Config, device: torch.device, *, resume: Path | None, init_from: Path | None):
    """The model (identical on every model rank: same seed, then DDP broadcasts), EMA and optimizer,
    restored from `resume` (everything) or `init_from` (weights and EMA only)."""
    torch.manual_seed(cfg.train.seed)
    model = MMDiT(cfg.model).to(device)
    ema_device = "cpu" if cfg.train.ema_device == "cpu" else device
    source = resume or init_from
    if source is not None:
        load_weights(source, model, ema=False)
    ema = EMA(model, decay=cfg.train.ema_decay, every=cfg.train.ema_every, device=ema_device)
    if source is not None:
        ema.load_state_dict(load_file(source / "ema.safetensors"))
    optimizer = build_optimizer(model, cfg.train)
    state = {}
    if resume is not None:
        state = load_train_state(resume)
        optimizer.load_state_dict(state["optimizer"])
    return model, ema, optimizer, state


def run_trainer(cfg: Config, rt: Runtime, stop: StopSignal, source, *, start_step: int,
                resume: Path | None = None, init_from: Path | None = None, autoencoder=None) -> dict:
    """Train from `start_step` to `cfg.train.steps` (or a stop signal). Returns the final metrics.

    `autoencoder()` gives the autoencoder that decodes sample grids (first model rank, on first use)."""
    device, total, run_dir = rt.device, cfg.train.steps, Path(cfg.run_dir)
    model, ema, optimizer, state = build_model(cfg, device, resume=resume, init_from=init_from)
    if resume is not None and state["step"] != start_step:
        raise RuntimeError(f"{resume} holds step {state['step']}, but the run was told to start at {start_step}")
    train_model = parallelize(model, cfg.train, group=rt.model_group, device=device)
    rank_index = rt.ranks.model_index(rt.rank)
    n_model = len(rt.ranks.model_ranks)

    logging = rt.is_logging
    writer = CheckpointWriter(run_dir, cfg.log.keep_last) if logging else None
    logger = Logger(cfg.log, run_dir=run_dir, config=to_dict(cfg), run_id=state.get("wandb_id"), enabled=logging,
                    start_step=start_step,
                    images_per_step=cfg.data.batch_size * n_model * cfg.train.accumulation_steps)
    extras = source.startup((PROMPTS, VALIDATION)) if logging else {}
    prompts = extras.get(PROMPTS, [])
    val_batches = extras.get(VALIDATION, [])
    ema_model = ae = None

    def grid(step: int) -> Path:
        nonlocal ema_model, ae
        if ema_model is None:
            ema_model, ae = MMDiT(cfg.model).to(device).eval(), autoencoder()
        ema.copy_to(ema_model)
        return sample_grid(ema_model, prompts[0], ae, cfg, run_dir / "samples" / f"step_{step:08d}.png")

    def save(step: int, blocking: bool = False) -> Path:
        train_state = {"step": step, "optimizer": optimizer.state_dict(), "wandb_id": logger.run_id or "",
                       "rng": torch.get_rng_state(), "skipped": skipped}
        return writer.save(step, model=model, ema_state=ema.state_dict(), cfg=cfg, train_state=train_state,
                           blocking=blocking)

    print0(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {n_model} model rank(s), "
           f"steps {start_step} -> {total}, {cfg.data.batch_size} x {n_model} x {cfg.train.accumulation_steps} "
           f"samples per optimizer step")
    vote = StopVote(rt.model_group, device)
    bins = TimeBins(device=device)
    skipped = int(state.get("skipped", 0))
    # Accumulated between log steps; the loss stays on the device (no host sync per step).
    window = torch.zeros(5, dtype=torch.float64)  # loss sum (filled at log time), steps, samples, flops, wait
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    last_log, last_wait, last_bytes, last_enc = time.perf_counter(), source.wait_s, source.bytes, source.encode_s
    last_batches = source.batches
    metrics: dict = {}
    last_saved = None
    step = start_step
    batches = iter(source)
    bar = tqdm(total=total, initial=start_step, desc="train", disable=not logging, dynamic_ncols=True)
    stopped_early = False
    while step < total:
        result = train_step(train_model, optimizer, batches, step=step, cfg=cfg, rank_index=rank_index, device=device)
        step += 1
        ema.update(step)
        skipped += not result.finite
        loss_sum += result.loss
        window += torch.tensor([0.0, 1, result.samples, result.flops, 0.0], dtype=torch.float64)
        bins.add(result.t, result.per_sample)

        if step % cfg.log.every == 0 or step == total:
            now = time.perf_counter()
            window[4] = source.wait_s - last_wait
            extra = torch.tensor([source.bytes - last_bytes, source.encode_s - last_enc,
                                  source.batches - last_batches], dtype=torch.float64)
            local = torch.cat([window.to(device), bins.state(), extra.to(device)])
            local[0] = loss_sum
            if rt.model_group is not None:
                dist.all_reduce(local, group=rt.model_group)
            local = local.cpu()
            elapsed = now - last_log
            total_loss, steps, samples, flops, wait = local[:5].tolist()
            nbytes, enc_s, n_batches = local[-3:].tolist()
            metrics = {
                "loss": total_loss / steps, "lr": result.lr, "grad_norm": float(result.grad_norm),
                "images_per_s": samples / elapsed, "mfu": mfu(flops / elapsed, cfg.log.peak_tflops, n_model),
                "data_wait": wait / (elapsed * n_model), "skipped_steps": skipped,
                "loader_encode_ms": 1e3 * enc_s / max(n_batches, 1),
                "wire_mb_per_step": nbytes / 1e6 / max(steps / n_model, 1),
                "corrupt_rows": float(source.stats.get("corrupt", 0)),  # so far, by this rank's loader
                **bins.summary(local[5 : 5 + 2 * bins.bins]),
            }
            if logging:
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
                tqdm.write(format_line(step, total, metrics))
            window.zero_()
            loss_sum.zero_()
            bins.reset()
            last_log, last_wait, last_bytes, last_enc = now, source.wait_s, source.bytes, source.encode_s
            last_batches = source.batches
        bar.update(1)

        if logging and cfg.log.val_every and val_batches and step % cfg.log.val_every == 0:
            metrics.update(validation_loss(model, val_batches, cfg, device))
            logger.log(step, {k: v for k, v in metrics.items() if k.startswith("val/")})
            tqdm.write(f"step {step}: validation loss {metrics['val/loss']:.4f}")
        if logging and cfg.log.sample_every and prompts and step % cfg.log.sample_every == 0:
            path = grid(step)
            logger.image(step, "samples", path, caption=" | ".join(cfg.log.sample_prompts))
        if logging and step % cfg.log.save_every == 0:
            last_saved = save(step)
        if vote(stop.requested) and step < total:
            stopped_early = True
            print0(f"stopping at step {step} on {stop.received or 'a signal on another rank'}")
            break
    vote.close()
    bar.close()

    if logging:
        if last_saved is None or not last_saved.name.endswith(f"{step:08d}"):
            last_saved = save(step, blocking=True)
        writer.wait()
        marker = run_dir / PREEMPTED
        if stopped_early:
            marker.write_text(f"stopped at step {step} of {total} on {stop.received or 'a peer signal'}\n")
        if not stopped_early and prompts:
            metrics["sample_grid"] = str(grid(step))
        metrics["checkpoint"] = str(last_saved)
        logger.finish()
    metrics["step"] = step
    metrics["stopped_early"] = stopped_early
    return metrics
