"""Sharded model ranks (`train.parallel=fsdp|hsdp`): the same training as DDP, checkpoints that resume
in either mode, and the shapes that cannot shard refused before anything starts.

The multi-process tests start real torchrun processes on gloo (1 loader rank feeding the model ranks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sd3.checkpoint.read import is_sharded, list_checkpoints, load_part
from sd3.config import ConfigError, TrainConfig
from sd3.dist.parallel import shard_groups
from sd3.dist.rankmap import RankMap
from tests.test_distributed import run


def ranks(world: int, loaders_per_node: int, models_per_loader: int, local_world: int) -> RankMap:
    return RankMap.generate(world_size=world, local_world_size=local_world, loaders_per_node=loaders_per_node,
                            models_per_loader=models_per_loader)


# -- the shape of the sharding, checked before anything starts -------------------------------------------


def test_fsdp_shards_over_every_model_rank_and_ddp_over_none():
    two_nodes = ranks(8, 1, 3, 4)                                # loaders 0 and 4
    assert shard_groups(TrainConfig(parallel="fsdp"), two_nodes, 4) == [(1, 2, 3, 5, 6, 7)]
    assert shard_groups(TrainConfig(parallel="ddp"), two_nodes, 4) == []


def test_hsdp_shards_within_a_node_by_default_or_in_groups_of_the_size_given():
    two_nodes = ranks(10, 1, 4, 5)
    assert shard_groups(TrainConfig(parallel="hsdp"), two_nodes, 5) == [(1, 2, 3, 4), (6, 7, 8, 9)]
    assert shard_groups(TrainConfig(parallel="hsdp", hsdp_shard_size=2), two_nodes, 5) == \
        [(1, 2), (3, 4), (6, 7), (8, 9)]


@pytest.mark.parametrize(("cfg", "world", "match"), [
    (TrainConfig(parallel="fsdp"), (2, 1, 1, 2), r"train.parallel=fsdp shards the model over the model ranks, but "
                                                 r"this run has 1: use --train.parallel=ddp"),
    (TrainConfig(parallel="hsdp"), (4, 1, 3, 4), r"one node's model ranks \(3 per node\) gives \[3\]"),
    (TrainConfig(parallel="hsdp", hsdp_shard_size=4), (7, 1, 6, 7), r"gives \[4, 2\]: set "
                                                                    r"--train.hsdp_shard_size to a divisor of 6"),
    (TrainConfig(parallel="hsdp", hsdp_shard_size=1), (5, 1, 4, 5), r"gives \[1, 1, 1, 1\]"),
])
def test_a_shape_that_cannot_shard_is_refused_in_one_line(cfg, world, match):
    with pytest.raises(ConfigError, match=match) as caught:
        shard_groups(cfg, ranks(*world), world[-1])
    assert "\n" not in str(caught.value)


def test_hsdp_shard_size_without_hsdp_is_refused(tiny_args, tmp_path):
    from sd3.config import apply_overrides, preset

    cfg = apply_overrides(preset("tiny"), ["--train.hsdp_shard_size=2"])
    with pytest.raises(ConfigError, match=r"train.hsdp_shard_size=2 .* is for --train.parallel=hsdp only"):
        cfg.validate()


# -- training and checkpoints, with real processes ---------------------------------------------------------


def weights(run_dir: Path, part: str) -> dict[str, torch.Tensor]:
    """The newest checkpoint's `model` or `ema` as whole tensors, whichever layout it has."""
    return load_part(list_checkpoints(run_dir)[-1][1], part)


def validation(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"validation loss ([0-9.]+)", out)]


def losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", out, flags=re.M)]


