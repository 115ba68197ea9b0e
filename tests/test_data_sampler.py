"""The bucket sampler as a pure function of (seed, step, model rank)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sd3.data.sampler import BucketSampler
from sd3.data.schema import DataError


def buckets_of(counts: list[int]) -> list[np.ndarray]:
    """Bucket k owns a contiguous block of row ids (ascending, as in the index)."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [np.arange(starts[k], starts[k + 1], dtype=np.uint32) for k in range(len(counts))]


def epoch_rows(s: BucketSampler, epoch: int = 0) -> np.ndarray:
    spe = s.steps_per_epoch
    return np.concatenate([s.global_rows(t) for t in range(epoch * spe, (epoch + 1) * spe)])


def bucket_id(rows: np.ndarray, counts: list[int]) -> np.ndarray:
    return np.searchsorted(np.cumsum(counts), rows, side="right")


def test_every_row_exactly_once_per_epoch_when_nothing_is_dropped():
    counts = [48, 24, 72, 12]                                      # multiples of the global batch 12
    s = BucketSampler(buckets_of(counts), batch_size=4, num_model_ranks=3, seed=7)
    assert s.steps_per_epoch == sum(counts) // 12
    for epoch in range(3):
        rows = epoch_rows(s, epoch)
        assert np.array_equal(np.sort(rows), np.arange(sum(counts)))


def test_no_row_twice_in_an_epoch_and_small_buckets_dropped():
    counts = [50, 31, 7, 100]                                      # 7 < global batch 12: dropped
    s = BucketSampler(buckets_of(counts), batch_size=4, num_model_ranks=3, seed=1, names=["a", "b", "c", "d"])
    assert s.steps_per_epoch == 50 // 12 + 31 // 12 + 100 // 12
    for epoch in range(3):
        rows = epoch_rows(s, epoch)
        assert len(np.unique(rows)) == len(rows)
        assert not np.isin(rows, np.arange(81, 88)).any()          # bucket c
    assert "1 bucket(s) smaller than one global batch of 12 rows dropped (7 rows: c)" in s.report()
    # the tail left out of an epoch is different rows in different epochs
    assert not np.array_equal(np.sort(epoch_rows(s, 0)), np.sort(epoch_rows(s, 1)))


def test_fill_sees_every_row_every_epoch_with_repeats_only_to_complete_batches():
    counts = [50, 31, 7]
    s = BucketSampler(buckets_of(counts), batch_size=4, num_model_ranks=3, seed=1, small_buckets="fill")
    assert s.steps_per_epoch == 5 + 3 + 1
    rows = epoch_rows(s)
    assert np.array_equal(np.unique(rows), np.arange(sum(counts)))
    assert len(rows) - sum(counts) == s.steps_per_epoch * 12 - sum(counts)
    assert "filled by repeating rows" in s.report()
    for t in range(s.steps_per_epoch):                             # a filled batch stays in its bucket
        assert len(set(bucket_id(s.global_rows(t), counts))) == 1


def test_all_model_ranks_get_the_same_bucket_and_disjoint_slices():
    counts = [40, 40, 40]
    s = BucketSampler(buckets_of(counts), batch_size=5, num_model_ranks=4, seed=3, small_buckets="fill")
    for t in range(20):
        per_rank = [s.rows(t, r) for r in range(4)]
        assert {int(b) for r in per_rank for b in bucket_id(r, counts)} == {s.bucket_of(t)}
        assert np.array_equal(np.concatenate(per_rank), s.global_rows(t))
        assert all(len(r) == 5 for r in per_rank)


def test_deterministic_and_seed_dependent():
    counts = [100, 60, 30]
    make = lambda seed: BucketSampler(buckets_of(counts), batch_size=3, num_model_ranks=2, seed=seed)  # noqa: E731
    a, b, c = make(5), make(5), make(6)
    steps = [0, 1, 17, 31, 32, 500, 10_000]
    assert all(np.array_equal(a.global_rows(t), b.global_rows(t)) for t in steps)
    assert not all(np.array_equal(a.global_rows(t), c.global_rows(t)) for t in steps)
    assert make(-1).global_rows(0).shape == (6,)                   # any int seed works


def test_resume_needs_only_the_step():
    counts = [100, 60, 30]
    running = BucketSampler(buckets_of(counts), batch_size=3, num_model_ranks=2, seed=9)
    spe = running.steps_per_epoch
    trace = [running.global_rows(t) for t in range(3 * spe)]       # three epochs in order
    for resume_at in (0, 5, spe - 1, spe, 2 * spe + 3):
        resumed = BucketSampler(buckets_of(counts), batch_size=3, num_model_ranks=2, seed=9)
        for t in range(resume_at, 3 * spe):
            assert np.array_equal(resumed.global_rows(t), trace[t])
    # epochs are reshuffled
    assert [running.bucket_of(t) for t in range(spe)] != [running.bucket_of(t) for t in range(spe, 2 * spe)]


def test_buckets_are_drawn_in_proportion_to_what_they_have_left():
    counts = [600, 200, 200]                                       # 60, 20, 20 batches of 10
    s = BucketSampler(buckets_of(counts), batch_size=10, num_model_ranks=1, seed=0)
    first = np.array([s.bucket_of(e * s.steps_per_epoch) for e in range(3000)])
    assert abs((first == 0).mean() - 0.6) < 0.04                   # P(first batch from a bucket) = its share
    # and within an epoch, a bucket's batches are spread over the whole epoch, not bunched at one end
    order = np.array([s.bucket_of(t) for t in range(s.steps_per_epoch)])
    for k in range(3):
        assert abs(np.flatnonzero(order == k).mean() / s.steps_per_epoch - 0.5) < 0.15


def test_held_out_rows_never_appear():
    counts = [60, 40]
    held = np.array([0, 5, 59, 60, 99])
    s = BucketSampler(buckets_of(counts), batch_size=5, num_model_ranks=2, seed=2, exclude=held,
                      small_buckets="fill")
    assert s.train_counts.tolist() == [57, 38]
    rows = np.concatenate([epoch_rows(s, e) for e in range(3)])
    assert not np.isin(rows, held).any()
    assert np.array_equal(np.unique(rows), np.setdiff1d(np.arange(100), held))


def test_too_small_for_one_global_batch_is_a_clear_error():
    with pytest.raises(DataError, match=r"no bucket has a full global batch of 24 rows.*small_buckets=fill"):
        BucketSampler(buckets_of([10, 20]), batch_size=8, num_model_ranks=3, seed=0)
    s = BucketSampler(buckets_of([10, 20]), batch_size=8, num_model_ranks=3, seed=0, small_buckets="fill")
    assert s.steps_per_epoch == 2
    with pytest.raises(ValueError, match="negative"):
        s.global_rows(-1)
    with pytest.raises(ValueError, match="model rank 3"):
        s.rows(0, 3)


def test_thread_safe():
    counts = [300, 200, 100]
    ref = BucketSampler(buckets_of(counts), batch_size=4, num_model_ranks=2, seed=4)
    steps = list(range(0, 4 * ref.steps_per_epoch, 3))
    expected = {t: ref.global_rows(t) for t in steps}
    shared = BucketSampler(buckets_of(counts), batch_size=4, num_model_ranks=2, seed=4)
    errors = []

    def work(offset: int) -> None:
        for t in steps[offset::4]:
            if not np.array_equal(shared.global_rows(t), expected[t]):
                errors.append(t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
