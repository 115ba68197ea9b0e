"""RankMap: the seed's maps (given and generated), the colocated case, and every kind of invalid map."""

import re

import numpy as np
import pytest

from sd3.config import ConfigError, RankConfig, apply_overrides, from_dict, preset, to_dict
from sd3.dist.rankmap import RankMap, RankMapError

# The original system: 8 GPUs per node, ranks 0-1 load, 2-7 train; the same map shifted by 8 per node.
SEED_8 = {0: [2, 3, 4], 1: [5, 6, 7]}
SEED_32 = {0: [2, 3, 4], 1: [5, 6, 7], 8: [10, 11, 12], 9: [13, 14, 15],
           16: [18, 19, 20], 17: [21, 22, 23], 24: [26, 27, 28], 25: [29, 30, 31]}


def seed_generated(world_size):
    return RankMap.generate(world_size=world_size, local_world_size=8,
                            loaders_per_node=2, models_per_loader=3)


# --------------------------------------------------------------------------------------------------
# Valid maps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "seed_map"), [(8, SEED_8), (32, SEED_32)])
def test_seed_maps_given_and_generated_are_equal(world_size, seed_map):
    given = RankMap.from_loader_to_model(seed_map, world_size=world_size)
    generated = seed_generated(world_size)
    assert given == generated
    assert generated.to_dict() == seed_map
    # the seed's config defaults (2 loaders x 3 models per node) generate it through from_config
    assert RankMap.from_config(RankConfig(), world_size=world_size, local_world_size=8) == given


def test_seed_32_roles_and_feeds():
    rm = RankMap.from_loader_to_model(SEED_32, world_size=32)
    assert rm.loaders == (0, 1, 8, 9, 16, 17, 24, 25)
    assert rm.model_ranks == tuple(r for r in range(32) if r % 8 >= 2)
    assert not rm.colocated
    assert [rm.role(r) for r in range(8)] == ["loader"] * 2 + ["model"] * 6
    assert rm.is_loader(17) and not rm.is_model(17)
    assert rm.is_model(31) and not rm.is_loader(31)
    assert rm.feeds(9) == (13, 14, 15)
    assert rm.loader_of(29) == 25
    assert rm.loader_index(16) == 4
    # DDP group rank = position among the sorted model ranks (24 of them)
    assert [rm.model_index(m) for m in (2, 7, 10, 31)] == [0, 5, 6, 23]
    assert sorted(rm.model_index(m) for m in rm.model_ranks) == list(range(24))
    # every model rank has exactly one loader, and feeds() agrees with loader_of()
    for loader in rm.loaders:
        assert all(rm.loader_of(m) == loader for m in rm.feeds(loader))


def test_feeds_keeps_map_order_and_dict_order_does_not_matter():
    a = RankMap.from_loader_to_model({3: [2, 1, 0]}, world_size=4)
    b = RankMap.from_loader_to_model({3: (2, 1, 0)}, world_size=4)
    assert a.feeds(3) == (2, 1, 0)
    assert a == b
    assert a.model_ranks == (0, 1, 2) and a.model_index(2) == 2
    shuffled = dict(reversed(list(SEED_32.items())))
    assert RankMap.from_loader_to_model(shuffled, world_size=32) == seed_generated(32)


def test_demo_map_three_processes():
    rm = RankMap.from_loader_to_model({0: [1, 2]}, world_size=3)
    assert rm.loaders == (0,) and rm.model_ranks == (1, 2)
    assert rm.role(0) == "loader" and rm.role(2) == "model"
    # the tiny preset (1 loader x 2 models) generates the same map on one 3-process node
    cfg = preset("tiny").ranks
    assert RankMap.from_config(cfg, world_size=3, local_world_size=3) == rm
    # local_world_size defaults to the world (one node)
    assert RankMap.from_config(cfg, world_size=3) == rm


def test_two_processes_one_loader_one_model():
    rm = RankMap.generate(world_size=2, local_world_size=2, loaders_per_node=1, models_per_loader=1)
    assert rm.to_dict() == {0: [1]}


def test_world_size_one_is_colocated():
    for rm in (RankMap.from_config(RankConfig(), world_size=1, local_world_size=1),
               RankMap.from_config(RankConfig(loader_to_model={0: [0]}), world_size=1),
               RankMap.generate(world_size=1, local_world_size=1, loaders_per_node=2, models_per_loader=3)):
        assert rm.colocated
        assert rm.role(0) == "both" and rm.is_loader(0) and rm.is_model(0)
        assert rm.loaders == (0,) and rm.model_ranks == (0,)
        assert rm.feeds(0) == (0,) and rm.loader_of(0) == 0 and rm.model_index(0) == 0
        assert rm.to_dict() == {0: [0]}
        assert "colocated" in rm.describe()


