"""Loader ranks: sampler -> reader -> decode -> autoencoder and text encoders -> Batch -> model ranks.

Decoding runs ahead on worker threads (image decoding and parquet reads release the GIL), bounded
so memory stays flat; encoding runs on this rank's GPU; sends are asynchronous with a bounded
number in flight, which is also the backpressure that keeps a loader from running away. A loader
never builds the diffusion model.

    producer = BatchProducer(cfg, device=..., model_indices=[0, 1, 2], num_model_ranks=6)
    producer.start(first_step, end_step)
    batch, stats = producer.next()      # the Batch for the next step, for all the model ranks fed
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from sd3 import salts
from sd3.dist.batch import Batch
from sd3.config import Config
from sd3.data.images import to_model_range
from sd3.encode.encoders import check_widths, load_autoencoder, load_text_encoders
from sd3.diffusion.flow import dropout_keep, step_generator
from sd3.console import log_rank
from sd3.dist.runtime import Runtime
from sd3.dist.transport import EVAL, PROMPTS, VALIDATION, Sender, TransportError, pack, pack_end, pack_error, peer_error

VAE_CHUNK_PIXELS = 64 * 256 * 256
"""Pixels per autoencoder call (64 images at 256 px, 4 at 1024 px): bounds its activation memory at any
resolution for large loader batches."""


def vae_chunk(height: int, width: int) -> int:
    """Images of this size per autoencoder call."""
    return max(1, VAE_CHUNK_PIXELS // (height * width))


def eval_rows(dataset, cfg: Config, model_index: int, num_model_ranks: int):
    """Model rank `model_index`'s share of the evaluation rows: every n-th of the first log.eval_num
    held-out rows (which are a uniform draw from the dataset already)."""
    return dataset.holdout[: cfg.log.eval_num][model_index::num_model_ranks]


def open_dataset(cfg: Config, num_model_ranks: int):
    from sd3.data import BucketDataset

    return BucketDataset(cfg.data, seed=cfg.train.seed, num_model_ranks=num_model_ranks,
                         max_res=cfg.model.max_res, multiple=cfg.pixel_multiple)


class BatchProducer:
    """Everything one loader does, without any communication (world size 1 uses it directly)."""

    def __init__(self, cfg: Config, *, device: torch.device, model_indices: list[int], num_model_ranks: int,
                 loader_index: int = 0):
        self.cfg, self.device = cfg, device
        self.model_indices = list(model_indices)
        self.num_model_ranks = num_model_ranks
        self.loader_index = loader_index
        self.dataset = open_dataset(cfg, num_model_ranks)
        self.text = load_text_encoders(cfg.encoders, device)
        self.ae = load_autoencoder(cfg.encoders, device)
        check_widths(cfg.model, self.text, self.ae)
        workers = cfg.data.decode_workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self.ahead = max(cfg.data.prefetch, workers)   # decoded batches in flight
        self.pending: deque = deque()
        self.next_step = self.end_step = 0
        self.bad_rows = 0

    def start(self, start_step: int, end_step: int) -> None:
        self.next_step, self.end_step = start_step, end_step
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.ahead and self.next_step < self.end_step:
            # uint8 images: 4x less to convert and move; on a CUDA loader, JPEGs decode on the GPU in batches.
            self.pending.append(self.pool.submit(
                self.dataset.load, self.next_step, model_ranks=self.model_indices,
                device=self.device if self.device.type == "cuda" else None, dtype=torch.uint8))
            self.next_step += 1

    def next(self) -> tuple[Batch, dict]:
        """The next step's Batch (all fed model ranks, in order) and the loader's stats for it."""
        raw = self.pending.popleft().result()
        self._fill()
        start = time.perf_counter()
        batch = self.encode(raw.images, raw.captions, step=raw.step, rows=torch.from_numpy(raw.rows))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest encode time; sends wait for it anyway
        # A row that does not decode and one of a shard that cannot be read alike: replaced, and counted.
        self.bad_rows += int(raw.stats.get("corrupt", 0)) + int(raw.stats.get("unreadable", 0))
        return batch, {"encode_s": time.perf_counter() - start, "bad_rows": self.bad_rows}

    def encode(self, images: torch.Tensor, captions: list[str], *, step: int, rows: torch.Tensor,
               salt: int = salts.POSTERIOR) -> Batch:
        # The posterior sample is seeded by (seed, step, loader): a resumed run encodes the same latents.
        generator = step_generator(self.cfg.train.seed, abs(step), self.loader_index, self.device,
                                   salt=salt)
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = to_model_range(images)
        with torch.no_grad():
            chunks = images.split(vae_chunk(*images.shape[-2:]))
            latents = torch.cat([self.ae.encode(chunk, generator=generator) for chunk in chunks])
        text, text_mask, pooled = self.text.encode(captions)
        return Batch(latents=latents, text=text, text_mask=text_mask, pooled=pooled, step=step, rows=rows)

    def extras(self, kind: int, model_index: int = 0) -> list[Batch]:
        """Startup batches: the sample-grid prompts and the held-out rows (for the first model rank), and
        the captions of model rank `model_index`'s share of the evaluation rows (no latents: see
        sd3.train.online_eval)."""
        if kind == PROMPTS:
            prompts = list(self.cfg.log.sample_prompts)
            if not prompts:
                return []
            text, text_mask, pooled = self.text.encode(prompts)
            C = self.cfg.model.in_channels
            latents = torch.empty(len(prompts), C, 0, 0, device=self.device)
            return [Batch(latents=latents, text=text, text_mask=text_mask, pooled=pooled, step=-1,
                          rows=torch.full((len(prompts),), -1, dtype=torch.int64))]
        if kind == VALIDATION:
            return [self.encode(raw.images, raw.captions, step=-1 - i, rows=torch.from_numpy(raw.rows),
                                salt=salts.HOLDOUT_POSTERIOR)
                    for i, raw in enumerate(self.dataset.holdout_batches(self.cfg.data.batch_size))]
        if kind == EVAL:
            C = self.cfg.model.in_channels
            out = []
            for raw in self.dataset.holdout_batches(self.cfg.data.batch_size, dtype=torch.uint8,
                                                    rows=eval_rows(self.dataset, self.cfg, model_index,
                                                                   self.num_model_ranks)):
                text, text_mask, pooled = self.text.encode(raw.captions)
                out.append(Batch(latents=torch.empty(raw.size, C, 0, 0, device=self.device), text=text,
                                 text_mask=text_mask, pooled=pooled, step=-1, rows=torch.from_numpy(raw.rows)))
            return out
        raise ValueError(f"unknown startup batch kind {kind}")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


class DoneFlags:
    """Each fed model rank says once, on the gloo control group, that it is done (after its last step, a
    stop or its own failure). gloo's receive handles do not report completion until waited on
    (`is_completed()` stays False), so each is waited on by its own daemon thread and polled here."""

    def __init__(self, feeds: list[int], group):
        self.feeds = feeds
        self._done = {src: threading.Event() for src in feeds}
        self._errors: dict[int, BaseException] = {}
        for src in feeds:
            work = dist.irecv(torch.zeros(1, dtype=torch.int64), src, group=group)
            threading.Thread(target=self._wait, args=(src, work), name=f"done-from-{src}", daemon=True).start()

    def _wait(self, src: int, work) -> None:
        try:
            work.wait()
        except BaseException as error:  # the peer died: reported by wait_all
            self._errors[src] = error
        self._done[src].set()

    def finished(self) -> set[int]:
        return {src for src, event in self._done.items() if event.is_set() and src not in self._errors}

    def wait_all(self, timeout: timedelta) -> None:
        for src, event in self._done.items():
            if not event.wait(timeout.total_seconds()):
                raise TransportError(f"model rank {src} did not say it was done within "
                                     f"{timeout.total_seconds():.0f} s")
            if src in self._errors:
                raise peer_error(self._errors[src], f"model rank {src}", timeout) from self._errors[src]


def run_loader(cfg: Config, rt: Runtime, *, start_step: int, end_step: int) -> None:
    """The loader-rank loop (micro-steps [start_step, end_step)): serve the fed model ranks until each one
    says it is done, then end every conversation with END, so no send is left pending at exit. On any
    failure it tells its model ranks why (ERROR), then exits non-zero; a model rank that died is named."""
    feeds = list(rt.ranks.feeds(rt.rank))
    indices = [rt.ranks.model_index(m) for m in feeds]
    timeout = timedelta(seconds=cfg.ranks.timeout_s)
    sender = Sender(group=None, max_in_flight=cfg.data.prefetch * len(feeds), timeout_s=cfg.ranks.timeout_s)
    done = DoneFlags(feeds, rt.ctrl_group)
    producer = None
    try:
        producer = BatchProducer(cfg, device=rt.device, model_indices=indices,
                                 num_model_ranks=len(rt.ranks.model_ranks), loader_index=rt.ranks.loader_index(rt.rank))
        log_rank(rt.rank, "loader", f"feeding model ranks {feeds}: {producer.dataset.describe()}")
        first_model = rt.ranks.model_ranks[0]
        for dst, index in zip(feeds, indices):   # startup batches, each kind ending with an empty one
            kinds = (PROMPTS, VALIDATION) if dst == first_model else ()
            for kind in kinds + ((EVAL,) if cfg.log.eval_every else ()):
                for extra in producer.extras(kind, index):
                    sender.send(pack(extra, kind=kind), dst)
                sender.send(pack(_end_marker(cfg, rt.device), kind=kind), dst)
        producer.start(start_step, end_step)
        for _ in range(start_step, end_step):
            finished = done.finished()
            if len(finished) == len(feeds):
                break
            batch, stats = producer.next()
            for piece, dst, index in zip(batch.split(len(feeds)), feeds, indices):
                if dst in finished:   # it takes nothing more but what is already on its way
                    continue
                keep = dropout_keep(cfg.flow, seed=cfg.train.seed, step=piece.step, rank=index, batch_size=piece.size)
                sender.send(pack(without_dropped(piece, keep), encode_s=stats["encode_s"],
                                 bad_rows=stats["bad_rows"]), dst)
        done.wait_all(timeout)
        sender.flush()
        for dst in feeds:
            sender.send(pack_end(rt.device), dst)
        sender.flush()
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            raise  # a second Ctrl-C: a stop at once, not a failure to report
        reason = f"{type(error).__name__}: {error}"
        log_rank(rt.rank, "loader", f"failed: {reason}\n{traceback.format_exc()}")
        alive = [dst for dst in feeds if f"model rank {dst} exited" not in reason]
        _send_error(reason, alive, rt.device, min(10.0, cfg.ranks.timeout_s))
        raise SystemExit(1) from error
    finally:
        if producer is not None:
            producer.close()


def without_dropped(batch: Batch, keep: torch.Tensor) -> Batch:
    """Unmask the text streams that this model rank's caption dropout will null anyway, so their token
    states are not sent (at the seed's probabilities, 38% of the text bytes). The model rank draws the
    same `dropout_keep` decision and nulls them itself: what it trains on does not change."""
    keep = keep.to(batch.latents.device)
    return replace(batch, text_mask=tuple(m & keep[:, i, None] for i, m in enumerate(batch.text_mask)))


def _end_marker(cfg: Config, device: torch.device) -> Batch:
    """An empty batch: the end of a run of startup messages of one kind."""
    C, dims = cfg.model.in_channels, cfg.model.text_dims
    return Batch(latents=torch.empty(0, C, 0, 0, device=device),
                 text=tuple(torch.empty(0, 1, d, device=device) for d in dims),
                 text_mask=tuple(torch.empty(0, 1, dtype=torch.bool, device=device) for _ in dims),
                 pooled=torch.empty(0, cfg.model.pooled_dim, device=device), step=-1,
                 rows=torch.empty(0, dtype=torch.int64))


def _send_error(reason: str, feeds: list[int], device: torch.device, timeout_s: float) -> None:
    """Best effort: tell every model rank fed why this loader stops (a fresh sender: the old one may
    hold sends that will never complete)."""
    sender = Sender(group=None, max_in_flight=len(feeds) + 1, timeout_s=timeout_s)
    try:
        for dst in feeds:
            sender.send(pack_error(reason, device), dst)
        sender.flush()
    except Exception as error:
        log_rank(dist.get_rank(), "loader", f"could not tell model ranks {feeds} about the failure: {error}")

