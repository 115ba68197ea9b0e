"""Evaluation during training: FID and KID of the EMA weights on held-out rows (and the CLIP score when
a CLIP model is configured), every `log.eval_every` optimizer steps.

    evaluator = OnlineEval(cfg, rt, eval_batches, autoencoder=...)   # every model rank, at start-up
    metrics = evaluator.run(ema_model, step)                          # a collective over the model ranks

The evaluation rows are the first `log.eval_num` held-out rows (`data.val_rows`, a uniform draw made
from the seed, never trained on); model rank i of n takes every n-th (`sd3.dist.loader.eval_rows`). Its loader
encodes their captions once, at start-up (EVAL batches: no latents); the rank decodes their real images
itself with the same `holdout_batches` call, so rows, order and captions agree, and keeps the real
images' Inception statistics from the first evaluation on. Each evaluation generates one image per row at
the row's own bucket size with the EMA weights, then merges the statistics over the model ranks
(`sd3.eval.scores.gather_stats`: sums, exact whatever the split, and the features for KID).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.distributed as dist

from sd3 import salts
from sd3.config import Config
from sd3.console import print0
from sd3.diffusion.flow import Cond, shift_for
from sd3.diffusion.pipeline import generate_latents
from sd3.dist.batch import Batch
from sd3.eval.scores import RANDOM, RANDOM_WARNING, ClipScore, FeatureStats, fid, gather_stats, kid, load_inception
from sd3.paths import resolve


class OnlineEval:
    """One model rank's share of the evaluation (see the module docstring)."""

    def __init__(self, cfg: Config, rt, batches: list[Batch], *, autoencoder):
        from sd3.data import BucketDataset

        self.cfg, self.rt, self.device = cfg, rt, rt.device
        self.index = rt.ranks.model_index(rt.rank)
        self.cond = batches
        self.autoencoder, self._ae = autoencoder, None
        rows = np.concatenate([b.rows.cpu().numpy() for b in batches]) if batches else np.empty(0, np.int64)
        dataset = BucketDataset(dataclasses.replace(cfg.data, batch_size=1), seed=cfg.train.seed, num_model_ranks=1,
                                max_res=cfg.model.max_res, multiple=cfg.pixel_multiple)
        self.real = dataset.holdout_batches(cfg.data.batch_size, rows=rows, dtype=torch.uint8)
        got = np.concatenate([r.rows for r in self.real]) if self.real else np.empty(0, np.int64)
        if not np.array_equal(got, rows):
            raise RuntimeError(f"evaluation rows of model rank {rt.rank} differ from its loader's ({len(got)} decoded "
                               f"vs {len(rows)} encoded): do both see the same dataset?")
        weights = cfg.log.eval_inception
        if weights == RANDOM:
            print0(f"WARNING: log.eval_inception=random: {RANDOM_WARNING}")
        self.inception = load_inception(None if not weights else weights if weights == RANDOM else resolve(weights),
                                        device=self.device, seed=cfg.train.seed)
        self.clip = ClipScore.load(str(resolve(cfg.log.eval_clip)) if resolve(cfg.log.eval_clip).is_dir()
                                   else cfg.log.eval_clip, device=self.device) if cfg.log.eval_clip else None
        self.real_stats: FeatureStats | None = None

    @torch.no_grad()
    def run(self, model, step: int, *, sharded: bool = False) -> dict[str, float]:
        """Generate this rank's share with `model` (the EMA weights), score it, merge over the model ranks.
        Every model rank must call it at the same step. `sharded`: `model` is sharded over the model ranks
        (fsdp/hsdp), so each of its forwards is a collective: a rank with fewer batches than another
        generates throwaway ones until every rank has run as many forwards."""
        start = time.perf_counter()
        group = self.rt.model_group
        if self._ae is None:
            self._ae = self.autoencoder()
        if self.real_stats is None:
            real = FeatureStats.empty(device=self.device)
            for raw in self.real:
                real.add(self.inception(raw.images.to(self.device)))
            self.real_stats = gather_stats(real, group) if group is not None else real
        short = self.batches_short(group) if sharded else 0   # before any forward: those are collectives too
        fake = FeatureStats.empty(device=self.device)
        clip = torch.zeros(2, dtype=torch.float64, device=self.device)   # score sum, images
        for i, (cond, raw) in enumerate(zip(self.cond, self.real)):
            images = self.generate(model, cond, raw.images.shape[-2:], seed=self.noise_seed(i))
            fake.add(self.inception(images))
            if self.clip is not None:
                clip += torch.tensor([float(self.clip(images, raw.captions).sum()), len(raw.captions)],
                                     dtype=torch.float64, device=self.device)
        for _ in range(short):
            self.generate(model, *self.filler(), seed=0)
        if group is not None:
            fake = gather_stats(fake, group)
            dist.all_reduce(clip, group=group)
        kid_mean, kid_std = kid(self.real_stats.features, fake.features)
        out = {"eval/fid": fid(self.real_stats, fake), "eval/kid": kid_mean, "eval/kid_std": kid_std,
               "eval/images": float(fake.n), "eval/seconds": time.perf_counter() - start}
        if self.clip is not None:
            out["eval/clip_score"] = float(clip[0] / clip[1].clamp(min=1))
        return out

    def generate(self, model, cond: Batch, size: tuple[int, int], *, seed: int) -> torch.Tensor:
        """(B, 3, H, W) uint8 images for one batch of captions at its bucket size (H, W)."""
        H, W = size
        p = self.cfg.model.patch_size
        shift = shift_for(self.cfg.flow, (H // self._ae.factor // p) * (W // self._ae.factor // p))
        cond = cond.to(self.device)
        latents = generate_latents(model, cond=Cond(text=cond.text, text_mask=cond.text_mask, pooled=cond.pooled),
                                   uncond=None, width=W, height=H, latent_factor=self._ae.factor,
                                   steps=self.cfg.log.eval_steps, guidance=self.cfg.log.eval_cfg, sampler="euler",
                                   seed=seed, shift=shift, precision=self.cfg.train.precision)
        images = self._ae.decode(latents)                                                  # (B, 3, H, W)
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def batches_short(self, group) -> int:
        """How many batches this rank has fewer than the model rank with the most."""
        most = torch.tensor([len(self.cond)], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        return int(most) - len(self.cond)

    def filler(self) -> tuple[Batch, tuple[int, int]]:
        """A batch to generate and throw away, and its size: this rank's first, or one empty caption."""
        if self.cond:
            return self.cond[0], tuple(self.real[0].images.shape[-2:])
        m = self.cfg.model
        empty = Batch(latents=torch.zeros(1), text=tuple(torch.zeros(1, 1, d) for d in m.text_dims),
                      text_mask=tuple(torch.ones(1, 1, dtype=torch.bool) for _ in m.text_dims),
                      pooled=torch.zeros(1, m.pooled_dim), step=0, rows=torch.zeros(1, dtype=torch.int64))
        return empty, (m.max_res, m.max_res)

    def noise_seed(self, i: int) -> int:
        """The noise of this rank's i-th batch: the same at every evaluation (differences are the model's)."""
        words = [self.cfg.train.seed, salts.EVAL_NOISE, self.index, i]
        return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFF_FFFF)
