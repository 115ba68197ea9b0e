from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from sd3.dist.batch import Batch
from sd3.dist.sources import RemoteSource
from sd3.dist.transport import (
    BATCH,
    HEADER_LEN,
    LoaderFailed,
    Sender,
    TransportError,
    empty_tensors,
    pack,
    pack_end,
    pack_error,
    read_header,
    receive,
    unpack,
    wire_bytes,
)
from tests.dist_util import run_ranks


def make_batch(B=4, lengths=((3, 7, 1, 5), (2, 2, 6, 4)), dims=(12, 8), step=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    text, masks = [], []
    for lens, d in zip(lengths, dims):
        L = max(lens)
        mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
        text.append(torch.randn(B, L, d, generator=g).to(dtype) * mask[..., None])
        masks.append(mask)
    return Batch(latents=torch.randn(B, 4, 6, 10, generator=g).to(dtype), text=tuple(text), text_mask=tuple(masks),
                 pooled=torch.randn(B, 3, generator=g).to(dtype), step=step, rows=torch.arange(B) + 100)


def round_trip(batch: Batch) -> Batch:
    tensors = pack(batch)
    meta = read_header(tensors[0], src=0)
    buffers = empty_tensors(meta, torch.device("cpu"))
    assert [b.shape for b in buffers] == [t.shape for t in tensors[1:]]
    return unpack(meta, tensors[1:])


def assert_same(a: Batch, b: Batch):
    assert a.step == b.step
    fields = lambda x: (x.latents, x.pooled, x.rows, *x.text, *x.text_mask)  # noqa: E731
    for x, y in zip(fields(a), fields(b)):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_round_trip(dtype):
    batch = make_batch(dtype=dtype)
    assert_same(round_trip(batch), batch)


def test_receiver_trims_to_its_own_longest_caption():
    piece = make_batch().split(2)[1]               # longest captions 5 and 6 in this half (of 7 and 6)
    out = round_trip(piece)
    assert [x.shape[1] for x in out.text] == [5, 6]
    assert_same(out, piece.trim_text())


def test_only_real_tokens_travel():
    batch = make_batch()
    sent = wire_bytes(pack(batch))
    real_tokens = sum(int(m.sum()) * x.shape[2] for x, m in zip(batch.text, batch.text_mask))
    expected = (HEADER_LEN + 3 * 4) * 8 + 4 * (batch.latents.numel() + batch.pooled.numel() + real_tokens)
    assert sent == expected


def test_left_padded_masks_are_refused():
    batch = make_batch()
    flipped = tuple(m.flip(1) for m in batch.text_mask)
    with pytest.raises(TransportError, match="right-padded"):
        pack(Batch(batch.latents, batch.text, flipped, batch.pooled, batch.step, batch.rows))


def test_header_checks():
    header = pack_end(torch.device("cpu"))[0]
    assert read_header(header, 0)["kind"] != BATCH
    bad = header.clone()
    bad[1] = 99
    with pytest.raises(TransportError, match="transport version 99"):
        read_header(bad, 3)
    with pytest.raises(TransportError, match="not a batch header"):
        read_header(torch.zeros(HEADER_LEN, dtype=torch.int64), 3)


def _exchange(rank, world, fail):
    """Rank 0 sends three batches then END (or an ERROR); rank 1 receives with its prefetch thread."""
    if rank == 0:
        sender = Sender(group=None, max_in_flight=2, timeout_s=30)
        for step in range(3):
            sender.send(pack(make_batch(step=step)), 1)
        sender.send(pack_error("encoder exploded", torch.device("cpu")) if fail else pack_end(torch.device("cpu")), 1)
        sender.flush()
        # Stop requests travel back on the same pair without blocking the data.
        buf = torch.zeros(1, dtype=torch.int64)
        work = dist.irecv(buf, 1)
        work.wait(timedelta(seconds=30))
        return int(buf)
    receiver = RemoteSource(0, ctrl_group=None, device=torch.device("cpu"), depth=2, timeout_s=30)
    got = []
    try:
        for batch in receiver:
            assert_same(batch, make_batch(step=batch.step))
            got.append(batch.step)
    except LoaderFailed as error:
        got.append(str(error))
    dist.send(torch.tensor([len(got)]), 0)
    return got


def test_send_receive_end_and_error_across_processes():
    ok = run_ranks(_exchange, 2, False)
    assert ok[1] == ("ok", [0, 1, 2]) and ok[0] == ("ok", 3)
    failed = run_ranks(_exchange, 2, True)
    assert failed[1][0] == "ok"
    assert failed[1][1][:3] == [0, 1, 2]
    assert "loader rank 0 failed: encoder exploded" in failed[1][1][3]


def _silent_loader(rank, world):
    if rank == 0:
        import time

        time.sleep(4)
        return "slept"
    receiver = RemoteSource(0, ctrl_group=None, device=torch.device("cpu"), depth=2, timeout_s=1)
    try:
        next(receiver)
    except TransportError as error:
        return str(error)


def test_a_silent_loader_times_out_with_a_clear_message():
    out = run_ranks(_silent_loader, 2)
    assert "no message from loader rank 0 within 1 s" in out[1][1]


def _loader_gone_while_busy(rank, world):
    """Rank 0 sends one batch and exits; rank 1 takes it, is busy for a second (a training step), then asks
    for the next one, when the connection is already closed: gloo refuses to even post that receive."""
    if rank == 0:
        sender = Sender(group=None, max_in_flight=1, timeout_s=30)
        sender.send(pack(make_batch(step=0)), 1)
        sender.flush()
        return "gone"
    import time

    first = receive(0, group=None, device=torch.device("cpu"), timeout=timedelta(seconds=30))
    time.sleep(1.0)
    try:
        receive(0, group=None, device=torch.device("cpu"), timeout=timedelta(seconds=30))
    except TransportError as error:
        return first.kind, str(error)
    return first.kind, "received a second message"


def test_a_loader_that_exited_while_the_model_rank_was_busy_is_named():
    out = run_ranks(_loader_gone_while_busy, 2)
    kind, message = out[1][1]
    assert kind == BATCH and message.startswith("loader rank 0 exited or crashed"), out


def test_error_message_is_carried_verbatim():
    tensors = pack_error("ValueError: bad path 'x/y'", torch.device("cpu"))
    meta = read_header(tensors[0], 0)
    assert bytes(tensors[1].tolist()).decode() == "ValueError: bad path 'x/y'" and meta["msg_len"] == 26


def test_dropped_streams_are_not_sent_and_training_sees_the_same_thing():
    from sd3.config import FlowConfig
    from sd3.diffusion.flow import Cond, drop_conditions, dropout_keep
    from sd3.dist.loader import without_dropped

    batch = make_batch(B=4)
    cfg = FlowConfig(p_drop_text=(0.5, 0.5), p_drop_pooled=0.5, p_drop_all=0.2)
    keep = next(k for s in range(100)
                if not (k := dropout_keep(cfg, seed=0, step=s, rank=1, batch_size=4))[:, :2].all())
    sent = round_trip(without_dropped(batch, keep))
    as_trained = lambda b: drop_conditions(Cond(b.text, b.text_mask, b.pooled), keep)  # noqa: E731
    ours, reference = as_trained(sent), as_trained(batch)
    for a, b in zip((*ours.text, *ours.text_mask, ours.pooled), (*reference.text, *reference.text_mask,
                                                                  reference.pooled)):
        L = a.shape[1] if a.dim() > 1 else None
        assert torch.equal(a, b[:, :L] if L is not None else b)
    assert wire_bytes(pack(without_dropped(batch, keep))) < wire_bytes(pack(batch))