def test_numpy_int_ranks_are_accepted():
    rm = RankMap.from_loader_to_model({np.int64(0): [np.int32(1), 2]}, world_size=3)
    assert rm.to_dict() == {0: [1, 2]} and type(rm.loaders[0]) is int


def test_describe_has_one_line_per_loader():
    text = RankMap.from_loader_to_model(SEED_32, world_size=32).describe()
    lines = text.splitlines()
    assert lines[0] == "rank map: world size 32, 8 loaders, 24 model ranks"
    assert len(lines) == 1 + 8
    assert lines[1] == "  loader 0 -> model ranks 2, 3, 4 (model indices 0, 1, 2)"
    assert lines[-1] == "  loader 25 -> model ranks 29, 30, 31 (model indices 21, 22, 23)"


def test_to_dict_round_trips_through_config_json():
    cfg = preset("tiny")
    cfg.ranks.loader_to_model = seed_generated(32).to_dict()
    back = from_dict(to_dict(cfg))  # JSON keys are strings; from_dict restores ints
    assert RankMap.from_config(back.ranks, world_size=32, local_world_size=8) == seed_generated(32)


def test_command_line_map_reaches_rankmap():
    cfg = apply_overrides(preset("tiny"), ["--ranks.loader_to_model={0:[1,2]}"])
    assert RankMap.from_config(cfg.ranks, world_size=3).to_dict() == {0: [1, 2]}


def test_queries_on_the_wrong_rank_name_it():
    rm = RankMap.from_loader_to_model({0: [1, 2]}, world_size=3)
    with pytest.raises(RankMapError, match=r"rank 1 is a model rank, not a loader"):
        rm.feeds(1)
    with pytest.raises(RankMapError, match=r"rank 0 is a loader, not a model rank"):
        rm.loader_of(0)
    with pytest.raises(RankMapError, match=r"rank 0 is a loader"):
        rm.model_index(0)
    with pytest.raises(RankMapError, match=r"rank 3 is outside the world \[0, 3\)"):
        rm.role(3)
    with pytest.raises(RankMapError, match=r"rank 2 is a model rank"):
        rm.loader_index(2)


# --------------------------------------------------------------------------------------------------
# Invalid maps: each error names the rank(s) and the fix
# --------------------------------------------------------------------------------------------------

INVALID = [
    # (map, world size, patterns that must all appear in the message)
    pytest.param({0: [1, 2, 3]}, 3, [r"model rank 3 \(fed by loader 0\) is outside the world \[0, 3\)",
                                      r"launch more processes"], id="model-rank-outside-world"),
    pytest.param({0: [1, -1], 2: [3]}, 4, [r"model rank -1 \(fed by loader 0\) is outside the world \[0, 4\)",
                                                  r"use ranks in \[0, 4\)"],
                 id="negative-rank"),
    pytest.param({4: [1, 2, 3], 0: []}, 4, [r"loader rank 4 is outside the world \[0, 4\)"],
                 id="loader-outside-world"),
    pytest.param({0: [1, 2], 1: [3]}, 4, [r"rank 1 is listed as a loader and as a model rank",
                                          r"one role"], id="loader-and-model"),
    pytest.param({0: [0, 1]}, 2, [r"rank 0 is listed as a loader and as a model rank"],
                 id="loader-feeds-itself"),
    pytest.param({0: [2, 3], 1: [3, 4]}, 5, [r"model rank 3 is fed by loaders 0 and 1", r"one loader's list"],
                 id="two-loaders"),
    pytest.param({0: [1, 2]}, 6, [r"ranks 3, 4, 5 have no role", r"add them to a loader's list",
                                  r"launch fewer processes"], id="ranks-without-role"),
    pytest.param({0: [1, 2], 3: []}, 4, [r"loader 3 feeds no model rank \(idle\)"], id="idle-loader"),
    pytest.param({0: [1, 2, 1]}, 3, [r"model rank 1 is listed twice for loader 0", r"list it once"],
                 id="duplicate-in-list"),
    pytest.param({}, 3, [r"there are no loaders", r"\{0: \[1, 2\]\}"], id="empty-map"),
]


