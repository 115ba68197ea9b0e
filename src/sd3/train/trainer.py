"""Model ranks: the training step and the run around it.

`train_step` is one optimizer step over `accumulation_steps` micro-batches; it is the same function
at world size 1 (batches encoded in-process) and under torchrun (batches received from a loader,
model wrapped in DDP over the model ranks). `Trainer` is the run around it, read top-down in `fit`:
resume, EMA, metrics reduced over the model ranks, validation, sample grids, checkpoints, the
divergence guard, and a stop every model rank agrees on.

    trainer = Trainer(cfg, rt, source, resume=..., init_from=..., autoencoder=...)
    result = trainer.fit(stop)          # RunResult: the last step, why it stopped, the last metrics
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from sd3.checkpoint.read import (
    CheckpointError,
    is_sharded,
    load_part,
    load_sharded,
    load_train_state,
    load_weights,
)
from sd3.checkpoint.write import CheckpointWriter
from sd3.config import Config, FlowConfig, TrainConfig, to_dict
from sd3.console import log0, print0
from sd3.diffusion.flow import (
    Cond,
    draw_kept_tokens,
    dropout_keep,
    flow_loss,
    mask_ratio_at,
    shift_for,
    shift_t,
    step_generator,
)
from sd3.diffusion.pipeline import generate_latents, make_grid, to_pil
from sd3.dist.batch import Batch
from sd3.dist.parallel import (
    SHARDED,
    apply_fsdp,
    clip_grad_norm_,
    gradient_sync,
    local,
    parallelize,
    reshard,
    shard_like,
)
from sd3.dist.runtime import Runtime, StopSignal
from sd3.dist.sources import BatchSource
from sd3.dist.transport import (
    EVAL,
    PROMPTS,
    VALIDATION,
    TransportError,
    broadcast_batches,
    peer_died,
    peer_error,
)
from sd3.model.mmdit import MMDiT, train_flops_per_sample
from sd3.paths import resolve
from sd3.train.ema import EMA
from sd3.train.metrics import Logger, TimeBins, format_line, mfu
from sd3.train.optim import build_optimizer, lr_at, set_lr

PREEMPTED = "PREEMPTED"
"""Marker in the run directory: the run stopped for a signal, cleanly; the SLURM script requeues it."""
FAILED = "FAILED"
"""Marker in the run directory: the first failure of the run, in one line."""


class Diverged(RuntimeError):
    """Training has gone bad (non-finite or exploding steps, a non-finite validation loss or weights):
    the run stops without writing a checkpoint of the bad stretch."""


class PeerFailed(RuntimeError):
    """Another model rank failed and asked every model rank to stop with it (its own message says why)."""


# ---------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: Tensor
    """Mean loss over the micro-batches (this rank), detached, on the device."""
    per_sample: Tensor
    t: Tensor
    grad_norm: Tensor
    lr: float
    samples: int
    flops: float
    skipped: Tensor
    """() bool on the device: the gradient was not finite and the update was skipped."""
    mask_ratio: float = 0.0
    """The patch-masking ratio this step trained with (`flow.mask_ratio_at`)."""


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast (fp32 master weights) on any device, CPU included, when `precision` is 'bf16'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cond_of(batch: Batch) -> Cond:
    return Cond(text=batch.text, text_mask=batch.text_mask, pooled=batch.pooled)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on `device` without a host sync: a pinned, non-blocking copy on CUDA."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def train_step(model, optimizer, batches, *, step: int, cfg: Config, rank_index: int,
               device: torch.device, guard: DivergenceGuard | None = None) -> StepResult:
    """Optimizer step `step` (0-based) over the next `accumulation_steps` batches of `batches`.

    Gradients are synchronised only on the last micro-batch (`gradient_sync`). Every random
    draw comes from a generator of (seed, batch.step, rank), so the step is reproducible. Nothing here
    waits for the device: the loss, gradient norm and skip flag stay on it until a log step reads them."""
    n, p = cfg.train.accumulation_steps, cfg.model.patch_size
    ratio = mask_ratio_at(step, ratio=cfg.model.mask_ratio, steps=cfg.train.steps,
                          unmasked_steps=cfg.train.unmasked_steps)
    losses, per_sample, ts = [], [], []
    samples, flops = 0, 0.0
    for i, batch in enumerate(itertools.islice(batches, n)):
        batch = batch.to(device, non_blocking=True)
        last = i == n - 1
        generator = step_generator(cfg.train.seed, batch.step, rank_index, device)
        keep = dropout_keep(cfg.flow, seed=cfg.train.seed, step=batch.step, rank=rank_index, batch_size=batch.size)
        img_tokens = (batch.latents.shape[-2] // p) * (batch.latents.shape[-1] // p)
        kept = None if not ratio else draw_kept_tokens(seed=cfg.train.seed, step=batch.step, rank=rank_index,
                                                       batch_size=batch.size, img_tokens=img_tokens, ratio=ratio,
                                                       device=device)
        with gradient_sync(model, last):
            with autocast_for(cfg.train.precision, device):
                out = flow_loss(model, x0=batch.latents, cond=cond_of(batch), cfg=cfg.flow, patch_size=p,
                                generator=generator, keep=to_device(keep, device), kept_tokens=kept)
            (out.loss / n).backward()
        losses.append(out.loss.detach())
        per_sample.append(out.per_sample)
        ts.append(out.t)
        samples += batch.size
        flops += batch.size * train_flops_per_sample(cfg.model, img_tokens, tuple(x.shape[1] for x in batch.text),
                                                     kept_tokens=None if kept is None else kept.shape[1])
    if len(losses) < n:
        raise RuntimeError(f"the data ended inside optimizer step {step} ({len(losses)} of {n} micro-batches)")
    grad_norm = clip_grad_norm_(list(model.parameters()), cfg.train.grad_clip)
    # A bad gradient (non-finite, or exploding: `DivergenceGuard`; the same on every rank after the
    # all-reduce) skips the update instead of poisoning the weights and the optimizer state (MicroDiT's
    # NaN catcher does the same). The fused AdamW skips on the device when `found_inf` is set (as for
    # GradScaler), moments and step count included: no host sync to decide.
    grad_norm = grad_norm.detach()
    skipped = guard.judge(grad_norm) if guard is not None else ~torch.isfinite(grad_norm)
    optimizer.found_inf = skipped.float()
    lr = lr_at(step, cfg.train)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=torch.stack(losses).mean(), per_sample=torch.cat(per_sample), t=torch.cat(ts),
                      grad_norm=grad_norm, lr=lr, samples=samples, flops=flops, skipped=skipped, mask_ratio=ratio)


# ---------------------------------------------------------------------------------------------------
# The run's state and its divergence guard
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """A run's progress besides weights, EMA and optimizer: what a checkpoint's train_state.pt holds."""

    step: int = 0
    """Optimizer steps done."""
    skipped: int = 0
    """Steps not applied (non-finite or exploding gradient) so far."""
    wandb_id: str = ""
    grad_norm_mean: float = 0.0
    """The divergence guard's running mean of good gradient norms (a resume judges spikes alike)."""
    good_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