# Activation checkpointing and patch masking (its patch-mixer blocks are sharded too), two micro-batches
# per step (FSDP's gradient sync only on the last), EMA every step, fp32: the modes must agree to rounding.
COMMON = ["--train.accumulation_steps=2", "--train.ema_every=1", "--train.activation_checkpointing=true",
          "--train.precision=fp32", "--model.mask_ratio=0.5", "--model.mixer_depth=1", "--log.val_every=2",
          "--log.sample_every=0"]


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_and_resumes_exactly(tiny_args, tmp_path):
    rc, out = run(tiny_args(tmp_path / "ddp", "--steps", "4", "--train.parallel=ddp", *COMMON))
    assert rc == 0, out[-3000:]
    ddp_losses, ddp_out = losses(out), out
    rc, out = run(tiny_args(tmp_path / "fsdp", "--steps", "4", "--train.parallel=fsdp", *COMMON))
    assert rc == 0, out[-3000:]
    assert "on 2 model rank(s) (fsdp: each holds 1/2 of the model)" in out, out[-3000:]
    assert len(losses(out)) == 4 and losses(out) == pytest.approx(ddp_losses, rel=1e-4), (losses(out), ddp_losses)
    # Validation and the final sample grid ran through the sharded model on every model rank.
    assert validation(out) == pytest.approx(validation(ddp_out), rel=1e-4) and len(validation(out)) == 2
    assert "sample grid:" in out and list((tmp_path / "fsdp" / "samples").glob("step_00000004.png"))
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "ddp", name), weights(tmp_path / "fsdp", name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")

    # 2 steps under fsdp, then --resume auto to 4: the same weights as 4 straight steps, bit for bit.
    rc, out = run(tiny_args(tmp_path / "split", "--steps", "2", "--train.parallel=fsdp", *COMMON))
    assert rc == 0, out[-3000:]
    rc, out = run(tiny_args(tmp_path / "split", "--steps", "4", "--resume", "auto", "--train.parallel=fsdp",
                            *COMMON))
    assert rc == 0 and "resuming from" in out, out[-3000:]
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "fsdp", name), weights(tmp_path / "split", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # The sharded checkpoint resumes under ddp (inference reads it as tests/test_sharded_checkpoints.py shows).
    rc, out = run(tiny_args(tmp_path / "split", "--steps", "5", "--resume", "auto", "--train.parallel=ddp", *COMMON))
    assert rc == 0 and "resuming from" in out and "step 5/5" in out, out[-3000:]
    assert [is_sharded(p) for _, p in list_checkpoints(tmp_path / "split")][-2:] == [True, False]
    # A new sharded run starts from the sharded checkpoint's weights and EMA, each rank reading its own part.
    sharded = list_checkpoints(tmp_path / "split")[-2][1]
    rc, out = run(tiny_args(tmp_path / "stage2", "--steps", "1", "--init_from", str(sharded), "--train.parallel=fsdp",
                            *COMMON))
    assert rc == 0 and "step 1/1" in out, out[-3000:]


FOUR_MODEL_RANKS = ["--ranks.loaders_per_node=1", "--ranks.models_per_loader=4"]


@pytest.mark.slow
def test_hsdp_trains_as_ddp_does(tiny_args, tmp_path):
    """4 model ranks as 2 shard groups of 2 (a 2-D mesh: replicated across groups, sharded within)."""
    common = [*COMMON, *FOUR_MODEL_RANKS, "--steps", "3", "--log.val_every=0"]
    rc, out = run(tiny_args(tmp_path / "ddp", "--train.parallel=ddp", *common), nproc=5, timeout=360)
    assert rc == 0, out[-3000:]
    ddp_losses = losses(out)
    rc, out = run(tiny_args(tmp_path / "hsdp", "--train.parallel=hsdp", "--train.hsdp_shard_size=2", *common),
                  nproc=5, timeout=360)
    assert rc == 0, out[-3000:]
    assert "on 4 model rank(s) (hsdp: 2 copies of the model, each sharded over 2 ranks)" in out, out[-3000:]
    assert losses(out) == pytest.approx(ddp_losses, rel=1e-4), (losses(out), ddp_losses)
    a, b = weights(tmp_path / "ddp", "model"), weights(tmp_path / "hsdp", "model")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp_in_bf16_trains(tiny_args, tmp_path):
    """bf16: the gathered weights are bf16 for compute, gradients reduced in fp32, the shards stay fp32."""
    rc, out = run(tiny_args(tmp_path / "run", "--steps", "4", "--train.parallel=fsdp", "--train.precision=bf16",
                            "--encoders.dtype=bfloat16", "--log.val_every=2"))
    assert rc == 0, out[-3000:]
    found = losses(out)
    assert len(found) == 4 and all(x == x and x < 10 for x in found) and found[-1] < found[0], found
    state = weights(tmp_path / "run", "model")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


@pytest.mark.slow
def test_in_training_evaluation_under_fsdp_scores_as_ddp_does(tiny_args, tmp_path):
    """FID through the EMA in a sharded model: 5 evaluation rows in batches of 2 give the model ranks 2 and 1
    batches, so the rank with fewer generates a throwaway one (every forward is a collective)."""
    common = ["--steps", "2", "--data.val_rows=6", "--log.eval_every=2", "--log.eval_num=5", "--log.eval_steps=2",
              "--log.eval_inception=random", "--data.batch_size=2", "--train.precision=fp32", "--log.val_every=0",
              "--log.sample_every=0"]
    found = {}
    for mode in ("ddp", "fsdp"):
        rc, out = run(tiny_args(tmp_path / mode, f"--train.parallel={mode}", *common))
        assert rc == 0, out[-3000:]
        found[mode] = [float(x) for x in re.findall(r"eval fid ([0-9.]+)", out)]
    assert len(found["fsdp"]) == 1 and found["fsdp"] == pytest.approx(found["ddp"], rel=1e-3), found
