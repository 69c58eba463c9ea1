import pytest

from jaxpipe.config import load_config
from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.partition import Partition, StageCosts, balanced, resolve_partition


def test_counts_and_ranges_agree():
    a = Partition.from_counts([3, 1, 4])
    b = Partition.from_ranges([[0, 3], [3, 4], [4, 8]], 8)
    assert a == b and a.counts == [3, 1, 4]
    s = a.stage(2)
    assert (s.first, s.last, list(s.layers)) == (False, True, [4, 5, 6, 7])


def test_even_split_spreads_the_remainder():
    assert Partition.even(10, 4).counts == [3, 3, 2, 2]


@pytest.mark.parametrize(
    ("ranges", "n", "message"),
    [
        ([[0, 2], [3, 8]], 8, "partition has a gap: layers 2..2 belong to no stage (stage 1 starts at 3)"),
        ([[0, 4], [3, 8]], 8, "partition overlaps: stage 1 starts at layer 3"),
        ([[0, 4], [4, 4], [4, 8]], 8, "partition stage 1 is empty: range [4, 4) holds no layer"),
        ([[0, 4], [4, 6]], 8, "partition ends at layer 6 but the model has 8: layers 6..7 belong to no stage"),
        ([[0, 4], [4, 9]], 8, "partition reaches layer 8 but the model has only 8 layers"),
    ],
)
def test_bad_ranges_are_rejected(ranges, n, message):
    with pytest.raises(ConfigError) as e:
        Partition.from_ranges(ranges, n)
    assert message in str(e.value)


def test_bad_counts_are_rejected():
    with pytest.raises(ConfigError, match=r"stage 1 has 0 layers"):
        Partition.from_counts([4, 0, 4])
    with pytest.raises(ConfigError, match=r"add up to 7 layers but the model has 8"):
        Partition.from_counts([4, 3], 8)


def test_balanced_gives_the_head_stage_fewer_layers():
    cfg = load_config(None, ["model.preset=xl"]).model
    costs = StageCosts.estimate(cfg)
    # The head's FLOPs are 1.75 layers; with its float32 logits traffic it measures ~2.8 on H100.
    assert 2.0 < costs.head / costs.layer < 3.0
    part = balanced(24, 4, costs)
    assert sum(part.counts) == 24
    assert part.counts[-1] < 6 and max(part.counts) == 7
    # The slowest stage is better than the even split's (which puts 6 layers next to the head).
    def worst(p):
        return max(c * costs.layer + (costs.embedding if i == 0 else 0) + (costs.head if i == 3 else 0)
                   for i, c in enumerate(p.counts))
    assert worst(part) < worst(Partition.even(24, 4))


def test_balanced_follows_host_speed_weights():
    costs = StageCosts(layer=1.0, embedding=0.0, head=0.0)
    assert balanced(12, 2, costs).counts == [6, 6]
    assert balanced(12, 2, costs, weights=[2.0, 1.0]).counts == [8, 4]
    assert balanced(12, 3, costs, weights=[1.0, 1.0, 2.0]).counts == [3, 3, 6]


def test_balanced_refuses_more_stages_than_layers():
    with pytest.raises(ConfigError, match="cannot split 3 layers over 4 stages"):
        balanced(3, 4, StageCosts(1, 0, 0))


def test_resolve_partition_from_config_values():
    m = load_config(None).model
    assert resolve_partition([3, 5], m, 2).counts == [3, 5]
    assert resolve_partition([[0, 1], [1, 8]], m, 2).counts == [1, 7]
    assert resolve_partition("even", m, 4).counts == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="parallel.partition has 2 stages but the schedule cuts 4 chunks"):
        resolve_partition([4, 4], m, 4)
    with pytest.raises(ConfigError, match="'lopsided' is not 'balanced', 'even'"):
        resolve_partition("lopsided", m, 4)
