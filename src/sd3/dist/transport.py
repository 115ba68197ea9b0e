"""Loader -> model transport: a `Batch` on the wire, sent ahead and received ahead.

A message is a fixed-size int64 header, then the tensors it describes, in a fixed order:

    header   (HEADER_LEN,) int64: magic, format version, kind, step, every shape and dtype, loader stats
    latents  (B, C, h, w)                        absent when h * w == 0 (prompt batches)
    meta     (n_text + 1, B) int64               real-token count per text stream, then the row ids
    text_i   (N_i, D_i) for each stream          only the real tokens of the batch, packed row by row
    pooled   (B, P)

Text travels at each encoder's native width and without padding of any kind: the receiver rebuilds
(B, L_i, D_i) with L_i the longest caption in its batch, zeros elsewhere (the seed sent every
caption as 154 x 2304, about 0.7 MB a sample, most of it zeros). An ERROR message carries the
loader's error text instead, so its model ranks stop with its message rather than waiting forever.

`sd3.dist.sources.RemoteSource` receives on its own thread with a bounded queue: while step s computes, the
batches for s+1 ... s+depth are already arriving. A peer that dies is reported as such ("exited or
crashed"), apart from one that is alive but silent ("no message within N s"): `peer_error`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from sd3.dist.batch import Batch

MAGIC = 0x5D3F
VERSION = 1
HEADER_LEN = 32
MAX_STREAMS = (HEADER_LEN - 16) // 2

# Message kinds
BATCH, PROMPTS, VALIDATION, END, ERROR, EVAL = 1, 2, 3, 4, 5, 6
KIND_NAMES = {BATCH: "batch", PROMPTS: "prompts", VALIDATION: "validation", END: "end", ERROR: "error",
              EVAL: "evaluation"}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}

# Header slots
_MAGIC, _VERSION, _KIND, _STEP, _B, _C, _H, _W, _N_TEXT, _P, _DT_LAT, _DT_TXT, _DT_POOL, _ENCODE_US, \
    _BAD_ROWS, _MSG_LEN = range(16)
_STREAMS = 16  # then (N_i, D_i) per stream


class TransportError(RuntimeError):
    """The peer failed, vanished or sent something this side cannot read; the message says which."""


class LoaderFailed(TransportError):
    """The loader rank sent an ERROR message: it failed and told its model ranks why."""


@dataclass
class Message:
    kind: int
    batch: Batch | None = None
    error: str = ""
    stats: dict = field(default_factory=dict)
    nbytes: int = 0


# --------------------------------------------------------------------------------------------------
# Encoding and decoding (pure functions of tensors; no communication)
# --------------------------------------------------------------------------------------------------


def lengths_of(mask: Tensor) -> Tensor:
    """Real-token counts (B,) of a right-padded mask; any other mask shape is an error."""
    lengths = mask.sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask.bool(), expected):
        raise TransportError("text masks must be right-padded (real tokens first) to be packed")
    return lengths


def pack(batch: Batch, *, kind: int = BATCH, encode_s: float = 0.0, bad_rows: int = 0) -> list[Tensor]:
    """The header and tensors of one message, on the batch's device."""
    n = len(batch.text)
    if n > MAX_STREAMS:
        raise TransportError(f"{n} text streams; the header has room for {MAX_STREAMS}")
    B, C, h, w = batch.latents.shape
    device = batch.latents.device
    lengths = [lengths_of(m) for m in batch.text_mask]
    packed = [x[m.bool()] for x, m in zip(batch.text, batch.text_mask)]       # (N_i, D_i)
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[_MAGIC], header[_VERSION], header[_KIND], header[_STEP] = MAGIC, VERSION, kind, batch.step
    header[_B], header[_C], header[_H], header[_W] = B, C, h, w
    header[_N_TEXT], header[_P] = n, batch.pooled.shape[1]
    header[_DT_LAT] = DTYPE_CODE[batch.latents.dtype]
    header[_DT_TXT] = DTYPE_CODE[batch.text[0].dtype] if n else 0
    header[_DT_POOL] = DTYPE_CODE[batch.pooled.dtype]
    header[_ENCODE_US], header[_BAD_ROWS] = int(encode_s * 1e6), bad_rows
    for i, x in enumerate(packed):
        header[_STREAMS + 2 * i], header[_STREAMS + 2 * i + 1] = x.shape
    meta = torch.stack([*lengths, batch.rows.to(device)]).to(torch.int64)     # (n + 1, B)
    tensors = [header.to(device)]
    if h * w:
        tensors.append(batch.latents.contiguous())
    tensors += [meta, *(x.contiguous() for x in packed), batch.pooled.contiguous()]
    return tensors