class DivergenceGuard:
    """Tells bad steps from good ones on the device, without a host sync: a step is bad when its gradient
    norm is not finite, or exceeds `train.grad_spike_factor` times the running mean of good ones (after
    `WARMUP` good steps). Bad steps are not applied. The host reads the run of bad steps only where it
    acts on it (`check`, at log steps and before a checkpoint): `train.max_bad_steps` in a row stop the
    run, naming the last good step."""

    WARMUP = 10
    MOMENTUM = 0.9

    def __init__(self, cfg: TrainConfig, state: TrainState, device: torch.device):
        self.max_bad, self.factor = cfg.max_bad_steps, cfg.grad_spike_factor
        as_tensor = lambda v, dtype: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
        self.skipped = as_tensor(state.skipped, torch.int64)
        self.mean = as_tensor(state.grad_norm_mean, torch.float32)
        self.good = as_tensor(state.good_steps, torch.int64)
        self.bad_run = as_tensor(0, torch.int64)
        self.last_good = as_tensor(state.step, torch.int64)

    def judge(self, grad_norm: Tensor) -> Tensor:
        """() bool: whether this step's update must be skipped."""
        bad = ~torch.isfinite(grad_norm)
        if self.factor > 0:
            bad |= (self.good >= self.WARMUP) & (grad_norm > self.factor * self.mean)
        return bad

    def record(self, step: int, bad: Tensor, grad_norm: Tensor) -> None:
        """After optimizer step `step` (1-based) was judged."""
        good = ~bad
        first = self.good == 0
        blended = torch.where(first, grad_norm, self.MOMENTUM * self.mean + (1 - self.MOMENTUM) * grad_norm)
        self.mean = torch.where(good, blended.float(), self.mean)
        self.good += good.long()
        self.skipped += bad.long()
        self.bad_run = torch.where(bad, self.bad_run + 1, 0)
        self.last_good = torch.where(good, torch.full_like(self.last_good, step), self.last_good)

    def clean(self) -> bool:
        """Whether the latest step was good (a host sync: ask only where it matters)."""
        return int(self.bad_run) == 0

    def check(self) -> None:
        bad_run = int(self.bad_run)
        if bad_run >= self.max_bad:
            raise Diverged(f"{bad_run} bad steps in a row (non-finite or exploding gradients, not applied) "
                           f"since step {int(self.last_good)}, the last good step; no checkpoint of the bad "
                           "stretch was written. Resume from the newest checkpoint (--resume auto) with a lower "
                           "--train.lr (or a longer --train.warmup)")

    def save_to(self, state: TrainState) -> None:
        state.skipped, state.grad_norm_mean = int(self.skipped), float(self.mean)
        state.good_steps = int(self.good)


