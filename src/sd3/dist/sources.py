"""Where a model rank's batches come from: one interface, two implementations.

    source = LocalSource(producer, first, end)            # world size 1: encoded in this process
    source = RemoteSource(loader_rank, rt, cfg)           # under torchrun: received from a loader rank
    extras = source.startup((PROMPTS, VALIDATION))        # the first model rank's startup batches
    for batch in source: ...                              # Batches in step order
    source.finish(step)                                   # the end: see below
    source.counters                                       # wait, bytes, encode time, batches, bad rows

`finish` is the end of the conversation with the loader. Over the wire: this rank tells its loader it
is done (on the gloo control group, apart from the data), then takes whatever the loader had already
sent until the loader's END, so no send or receive is left pending at exit; a loader that died on the
way is reported as such. In process, it shuts the decode threads down.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sd3.dist.batch import Batch
from sd3.dist.transport import BATCH, END, ERROR, KIND_NAMES, LoaderFailed, Message, TransportError, peer_error, receive


@dataclass
class Counters:
    """Totals since the start of the run (the trainer logs their growth between log steps)."""

    wait_s: float = 0.0
    """Time the trainer spent blocked waiting for a batch."""
    bytes: int = 0
    """Bytes received in the batches consumed (0 in process: nothing travels)."""
    encode_s: float = 0.0
    """The loader's encode time of the batches consumed."""
    batches: int = 0
    bad_rows: int = 0
    """Corrupt or unreadable rows the loader replaced so far (its running total)."""

    def add(self, *, wait_s: float, nbytes: int, encode_s: float, bad_rows: int) -> None:
        self.wait_s += wait_s
        self.bytes += nbytes
        self.encode_s += encode_s
        self.batches += 1
        self.bad_rows = bad_rows


class BatchSource(abc.ABC):
    """A model rank's supply of Batches (see the module docstring)."""

    def __init__(self):
        self.counters = Counters()

    @abc.abstractmethod
    def startup(self, kinds: tuple[int, ...]) -> dict[int, list[Batch]]:
        """The startup batches of each kind (sample-grid prompts, held-out rows), in `kinds` order."""

    @abc.abstractmethod
    def __next__(self) -> Batch:
        """The next step's Batch; StopIteration when the data has ended."""

    def __iter__(self):
        return self

    @abc.abstractmethod
    def finish(self, step: int, *, within: float | None = None) -> None:
        """This rank is done after `step`: end the conversation with whatever produces the batches (waiting
        at most `within` seconds for its end, when given)."""


class LocalSource(BatchSource):
    """World size 1: a BatchProducer in this process encodes each batch on demand."""

    def __init__(self, producer, start_step: int, end_step: int):
        super().__init__()
        self.producer = producer
        self.step, self.end_step = start_step, end_step
        producer.start(start_step, end_step)

    def startup(self, kinds: tuple[int, ...]) -> dict[int, list[Batch]]:
        return {kind: self.producer.extras(kind) for kind in kinds}

    def __next__(self) -> Batch:
        if self.step >= self.end_step:
            raise StopIteration
        start = time.perf_counter()
        batch, stats = self.producer.next()
        self.counters.add(wait_s=time.perf_counter() - start, nbytes=0, encode_s=stats["encode_s"],
                          bad_rows=stats["bad_rows"])
        self.step += 1
        return batch

    def finish(self, step: int, *, within: float | None = None) -> None:
        self.producer.close()


class RemoteSource(BatchSource):
    """Batches received from loader rank `src` on a background thread, `depth` ahead of the trainer.

    An ERROR from the loader raises LoaderFailed with the loader's message; a loader that dies or goes
    silent raises TransportError saying which. Startup messages (PROMPTS, VALIDATION) are kept aside."""

    def __init__(self, src: int, *, ctrl_group, device: torch.device, depth: int, timeout_s: float):
        super().__init__()
        self.src, self.device, self.ctrl_group = src, device, ctrl_group
        self.timeout = timedelta(seconds=timeout_s)
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, depth))
        self.closed = False
        """The loader's last message (END or ERROR), or a failure to receive, has been taken."""
        self._thread = threading.Thread(target=self._run, name=f"receive-from-{src}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            try:
                message = receive(self.src, group=None, device=self.device, timeout=self.timeout)
            except BaseException as error:
                self._queue.put(error)
                return
            self._queue.put(message)
            if message.kind in (END, ERROR):
                return

    def _get(self, timeout: float | None = None) -> Message:
        item = self._queue.get(timeout=timeout)
        self.closed = isinstance(item, BaseException) or item.kind in (END, ERROR)  # nothing follows it
        if isinstance(item, BaseException):
            raise item
        if item.kind == ERROR:
            raise LoaderFailed(f"loader rank {self.src} failed: {item.error}")
        return item

    def startup(self, kinds: tuple[int, ...]) -> dict[int, list[Batch]]:
        extras: dict[int, list[Batch]] = {kind: [] for kind in kinds}
        for kind in kinds:   # each kind ends with an empty batch
            while True:
                message = self._get()
                if message.kind != kind:
                    raise TransportError(f"expected a {KIND_NAMES[kind]} message from loader rank {self.src}, "
                                         f"got {KIND_NAMES.get(message.kind, message.kind)}")
                if message.batch.size == 0:
                    break
                extras[kind].append(message.batch)
        return extras

    def __next__(self) -> Batch:
        start = time.perf_counter()
        message = self._get()
        wait = time.perf_counter() - start
        if message.kind == END:
            raise StopIteration
        if message.kind != BATCH:
            raise TransportError(f"unexpected {KIND_NAMES.get(message.kind)} message from loader rank {self.src}")
        self.counters.add(wait_s=wait, nbytes=message.nbytes, encode_s=message.stats["encode_s"],
                          bad_rows=message.stats["bad_rows"])
        return message.batch

    def finish(self, step: int, *, within: float | None = None) -> None:
        """Tell the loader this rank is done after `step`, then take what it already sent until its END.

        The loader sends END once every rank it feeds is done. A rank that failed on its own gives up after
        `within` seconds: another model rank may be blocked in a collective with it (DDP's all-reduce), and
        is done only once this one has exited and broken it."""
        try:  # gloo refuses the send at once when the loader's connection is already closed
            dist.isend(torch.tensor([step]), self.src, group=self.ctrl_group).wait(self.timeout)
        except Exception as error:
            raise peer_error(error, f"loader rank {self.src}", self.timeout) from error
        deadline = None if within is None else time.monotonic() + within
        while not self.closed:
            try:
                self._get(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except LoaderFailed:
                return  # it failed after this rank was done: nothing of this run is lost
            except queue.Empty:
                return  # this rank failed; the others end on their own