def pack_error(message: str, device: torch.device) -> list[Tensor]:
    data = torch.frombuffer(bytearray(message.encode()[:65536] or b"?"), dtype=torch.uint8)
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[_MAGIC], header[_VERSION], header[_KIND], header[_MSG_LEN] = MAGIC, VERSION, ERROR, data.numel()
    return [header.to(device), data.to(device)]


def pack_end(device: torch.device) -> list[Tensor]:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[_MAGIC], header[_VERSION], header[_KIND] = MAGIC, VERSION, END
    return [header.to(device)]


def read_header(header: Tensor, src: int) -> dict:
    h = header.tolist()
    if h[_MAGIC] != MAGIC:
        raise TransportError(f"message from rank {src} is not a batch header (magic {h[_MAGIC]:#x}); "
                             "are both sides running the same code?")
    if h[_VERSION] != VERSION:
        raise TransportError(f"rank {src} speaks transport version {h[_VERSION]}, this rank {VERSION}: "
                             "run the same code on every node")
    return {"kind": h[_KIND], "step": h[_STEP], "B": h[_B], "C": h[_C], "h": h[_H], "w": h[_W],
            "n_text": h[_N_TEXT], "P": h[_P], "dt_lat": DTYPES[h[_DT_LAT]], "dt_txt": DTYPES[h[_DT_TXT]],
            "dt_pool": DTYPES[h[_DT_POOL]], "encode_s": h[_ENCODE_US] / 1e6, "bad_rows": h[_BAD_ROWS],
            "msg_len": h[_MSG_LEN],
            "streams": [(h[_STREAMS + 2 * i], h[_STREAMS + 2 * i + 1]) for i in range(h[_N_TEXT])]}


def empty_tensors(meta: dict, device: torch.device) -> list[Tensor]:
    """Receive buffers for the tensors a header announces, in wire order."""
    B = meta["B"]
    out = []
    if meta["h"] * meta["w"]:
        out.append(torch.empty(B, meta["C"], meta["h"], meta["w"], dtype=meta["dt_lat"], device=device))
    out.append(torch.empty(meta["n_text"] + 1, B, dtype=torch.int64, device=device))
    out += [torch.empty(n, d, dtype=meta["dt_txt"], device=device) for n, d in meta["streams"]]
    out.append(torch.empty(B, meta["P"], dtype=meta["dt_pool"], device=device))
    return out


def unpack(meta: dict, tensors: list[Tensor]) -> Batch:
    """Rebuild the Batch: each stream right-padded to the longest caption in this batch."""
    B, n = meta["B"], meta["n_text"]
    if meta["h"] * meta["w"]:
        latents, rest = tensors[0], tensors[1:]
    else:
        latents = torch.empty(B, meta["C"], 0, 0, dtype=meta["dt_lat"], device=tensors[0].device)
        rest = tensors
    info, packed, pooled = rest[0], rest[1 : 1 + n], rest[1 + n]
    text, masks = [], []
    for i, x in enumerate(packed):
        lengths = info[i]
        longest = max(int(lengths.max()), 1) if B else 1
        mask = torch.arange(longest, device=x.device)[None, :] < lengths[:, None]       # (B, L_i)
        full = x.new_zeros(B, longest, x.shape[1])                                       # (B, L_i, D_i)
        full[mask] = x
        text.append(full)
        masks.append(mask)
    return Batch(latents=latents, text=tuple(text), text_mask=tuple(masks), pooled=pooled, step=meta["step"],
                 rows=info[n])


def broadcast_batches(batches: list[Batch], *, src: int, group, device: torch.device) -> list[Batch]:
    """`src`'s batches on every rank of `group` (src passes its own, the others get copies): each batch
    travels in the wire format, header first."""
    is_src = dist.get_rank() == src
    count = torch.tensor([len(batches) if is_src else 0], device=device)
    dist.broadcast(count, src=src, group=group)
    out = []
    for i in range(int(count)):
        if is_src:
            tensors = pack(batches[i].to(device))
            for t in tensors:
                dist.broadcast(t, src=src, group=group)
            out.append(batches[i])
            continue
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
        dist.broadcast(header, src=src, group=group)
        meta = read_header(header.cpu(), src)
        rest = empty_tensors(meta, device)
        for t in rest:
            dist.broadcast(t, src=src, group=group)
        out.append(unpack(meta, rest))
    return out


def wire_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------------
# Sending (loader side)
# --------------------------------------------------------------------------------------------------


