"""Data parallelism on Ray (heron.scaleout): replicas give the single engine's very outputs,
the work really is spread over separate processes, and errors reach the caller as heron's own.

The Ray cluster here is a local one, started by the module's DataParallelLLM on this machine's
cores (each replica gets half of them)."""

from __future__ import annotations

import pytest

from heron import SamplingParams
from heron.config import DataParallelConfig
from heron.errors import HeronError, InvalidRequestError
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS
from heron.scaleout.data_parallel import DataParallelLLM, split_work
from heron.scaleout.replica import EngineReplica
from tests.parity_prompts import PARITY_PROMPTS

ray = pytest.importorskip("ray")

KV_BYTES = 96 * 2**20


@pytest.fixture(scope="module")
def dp_llm():
    path = str(KNOWN_MODELS[DEFAULT_MODEL].locate())
    llm = DataParallelLLM(
        path, dtype="float32", device="cpu", data_parallel_size=2, kv_cache_memory=KV_BYTES
    )
    yield llm
    llm.shutdown()


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


def test_replica_tags_its_outputs(model_path):
    """The actor's class, run in this process: ids unique per replica, its index in metrics."""
    replica = EngineReplica(
        3, 1, {"model": str(model_path), "dtype": "float32", "kv_cache_memory": KV_BYTES}, 0
    )
    with pytest.raises(RuntimeError, match="start"):
        replica.generate(["Hi"], [SamplingParams(max_tokens=2)])
    info = replica.start()
    assert info["replica"] == 3 and info["threads"] == 1
    (out,) = replica.generate(["Hi"], [SamplingParams(temperature=0, max_tokens=3)])
    assert out.request_id.startswith("3-") and out.metrics["replica"] == 3
    assert len(out.outputs[0].token_ids) == 3


def test_greedy_outputs_equal_the_single_engine_and_use_every_replica(dp_llm, llm):
    prompts = [p for p in PARITY_PROMPTS if isinstance(p, str)][:6]
    params = SamplingParams(temperature=0, max_tokens=12)
    ours = dp_llm.generate(prompts, params, use_tqdm=False)
    ref = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in ref]
    assert [o.prompt_token_ids for o in ours] == [o.prompt_token_ids for o in ref]
    assert {o.metrics["replica"] for o in ours} == {0, 1}
    assert len({o.request_id for o in ours}) == len(prompts)
    pids = {info["pid"] for info in dp_llm.replica_info}
    assert len(pids) == 2


def test_chat_and_per_prompt_params(dp_llm, llm):
    convs = [[{"role": "user", "content": q}] for q in ("Hi!", "Name a color.", "Count to 3.")]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (4, 6, 8)]
    ours = dp_llm.chat(convs, params, use_tqdm=False)
    ref = llm.chat(convs, params, use_tqdm=False)
    assert [o.outputs[0].text for o in ours] == [o.outputs[0].text for o in ref]
    assert [len(o.outputs[0].token_ids) for o in ours] == [4, 6, 8]


def test_errors_are_heron_errors(dp_llm):
    too_long = list(range(10, 10 + 5000))  # past the replicas' max_model_len
    with pytest.raises(InvalidRequestError):
        dp_llm.generate([too_long, "fine"], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        dp_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    # The replicas still serve after a request was refused.
    (out,) = dp_llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=2))
    assert len(out.outputs[0].token_ids) == 2


def test_more_cpus_than_the_cluster_has_is_refused(dp_llm):
    with pytest.raises(InvalidRequestError, match="CPUs"):
        DataParallelLLM(data_parallel_size=2, cpus_per_replica=100_000)


def test_shutdown_stops_the_replicas_and_the_cluster(dp_llm):
    """Last in the module (it stops the module's replicas): the local cluster the object
    started goes with them, and a later call says why it cannot run."""
    dp_llm.shutdown()
    assert not ray.is_initialized()
    with pytest.raises(HeronError, match="shut down"):
        dp_llm.generate(["Hi"])
    dp_llm.shutdown()  # twice is harmless (the fixture's teardown calls it again)