@pytest.mark.parametrize(("mapping", "world_size", "patterns"), INVALID)
def test_invalid_maps_name_the_rank_and_the_fix(mapping, world_size, patterns):
    with pytest.raises(RankMapError) as err:
        RankMap.from_loader_to_model(mapping, world_size=world_size)
    message = str(err.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert "rank map" in message
    assert isinstance(err.value, ConfigError)  # callers that catch bad config catch this too


def test_every_problem_is_listed_at_once():
    with pytest.raises(RankMapError) as err:
        RankMap.from_loader_to_model({0: [1, 1, 9], 2: [1], 3: []}, world_size=5)
    message = str(err.value)
    assert "has 5 problems" in message
    for part in ("model rank 1 is listed twice for loader 0", "model rank 9 (fed by loader 0) is outside",
                 "model rank 1 is fed by loaders 0 and 2", "loader 3 feeds no model rank",
                 "rank 4 has no role"):
        assert part in message


@pytest.mark.parametrize(("mapping", "pattern"), [
    ({"0": [1, 2]}, r"loader key '0' is not an int"),
    ({0.0: [1, 2]}, r"loader key 0\.0 is not an int"),
    ({True: [1, 2]}, r"loader key True is a bool"),
    ({0: [1, "2"]}, r"model rank of loader 0 '2' is not an int"),
    ({0: 1}, r"loader 0 maps to 1, not a list of model ranks"),
    ({0: "12"}, r"loader 0 maps to '12', not a list"),
    ([[0, [1, 2]]], r"is not a dict"),
])
def test_malformed_maps(mapping, pattern):
    with pytest.raises(RankMapError, match=pattern) as err:
        RankMap.from_loader_to_model(mapping, world_size=3)
    assert "e.g." in str(err.value)


def test_world_size_one_with_a_real_map_is_refused():
    with pytest.raises(RankMapError, match=r"world size 1 runs colocated.*drop --ranks.loader_to_model"):
        RankMap.from_config(RankConfig(loader_to_model={0: [1, 2]}), world_size=1)
    with pytest.raises(RankMapError, match=r"world size 1 runs colocated"):
        RankMap.from_loader_to_model(SEED_8, world_size=1)


@pytest.mark.parametrize("world_size", [0, -2, 2.0, True])
def test_bad_world_size(world_size):
    with pytest.raises(RankMapError, match=r"world size .* must be a positive int"):
        RankMap.from_loader_to_model({0: [1]}, world_size=world_size)


def test_generated_map_that_does_not_fit_the_node():
    with pytest.raises(RankMapError) as err:
        RankMap.from_config(RankConfig(), world_size=4, local_world_size=4)  # 2 x (1 + 3) = 8, not 4
    message = str(err.value)
    assert ("--nproc_per_node=4 does not fit --ranks.loaders_per_node=2 x "
            "(1 + --ranks.models_per_loader=3) = 8 processes per node") in message
    assert "--nproc_per_node=8" in message and "--ranks.models_per_loader=1" in message
    assert "--ranks.loaders_per_node=1" in message  # 1 x (1 + 3) = 4 fits as well


def test_generated_map_with_one_seed_node_but_too_few_processes():
    # 8 per node expected, 3 launched: the fix offered keeps 3 per node (1 loader x 2 models)
    with pytest.raises(RankMapError, match=r"--ranks.loaders_per_node=1 --ranks.models_per_loader=2"):
        RankMap.from_config(RankConfig(), world_size=3, local_world_size=3)


def test_generated_map_needs_whole_nodes():
    with pytest.raises(RankMapError, match=r"world size 12 is not a whole number of nodes of 8 processes"):
        RankMap.from_config(RankConfig(), world_size=12, local_world_size=8)


@pytest.mark.parametrize(("loaders", "models"), [(0, 3), (2, 0), (-1, 2)])
def test_generated_map_needs_a_loader_and_a_model(loaders, models):
    cfg = RankConfig(loaders_per_node=loaders, models_per_loader=models)
    with pytest.raises(RankMapError, match=r"must both be at least 1"):
        RankMap.from_config(cfg, world_size=8, local_world_size=8)


def test_explicit_map_ignores_the_generator_settings():
    # a hand-written map for a 4-process node with the seed's (8-per-node) generator defaults
    cfg = RankConfig(loader_to_model={0: [1, 2, 3]})
    assert RankMap.from_config(cfg, world_size=4, local_world_size=4).feeds(0) == (1, 2, 3)