class Sender:
    """Asynchronous sends with at most `max_in_flight` messages outstanding (backpressure: a loader
    never runs further ahead of its model ranks than that). A failed send names its real cause: the
    other messages in flight are probed too, so every model rank that died is named, not only the one
    whose message happened to be the oldest."""

    def __init__(self, *, group: dist.ProcessGroup | None, max_in_flight: int, timeout_s: float):
        self.group = group
        self.max_in_flight = max(1, max_in_flight)
        self.timeout = timedelta(seconds=timeout_s)
        self._in_flight: deque = deque()  # (works, tensors, dst): tensors stay referenced until sent
        self.bytes_sent = 0

    def send(self, tensors: list[Tensor], dst: int) -> None:
        works = []
        try:
            for t in tensors:
                works.append(dist.isend(t, dst, group=self.group))
        except Exception as error:  # gloo refuses a send to a peer whose connection is already closed
            raise self._diagnose(error, dst) from error
        self._in_flight.append((works, tensors, dst))
        self.bytes_sent += wire_bytes(tensors)
        while len(self._in_flight) > self.max_in_flight:
            self._wait_oldest()

    def flush(self) -> None:
        while self._in_flight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _, dst = self._in_flight.popleft()
        for work in works:
            try:
                work.wait(self.timeout)
            except Exception as error:
                raise self._diagnose(error, dst) from error

    def _diagnose(self, error: BaseException, dst: int) -> TransportError:
        """Which model ranks died: probe the sends still in flight (briefly: the run is ending anyway)."""
        first = peer_error(error, f"model rank {dst}", self.timeout)
        dead = {dst} if "exited or crashed" in str(first) else set()
        for works, _, other in self._in_flight:
            if other in dead:
                continue
            try:
                works[0].wait(timedelta(milliseconds=200))
            except Exception as probe:
                if "exited or crashed" in str(peer_error(probe, "", self.timeout)):
                    dead.add(other)
        if len(dead) > 1:
            return peer_error(error, "model ranks " + ", ".join(map(str, sorted(dead))), self.timeout)
        if dead and dst not in dead:
            return peer_error(error, f"model rank {dead.pop()}", self.timeout)
        return first


# --------------------------------------------------------------------------------------------------
# Receiving (model side)
# --------------------------------------------------------------------------------------------------


_DEATH = ("connection closed", "connection reset", "broken pipe", "remote process exited", "peer closed",
          "remote end closed")


def peer_died(error: BaseException) -> bool:
    """Whether a failed communication call failed because the process at the other end is gone."""
    return any(mark in str(error).lower() for mark in _DEATH)


def peer_error(error: BaseException, peer: str, timeout: timedelta) -> TransportError:
    """The message for a failed wait on `peer`: it exited or crashed (its connection closed), it stayed
    silent past the timeout, or something else (the original error)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    low = text.lower()
    if peer_died(error):
        return TransportError(f"{peer} exited or crashed ({first[:200]}); its own log says why. A process "
                              "killed with SIGKILL, e.g. by the kernel's out-of-memory killer, prints nothing: "
                              "check torchrun's report of its exit code and the node's memory")
    if "timed out" in low or "timeout" in low:
        return TransportError(f"no message from {peer} within {timeout.total_seconds():.0f} s; it may be "
                              "stuck, or still loading encoders (raise --ranks.timeout_s)")
    return TransportError(f"communication with {peer} failed: {first[:300]}")


def receive(src: int, *, group, device: torch.device, timeout: timedelta) -> Message:
    """Receive one whole message from `src` (blocking, bounded by `timeout`)."""
    def recv(tensor: Tensor) -> Tensor:
        try:  # posting fails at once when the connection closed while this rank was busy elsewhere
            dist.irecv(tensor, src, group=group).wait(timeout)
        except Exception as error:
            raise peer_error(error, f"loader rank {src}", timeout) from error
        return tensor

    header = recv(torch.empty(HEADER_LEN, dtype=torch.int64, device=device))
    meta = read_header(header.cpu(), src)
    if meta["kind"] == END:
        return Message(END, nbytes=header.numel() * 8)
    if meta["kind"] == ERROR:
        data = recv(torch.empty(meta["msg_len"], dtype=torch.uint8, device=device))
        return Message(ERROR, error=bytes(data.cpu().tolist()).decode(errors="replace"))
    tensors = [recv(t) for t in empty_tensors(meta, device)]
    stats = {"encode_s": meta["encode_s"], "bad_rows": meta["bad_rows"]}
    return Message(meta["kind"], batch=unpack(meta, tensors), stats=stats,
                   nbytes=HEADER_LEN * 8 + wire_bytes(tensors))
