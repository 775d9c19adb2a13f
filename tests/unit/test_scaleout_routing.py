"""Scale-out's parts without a cluster (heron.scaleout): work split over replicas, the
data-parallel settings, prefix affinity's block hashes, and the router's choice of replica
over stand-in replicas. Replicas on a local Ray cluster: tests/scaleout/test_scaleout.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from heron.config import DataParallelConfig
from heron.errors import InvalidRequestError
from heron.scaleout.data_parallel import split_work
from heron.scaleout.prefix_affinity import PrefixAffinity
from heron.scaleout.router import ReplicaRouter


def test_split_work_balances_and_covers_every_item():
    costs = [100, 90, 10, 10, 10, 10, 50, 40]
    shards = split_work(costs, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shards)
    loads = sorted(sum(costs[i] for i in s) for s in shards)
    assert loads == [100, 110, 110]  # the best split: 100 alone leaves 220 for two
    assert split_work([5], 4) == [[0], [], [], []]


def test_config_errors():
    with pytest.raises(InvalidRequestError, match="data_parallel_size"):
        DataParallelConfig(data_parallel_size=0)
    with pytest.raises(InvalidRequestError, match="cpus_per_replica"):
        DataParallelConfig(cpus_per_replica=0)


def test_prefix_affinity_counts_leading_blocks_seen():
    aff = PrefixAffinity(num_replicas=2, block_size=4, max_blocks=3)
    a = aff.block_hashes(list(range(10)))  # two full blocks; the last 2 tokens do not count
    assert len(a) == 2
    # a block's hash depends on what came before it, as in the engines' prefix caches
    assert aff.block_hashes([9, 9, 9, 9, *range(4, 8)])[1] != a[1]
    aff.record(1, a)
    assert aff.matched(a) == [0, 2]
    assert aff.matched(aff.block_hashes([*range(8), 50, 51, 52, 53])) == [0, 2]
    assert aff.matched(aff.block_hashes([0, 1, 2, 99, 4, 5, 6, 7])) == [0, 0]
    aff.record(1, aff.block_hashes(list(range(100, 108))))  # 4 blocks held: the oldest goes
    assert aff.matched(a) == [0, 0]


def test_routing_choices():
    """_pick alone, on a router over stand-in replicas: prefix routing follows what each
    replica has seen within the load slack; least_busy ignores it."""

    class _Stats:
        @staticmethod
        def remote() -> dict:
            return {"num_waiting": 0}

    group = SimpleNamespace(actors=[SimpleNamespace(stats=_Stats)] * 3, get=lambda refs: refs)
    prompt = list(range(64))  # 4 blocks of 16
    prefix = ReplicaRouter(group, max_waiting=8, block_size=16, balance_slack=2)
    prefix.affinity.record(2, prefix.affinity.block_hashes(prompt[:48]))
    prefix.in_flight = [0, 1, 2]
    assert prefix._pick(prompt)[0] == 2  # 3 blocks seen there, 2 more in flight: allowed
    prefix.in_flight = [0, 1, 3]
    assert prefix._pick(prompt)[0] == 0  # past the slack: the least busy
    assert prefix._pick(list(range(100, 164)))[0] == 0  # nothing seen: the least busy
    least = ReplicaRouter(group, max_waiting=8, block_size=16, routing="least_busy")
    least.in_flight = [2, 1, 0]
    assert least._pick(prompt) == (2, [])
    with pytest.raises(InvalidRequestError, match="routing"):
        DataParallelConfig(routing="random")