# ---------------------------------------------------------------------------------------------------
# Agreeing to stop
# ---------------------------------------------------------------------------------------------------

GO_ON, STOP, FAIL = 0, 1, 2
"""Stop-vote values: the largest wins, so a failure anywhere stops every rank as a failure."""


class StopVote:
    """Model ranks stop after the same step. Each step's local request (GO_ON, STOP for a signal, FAIL
    when this rank cannot go on) is all-reduced (MAX) without blocking and read one step later, so no
    rank waits for it and a signal that reaches the ranks at different moments still stops them
    together. It travels on a gloo group of CPU tensors: reading it never waits for the GPU."""

    def __init__(self, group):
        self.group = group
        self._pending: tuple | None = None

    def __call__(self, request: int) -> int:
        if self.group is None:
            return request
        decided = self.close()
        flag = torch.tensor([request])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return decided

    def close(self) -> int:
        if self._pending is None:
            return GO_ON
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag.item())


# ---------------------------------------------------------------------------------------------------
# What a log line reports
# ---------------------------------------------------------------------------------------------------


class MetricsWindow:
    """The sums behind one log line, accumulated between log steps: the loss and the t-bins stay on the
    device (no host sync per step); at the log step every field is packed into one tensor and summed
    over the model ranks in one all-reduce."""

    FIELDS = ("loss", "steps", "samples", "flops", "wait_fraction", "bytes", "encode_s", "batches")

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.bins = TimeBins(device=device)
        self.steps = self.samples = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.loss += result.loss
        self.bins.add(result.t, result.per_sample)
        self.steps += 1
        self.samples += result.samples
        self.flops += result.flops

    def reduce(self, source: dict[str, float], group) -> dict[str, float]:
        """Totals over the model ranks. `source`: this rank's data counters over the window (wait_s,
        bytes, encode_s, batches); its wait becomes a fraction of this rank's own window first, so the
        mean over ranks stays in [0, 1] however the ranks' windows differ."""
        elapsed = time.perf_counter() - self.start
        local = {"steps": self.steps, "samples": self.samples, "flops": self.flops,
                 "wait_fraction": min(1.0, source["wait_s"] / max(elapsed, 1e-9)), "bytes": source["bytes"],
                 "encode_s": source["encode_s"], "batches": source["batches"]}
        host = torch.tensor([local[k] for k in self.FIELDS[1:]], dtype=torch.float64)
        packed = torch.cat([self.loss[None], host.to(self.device), self.bins.state()])
        if group is not None:
            dist.all_reduce(packed, group=group)
        values = packed.cpu().tolist()
        totals = dict(zip(self.FIELDS, values))
        totals["elapsed"] = elapsed
        totals.update(self.bins.summary(torch.tensor(values[len(self.FIELDS):], dtype=torch.float64)))
        return totals

    def reset(self) -> None:
        self.loss.zero_()
        self.bins.reset()
        self.steps = self.samples = 0
        self.flops = 0.0
        self.start = time.perf_counter()


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
            with autocast_for(cfg.train.precision, device):
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


def sample_latents(model: MMDiT, prompts: Batch, cfg: Config) -> Tensor:
    """Sample every prompt at max_res x max_res with the configured sampler settings and the schedule shift
    training used at that size."""
    cond = cond_of(prompts.to(next(model.parameters()).device))
    res, p, factor = cfg.model.max_res, cfg.model.patch_size, cfg.latent_factor
    shift = shift_for(cfg.flow, (res // factor // p) ** 2)
    return generate_latents(model, cond=cond, uncond=None, width=res, height=res, latent_factor=factor,
                            steps=cfg.log.sample_steps, guidance=cfg.log.sample_cfg, sampler="euler",
                            seed=cfg.train.seed, shift=shift, precision=cfg.train.precision)


def save_grid(latents: Tensor, ae, cfg: Config, path: Path) -> Path:
    """Decode the latents and save them as a grid, each tile labelled with its prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(to_pil(ae.decode(latents)), captions=list(cfg.log.sample_prompts)).save(path)
    return path


def sample_grid(model: MMDiT, prompts: Batch, ae, cfg: Config, path: Path) -> Path:
    """A sample grid of every prompt (`sample_latents`), saved to `path`."""
    return save_grid(sample_latents(model, prompts, cfg), ae, cfg, path)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    step: int
    stopped_early: bool = False
    """A stop signal ended the run before `train.steps` (a resume continues it)."""
    metrics: dict = field(default_factory=dict)
    checkpoint: str = ""
    sample_grid: str = ""


def build_model(cfg: Config, rt: Runtime, *, resume: Path | None, init_from: Path | None):
    """The model (identical on every model rank: same seed, then DDP broadcasts or FSDP shards it), the
    module that trains it (`parallelize`), EMA, optimizer and state, restored from `resume` (everything)
    or `init_from` (weights and EMA only). Either checkpoint layout restores either mode: a sharded run
    reads a sharded checkpoint shard by shard (each rank its own part, whatever the number of ranks that
    wrote it); anything else goes through whole tensors, of which a sharded run keeps its part."""
    torch.manual_seed(cfg.train.seed)
    model = MMDiT(cfg.model).to(rt.device)
    source = resume or init_from
    direct = source is not None and cfg.train.parallel in SHARDED and is_sharded(source)
    if source is not None and not direct:
        load_weights(source, model, ema=False)
    train_model = parallelize(model, cfg.train, group=rt.model_group, device=rt.device, mesh=rt.mesh)
    ema_device = "cpu" if cfg.train.ema_device == "cpu" else rt.device
    ema = EMA(model, decay=cfg.train.ema_decay, every=cfg.train.ema_every, device=ema_device)
    if direct:
        weights = get_model_state_dict(model)
        load_sharded(source, "model", weights, rt.checkpoint_group)
        set_model_state_dict(model, weights)
        averages = ema.sharded_state()
        load_sharded(source, "ema", averages, rt.checkpoint_group)
        ema.load_sharded_state(averages)
    elif source is not None:
        ema.load_state_dict(load_part(source, "ema"))
    optimizer = build_optimizer(model, cfg.train)
    state = TrainState()
    if resume is not None:
        saved = load_train_state(resume)
        load_optimizer(resume, saved, model, optimizer, group=rt.checkpoint_group if direct else None)
        state.load_state_dict(saved)
    return model, train_model, ema, optimizer, state


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
"""The optimizer state as one flat dict keyed by parameter name (`state.<name>.exp_avg`,
`param_groups.<name>.lr`): what a sharded checkpoint holds, independent of the number of ranks."""


def optimizer_state(model, optimizer) -> tuple[dict[str, Tensor], dict]:
    """The optimizer state, flat: the tensors (cut like the parameters) and the rest (hyperparameters)."""
    flat = get_optimizer_state_dict(model, optimizer, options=FLAT)
    tensors = {k: v for k, v in flat.items() if isinstance(v, Tensor)}
    return tensors, {k: v for k, v in flat.items() if k not in tensors}


def load_optimizer(path: Path, saved: dict, model, optimizer, *, group) -> None:
    """Restore the optimizer from checkpoint `path` (its train_state `saved`): a sharded one into this
    rank's part (`group` given: every model rank reads its own) or through whole tensors, or the whole
    optimizer state dict of a checkpoint written by one rank."""
    if not is_sharded(path):
        if "optimizer" not in saved:
            raise CheckpointError(f"checkpoint {path} holds weights only (exported with --weights-only): start a "
                                  f"new run from it with --init_from {path}, or resume from the checkpoint it was "
                                  "exported from")
        optimizer.load_state_dict(shard_optimizer_state(saved["optimizer"], optimizer))
        return
    tensors, _ = optimizer_state(model, optimizer)  # the state made (zero) so that it can be read into
    if group is not None:
        load_sharded(path, "optimizer", tensors, group)
    else:
        whole = load_part(path, "optimizer")
        missing = sorted(set(tensors) - set(whole))
        if missing:
            raise CheckpointError(f"checkpoint {path}: optimizer/ lacks {len(missing)} entries, e.g. {missing[0]}; "
                                  "was it trained with another model config?")
        tensors = {k: shard_like(whole[k].to(v.dtype), v) for k, v in tensors.items()}
    set_optimizer_state_dict(model, optimizer, {**saved["optimizer_groups"], **tensors}, options=FLAT)


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state (whole tensors) cut like this optimizer's parameters: under fsdp/hsdp each
    rank keeps its part of every moment; under ddp it is returned as it is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in state["state"].items():
        p = params[int(index)]
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.ndim and value.numel() == p.numel():
                per_param[key] = shard_like(value.reshape(p.shape), p)
    return state


class Trainer:
    """One model rank's run. The first model rank also logs, validates, samples and writes checkpoints;
    the others train and take part in every reduction and vote."""

    def __init__(self, cfg: Config, rt: Runtime, source: BatchSource, *, resume: Path | None = None,
                 init_from: Path | None = None, autoencoder=None):
        self.cfg, self.rt, self.source, self.device = cfg, rt, source, rt.device
        self.model, self.train_model, self.ema, self.optimizer, self.state = build_model(
            cfg, rt, resume=resume, init_from=init_from)
        self.sharded = cfg.train.parallel in SHARDED
        self.guard = DivergenceGuard(cfg.train, self.state, rt.device)
        self.window = MetricsWindow(rt.device)
        self.run_dir = resolve(cfg.run_dir)
        self.logging = rt.is_logging
        self.writer = CheckpointWriter(self.run_dir, cfg.log.keep_last) if self.logging or self.sharded else None
        self.logger = Logger(cfg.log, run_dir=self.run_dir, config=to_dict(cfg), run_id=self.state.wandb_id or None,
                             enabled=self.logging, start_step=self.state.step, images_per_step=self.images_per_step)
        self.state.wandb_id = self.logger.run_id or ""
        kinds = ((PROMPTS, VALIDATION) if self.logging else ()) + ((EVAL,) if cfg.log.eval_every else ())
        extras = source.startup(kinds) if kinds else {}
        self.prompts, self.val_batches = extras.get(PROMPTS, []), extras.get(VALIDATION, [])
        if self.sharded:  # every model rank runs the sharded model through what the first runs alone under ddp
            first = rt.ranks.model_ranks[0]
            self.prompts, self.val_batches = (broadcast_batches(b, src=first, group=rt.model_group, device=rt.device)
                                              for b in (self.prompts, self.val_batches))
        self.has_prompts, self.has_validation = bool(self.prompts), bool(self.val_batches)
        self.autoencoder, self._ema_model, self._ae = autoencoder, None, None
        self._sampled_step: int | None = None  # the step of the newest sample grid (a run's last is not redrawn)
        self.evaluator = None
        if cfg.log.eval_every:
            from sd3.train.online_eval import OnlineEval

            self.evaluator = OnlineEval(cfg, rt, extras[EVAL], autoencoder=self.ae)
        self._source_mark = dataclasses.asdict(source.counters)
        self.metrics: dict = {}
        self.last_saved: Path | None = None
        self.saved_step: int | None = None

    # -- the story ------------------------------------------------------------------------------------
    def fit(self, stop: StopSignal) -> RunResult:
        """Train to `train.steps`, or until a signal (every rank stops after the same step), a failure
        on any model rank, or divergence."""
        cfg, total = self.cfg, self.cfg.train.steps
        self.announce()
        vote, batches = StopVote(self.rt.model_ctrl_group), iter(self.source)
        decision = GO_ON
        with tqdm(total=total, initial=self.state.step, desc="train", disable=not self.logging,
                  dynamic_ncols=True) as bar, self.peers_named():
            while self.state.step < total:
                self.note_unmasking()
                result = train_step(self.train_model, self.optimizer, batches, step=self.state.step, cfg=cfg,
                                    rank_index=self.rt.ranks.model_index(self.rt.rank), device=self.device,
                                    guard=self.guard)
                self.state.step += 1
                self.after_step(result)
                self.periodic(result, bar)
                bar.update(1)
                decision = vote(self.request(stop))
                if decision != GO_ON and self.state.step < total:
                    break
            vote.close()
        if decision == FAIL:
            self.raise_failure()
        return self.finish(stopped_early=decision == STOP and self.state.step < total, stop=stop)

    @contextmanager
    def peers_named(self):
        """A collective of the model ranks (DDP's gradient all-reduce, the vote, the metrics) that fails
        because another model rank died raises gloo's bare "connection reset" error: say what it means."""
        try:
            yield
        except RuntimeError as error:
            if isinstance(error, TransportError) or not peer_died(error):
                raise
            raise peer_error(error, "another model rank", timedelta(seconds=self.cfg.ranks.timeout_s)) from error

    def after_step(self, result: StepResult) -> None:
        self.guard.record(self.state.step, result.skipped, result.grad_norm)
        self.ema.update(self.state.step)
        self.window.add(result)

    def periodic(self, result: StepResult, bar) -> None:
        """What is due after this step: a log line, validation, a sample grid, a checkpoint."""
        step, log = self.state.step, self.cfg.log
        if step % log.every == 0 or step == self.cfg.train.steps:
            self.log_window(result, bar)
            self.guard.check()
        # Under fsdp/hsdp every model rank takes part (the weights are gathered); else the first alone.
        takes_part = self.logging or self.sharded
        if takes_part and log.val_every and self.has_validation and step % log.val_every == 0:
            self.validate()
        if log.eval_every and step % log.eval_every == 0:
            self.evaluate()
        if takes_part and log.sample_every and self.has_prompts and step % log.sample_every == 0:
            grid = self.sample()
            if self.logging:
                self.logger.image(step, "samples", grid, caption=" | ".join(self.cfg.log.sample_prompts))
        if takes_part and step % log.save_every == 0:
            self.save()

    def request(self, stop: StopSignal) -> int:
        """This rank's vote: FAIL when its background checkpoint write failed, STOP on a signal."""
        if self.writer is not None and self.writer.failed():
            return FAIL
        return STOP if stop.requested else GO_ON

    def finish(self, *, stopped_early: bool, stop: StopSignal) -> RunResult:
        step = self.state.step
        result = RunResult(step=step, stopped_early=stopped_early, metrics=self.metrics)
        if stopped_early:
            print0(f"stopping at step {step} on {stop.received or 'a signal on another rank'}")
        if (self.logging or self.sharded) and self.saved_step != step:
            self.save(blocking=True)
        grid = self.sample() if (self.logging or self.sharded) and not stopped_early and self.has_prompts else None
        if self.writer is not None:  # every model rank under fsdp/hsdp: the write's collectives need them all
            self.writer.wait()
        if self.logging:
            result.checkpoint = str(self.last_saved)
            result.sample_grid = str(grid) if grid is not None else ""
            self.logger.finish()
        return result

    def raise_failure(self) -> None:
        if self.writer is not None:
            self.writer.wait()  # raises its error (under fsdp/hsdp every rank's write ends with the same one)
        raise PeerFailed(f"model rank {self.rt.ranks.model_ranks[0]} could not go on (its message above says "
                         f"why); every model rank stopped after step {self.state.step}")

    # -- the parts ------------------------------------------------------------------------------------
    def announce(self) -> None:
        n, cfg = len(self.rt.ranks.model_ranks), self.cfg
        mode = ""
        if cfg.train.parallel == "fsdp":
            mode = f" (fsdp: each holds 1/{n} of the model)"
        elif cfg.train.parallel == "hsdp":
            copies, shards = self.rt.mesh.shape
            mode = f" (hsdp: {copies} copies of the model, each sharded over {shards} ranks)"
        print0(f"training {sum(p.numel() for p in self.model.parameters()):,} parameters on {n} model rank(s)"
               f"{mode}, steps {self.state.step} -> {cfg.train.steps}, "
               f"{cfg.data.batch_size} x {n} x {cfg.train.accumulation_steps} samples per optimizer step")
        m, unmasked = cfg.model, cfg.train.unmasked_steps
        if m.mask_ratio:
            print0(f"patch masking: {m.mask_ratio:.0%} of the image tokens dropped after {m.mixer_depth} patch-mixer "
                   f"block(s) until step {cfg.train.steps - unmasked}, then {unmasked} unmasked steps")

    def note_unmasking(self) -> None:
        """Say so when the unmasked finetune of a patch-masked run begins (before its first step)."""
        unmasked, total = self.cfg.train.unmasked_steps, self.cfg.train.steps
        if self.logging and self.cfg.model.mask_ratio and unmasked and self.state.step == total - unmasked:
            tqdm.write(f"step {self.state.step}: patch masking off, unmasked finetune for the last {unmasked} steps")

    def log_window(self, result: StepResult, bar) -> None:
        counters = dataclasses.asdict(self.source.counters)
        delta = {k: counters[k] - self._source_mark[k] for k in ("wait_s", "bytes", "encode_s", "batches")}
        self._source_mark = counters
        totals = self.window.reduce(delta, self.rt.model_group)
        self.window.reset()
        n_model, elapsed = len(self.rt.ranks.model_ranks), totals["elapsed"]
        self.metrics = {
            "loss": totals["loss"] / totals["steps"], "lr": result.lr, "grad_norm": float(result.grad_norm),
            "images_per_s": totals["samples"] / elapsed,
            "mfu": mfu(totals["flops"] / elapsed, self.cfg.log.peak_tflops, n_model),
            "data_wait": totals["wait_fraction"] / n_model, "skipped_steps": int(self.guard.skipped),
            "loader_encode_ms": 1e3 * totals["encode_s"] / max(totals["batches"], 1),
            "wire_mb_per_step": totals["bytes"] / 1e6 / max(totals["steps"] / n_model, 1),
            "bad_rows": float(counters["bad_rows"]),  # so far, replaced by this rank's loader
            **{k: v for k, v in totals.items() if k.startswith("loss_t/")},
        }
        if self.cfg.model.mask_ratio:
            self.metrics["mask_ratio"] = result.mask_ratio
        if self.device.type == "cuda":
            self.metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.logging:
            self.logger.log(self.state.step, self.metrics)
            bar.set_postfix(loss=f"{self.metrics['loss']:.4f}", img_s=f"{self.metrics['images_per_s']:.1f}")
            log0(format_line(self.state.step, self.cfg.train.steps, self.metrics))

    @property
    def images_per_step(self) -> int:
        return self.cfg.train.accumulation_steps * self.cfg.data.batch_size * len(self.rt.ranks.model_ranks)

    def validate(self) -> None:
        """The validation loss of the trained weights: the first model rank alone under ddp; under
        fsdp/hsdp every model rank runs the same batches through the sharded model."""
        val = validation_loss(self.model, self.val_batches, self.cfg, self.device)
        self.metrics.update(val)
        if self.logging:
            self.logger.log(self.state.step, val)
            log0(f"step {self.state.step}: validation loss {val['val/loss']:.4f}")
        if not math.isfinite(val["val/loss"]):
            raise Diverged(f"the validation loss at step {self.state.step} is {val['val/loss']}; no checkpoint "
                           "of it was written. Resume from the newest checkpoint with a lower --train.lr")

    def ema_model(self) -> MMDiT:
        """ddp: a plain model holding the current EMA weights, built once and refreshed (fsdp/hsdp use
        `sharded_ema_model`)."""
        if self._ema_model is None:
            self._ema_model = MMDiT(self.cfg.model).to(self.device).eval()
        self.ema.copy_to(self._ema_model)
        return self._ema_model

    def sharded_ema_model(self) -> MMDiT:
        """fsdp/hsdp: the EMA weights in a model sharded like the trained one (each rank fills its own
        shards from its EMA, no communication), for every model rank to run in step: no whole copy."""
        with torch.device("meta"):
            model = MMDiT(self.cfg.model)
        apply_fsdp(model, self.cfg.train, self.rt.mesh, inference=True)
        model.to_empty(device=self.device)
        shadow = dict(zip(self.ema.names, self.ema.shadow))
        with torch.no_grad():
            for name, p in model.named_parameters():
                local(p).copy_(shadow[name])
        return model.eval()

    def ae(self):
        """The autoencoder that decodes generated latents (loaded on first use)."""
        if self._ae is None:
            self._ae = self.autoencoder()
        return self._ae

    def sample(self) -> Path | None:
        """This step's sample grid from the EMA weights, written by the first model rank (which gets its
        path; under fsdp/hsdp every model rank samples in step through the sharded EMA model), drawn once:
        the end of a run whose last step was a sample step reuses it."""
        path = self.run_dir / "samples" / f"step_{self.state.step:08d}.png"
        fresh = self._sampled_step == self.state.step and (self.sharded or path.is_file())
        if not fresh:
            model = self.sharded_ema_model() if self.sharded else self.ema_model()
            latents = sample_latents(model, self.prompts[0], self.cfg)
            if self.logging:
                save_grid(latents, self.ae(), self.cfg, path)
            self._sampled_step = self.state.step
        return path if self.logging else None

    def evaluate(self) -> None:
        """FID (KID, CLIP score) of the EMA weights on the evaluation rows: every model rank takes part."""
        model = self.sharded_ema_model() if self.sharded else self.ema_model()
        result = self.evaluator.run(model, self.state.step, sharded=self.sharded)
        self.metrics.update(result)
        if self.logging:
            self.logger.log(self.state.step, result)
            clip = f" | clip score {result['eval/clip_score']:.2f}" if "eval/clip_score" in result else ""
            log0(f"step {self.state.step}: eval fid {result['eval/fid']:.3f} | kid {result['eval/kid']:.4f} "
                       f"+- {result['eval/kid_std']:.4f}{clip} ({int(result['eval/images'])} images, "
                       f"{result['eval/seconds']:.0f} s)")

    def save(self, blocking: bool = False) -> None:
        """A checkpoint of this step, unless the step was bad: none is written from a bad stretch. Under ddp
        the first model rank writes whole tensors; under fsdp/hsdp every model rank calls this and writes its own
        shards. Both in the background unless `blocking` (or, sharded, `log.async_save=false`)."""
        if not self.guard.clean():
            print0(f"step {self.state.step}: no checkpoint (the last {int(self.guard.bad_run)} steps were bad)")
            return
        if not self.weights_finite():
            raise Diverged(f"the weights are not finite at step {self.state.step}; no checkpoint of them was "
                           "written. Resume from the newest checkpoint with a lower --train.lr")
        self.guard.save_to(self.state)
        self.saved_step = self.state.step
        if self.sharded:  # every model rank writes its own part
            reshard(self.model)
            tensors, groups = optimizer_state(self.model, self.optimizer)
            self.last_saved = self.writer.save_sharded(
                self.state.step, parts={"model": get_model_state_dict(self.model), "ema": self.ema.sharded_state(),
                                        "optimizer": tensors},
                cfg=self.cfg, train_state={"optimizer_groups": groups, **self.state.state_dict()},
                group=self.rt.checkpoint_group, writes=self.logging, blocking=blocking or not self.cfg.log.async_save)
            return
        if not self.logging:
            return
        train_state = {"optimizer": self.optimizer.state_dict(), **self.state.state_dict()}
        self.last_saved = self.writer.save(self.state.step, model_state=self.model.state_dict(),
                                           ema_state=self.ema.state_dict(), cfg=self.cfg, train_state=train_state,
                                           blocking=blocking)

    def weights_finite(self) -> bool:
        """Whether every weight is finite (under fsdp/hsdp: on every model rank's shard)."""
        finite = torch.stack([torch.isfinite(local(p)).all() for p in self.model.parameters()]).all()
        if self.sharded:
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.rt.model_group)
        return bool(finite)


def run_trainer(cfg: Config, rt: Runtime, stop: StopSignal, source: BatchSource, *, start_step: int,
                resume: Path | None = None, init_from: Path | None = None, autoencoder=None) -> RunResult:
    """Train from `start_step` to `cfg.train.steps` (or a stop). `autoencoder()` gives the autoencoder that
    decodes sample grids (first model rank, on first use)."""
    trainer = Trainer(cfg, rt, source, resume=resume, init_from=init_from, autoencoder=autoencoder)
    if trainer.state.step != start_step:
        raise RuntimeError(f"{resume} holds step {trainer.state.step}, but the run was told to start at {start_step}")
    return trainer.fit(stop)
