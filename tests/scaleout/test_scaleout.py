"""Scale-out on Ray (heron.scaleout): replicas give the single engine's very outputs, the
work really is spread over separate processes, a request a client leaves is aborted inside
its replica, and errors reach the caller as heron's own. The parts that need no cluster:
tests/unit/test_scaleout_routing.py.

The module shares one local Ray cluster with 8 logical CPUs (more than this machine's cores:
the replicas only need to fit, not to run fast), so the offline and the serving replicas can
live side by side; each replica takes one. The HTTP test starts `heron serve
--data-parallel-size 2` in a subprocess, which starts (and stops) a cluster of its own; its
SIGTERM finds requests still running past --shutdown-timeout."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from heron import SamplingParams
from heron.config import DataParallelConfig
from heron.errors import HeronError, InvalidRequestError
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS
from heron.scaleout.cluster import ReplicaGroup
from heron.scaleout.data_parallel import DataParallelLLM
from heron.scaleout.replica import EngineReplica
from heron.scaleout.router import ReplicaRouter
from heron.scaleout.serving_replica import ServingReplica
from heron.server.async_engine import EngineDeadError
from tests.support.prompts import PARITY_PROMPTS
from tests.support.server import assert_shutdown_aborts_what_is_left, start_server

ray = pytest.importorskip("ray")

KV_BYTES = 96 * 2**20
PROMPTS = [p for p in PARITY_PROMPTS if isinstance(p, str)][:6]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def path() -> str:
    return str(KNOWN_MODELS[DEFAULT_MODEL].locate())


@pytest.fixture(scope="module")
def dp_llm(cluster, path):
    llm = DataParallelLLM(
        path,
        dtype="float32",
        device="cpu",
        data_parallel_size=2,
        cpus_per_replica=1,
        kv_cache_memory=KV_BYTES,
    )
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def router(cluster, path):
    kwargs = {"model": path, "dtype": "float32", "device": "cpu", "kv_cache_memory": KV_BYTES}
    group = ReplicaGroup(ServingReplica, DataParallelConfig(2, None, 1), kwargs, 16)
    yield ReplicaRouter(group, max_waiting=16, block_size=16, stats_interval=0.1)
    group.shutdown()


def test_replica_tags_its_outputs(model_path):
    """The actor's class, run in this process: ids unique per replica, its index in metrics."""
    replica = EngineReplica(
        3, 1, {"model": str(model_path), "dtype": "float32", "kv_cache_memory": KV_BYTES}
    )
    with pytest.raises(RuntimeError, match="start"):
        replica.generate(["Hi"], [SamplingParams(max_tokens=2)])
    assert replica.llm_kwargs["seed"] == 0 + 3  # EngineConfig's seed plus its index
    info = replica.start()
    assert info["replica"] == 3 and info["threads"] == 1
    (out,) = replica.generate(["Hi"], [SamplingParams(temperature=0, max_tokens=3)])
    assert out.request_id.startswith("3-") and out.metrics["replica"] == 3
    assert len(out.outputs[0].token_ids) == 3


def test_greedy_outputs_equal_the_single_engine_and_use_every_replica(dp_llm, llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    ours = dp_llm.generate(PROMPTS, params, use_tqdm=False)
    ref = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in ref]
    assert [o.prompt_token_ids for o in ours] == [o.prompt_token_ids for o in ref]
    assert {o.metrics["replica"] for o in ours} == {0, 1}
    assert len({o.request_id for o in ours}) == len(PROMPTS)
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


def test_more_cpus_than_the_cluster_has_is_refused(cluster):
    with pytest.raises(InvalidRequestError, match="CPUs"):
        DataParallelLLM(data_parallel_size=2, cpus_per_replica=100_000)


def test_shutdown_stops_the_replicas(cluster, path):
    llm = DataParallelLLM(
        path, dtype="float32", data_parallel_size=1, cpus_per_replica=1, kv_cache_memory=KV_BYTES
    )
    (actor,) = llm.group.actors
    llm.shutdown()
    with pytest.raises(HeronError, match="shut down"):
        llm.generate(["Hi"])
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.start.remote())
    llm.shutdown()  # twice is harmless
    assert ray.is_initialized()  # a cluster it joined stays up


# ---------------------------------------------------------------------------- serving
async def _collect(stream) -> list:
    return [out async for out in stream]


def test_router_spreads_requests_and_matches_the_single_engine(router, llm):
    params = SamplingParams(temperature=0, max_tokens=10)
    tok = llm.get_tokenizer()

    async def run():
        router.start()
        streams = [
            await router.add(tok.encode(p), params, f"r{i}", p) for i, p in enumerate(PROMPTS)
        ]
        return await asyncio.gather(*(_collect(s) for s in streams))

    results = asyncio.run(run())
    finals = [outs[-1] for outs in results]
    assert all(f.finished for f in finals)
    assert all(not o.finished for outs in results for o in outs[:-1])
    ref = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [f.outputs[0].token_ids for f in finals] == [o.outputs[0].token_ids for o in ref]
    assert {f.metrics["replica"] for f in finals} == {0, 1}
    assert router.in_flight == [0, 0]


def test_router_abort_frees_the_request_in_its_replica(router):
    async def run():
        router.start()
        stream = await router.add(
            [1, 504, 3575], SamplingParams(ignore_eos=True, max_tokens=2000), "long"
        )
        async for _ in stream:
            break  # the client went away after its first output
        for _ in range(100):  # the replica aborts once the cancellation reaches it
            stats = await asyncio.gather(*(a.stats.remote() for a in router.group.actors))
            if sum(s["num_running"] + s["num_waiting"] for s in stats) == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    stats = asyncio.run(run())
    assert sum(s["num_running"] + s["num_waiting"] for s in stats) == 0
    assert sum(s["kv_blocks_used"] for s in stats) == 0
    assert router.in_flight == [0, 0] and not router._calls


def test_router_sends_a_conversation_back_to_its_replica(router):
    """Two conversations start on the two replicas; their second turns, submitted so that
    least-busy routing alone would swap them, each go back to the replica that holds their
    first turn's KV blocks, and prefill only what is new."""
    tok_a = [1] + [100 + i for i in range(40)]  # 41 tokens: 2 full blocks of 16
    tok_b = [1] + [900 + i for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=3)

    async def turn(pairs):
        streams = [await router.add(ids, params, rid) for rid, ids in pairs]
        return [(await _collect(s))[-1] for s in streams]

    async def run():
        router.start()
        first = await turn([("a1", tok_a), ("b1", tok_b)])  # a1 -> replica 0, b1 -> 1
        second = await turn([("b2", tok_b + [7, 8, 9]), ("a2", tok_a + [7, 8, 9])])
        return first, second

    (a1, b1), (b2, a2) = asyncio.run(run())
    assert a1.metrics["replica"] != b1.metrics["replica"]
    assert a2.metrics["replica"] == a1.metrics["replica"]
    assert b2.metrics["replica"] == b1.metrics["replica"]
    assert a2.num_cached_tokens >= 32 and b2.num_cached_tokens >= 32


def test_router_refusals_are_heron_errors(router):
    async def run():
        router.start()
        with pytest.raises(InvalidRequestError, match="max_model_len"):
            await router.add(list(range(10, 5010)), SamplingParams(max_tokens=2), "too-long")
        assert router.in_flight == [0, 0]
        stream = await router.add([1, 504], SamplingParams(temperature=0, max_tokens=2), "ok")
        return await _collect(stream)

    outs = asyncio.run(run())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2


def test_router_serves_on_after_a_replica_dies(cluster, path):
    """The request on the replica that died fails (503 to its client); the next goes to the
    survivor; with none left, requests are refused and /health would say so."""
    kwargs = {"model": path, "dtype": "float32", "device": "cpu", "kv_cache_memory": KV_BYTES}
    group = ReplicaGroup(ServingReplica, DataParallelConfig(2, None, 1), kwargs, 16)
    router = ReplicaRouter(group, 16, 16, routing="least_busy", stats_interval=0.05)
    long = SamplingParams(ignore_eos=True, max_tokens=2000)

    async def run():
        router.start()
        doomed = await router.add([1, 504, 3575], long, "doomed")  # replica 0: all idle
        ray.kill(group.actors[0])
        with pytest.raises(EngineDeadError):
            async for _ in doomed:
                pass
        assert router.dead == {0} and router.alive
        after = await _collect(
            await router.add([1, 504], SamplingParams(temperature=0, max_tokens=2), "after")
        )
        ray.kill(group.actors[1])
        with pytest.raises(EngineDeadError, match="every engine replica"):
            await router.add([1, 504], SamplingParams(max_tokens=2), "none left")
        return after

    try:
        after = asyncio.run(run())
    finally:
        group.shutdown()
    assert after[-1].finished and after[-1].metrics["replica"] == 1
    assert not router.alive and router.in_flight == [0, 0]
    assert router.last_stats["kv_blocks_total"] > 0  # /metrics still has figures to show


def test_serve_with_replicas_over_http(llm):
    server = start_server(
        "--data-parallel-size", "2", "--max-num-seqs", "8", "--shutdown-timeout", "2"
    )  # fmt: skip
    try:
        prompts = PROMPTS[:4]
        with httpx.Client(base_url=server.url, timeout=120) as client:
            bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts]
            texts = [client.post("/v1/completions", json=b).json() for b in bodies]
            too_long = client.post("/v1/completions", json={"prompt": "x " * 9000})
            health = client.get("/health")
        ref = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert [t["choices"][0]["text"] for t in texts] == [o.outputs[0].text for o in ref]
        assert too_long.status_code == 400
        assert too_long.json()["error"]["type"] == "invalid_request_error"
        assert health.status_code == 200
        assert_shutdown_aborts_what_is_left(server)  # the router's requests too
    finally:
        assert server.stop() == 0, server.output()


def test_bench_serve_compares_replicas_with_one_engine(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "heron.cli", "bench", "serve", "--data-parallel-size", "2"]
    cmd += ["--concurrency", "2", "--num-prompts", "2", "--input-len", "8", "--output-len", "4"]
    r = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "concurrency 2: heron / heron x2 (Ray) tok/s =" in r.stdout
    levels = json.loads(out.read_text())["levels"]
    assert [lv["server"] for lv in levels] == ["heron", "heron x2 (Ray)"]
    assert all(lv["errors"] == 0 and lv["generated_tokens"] == 2 * 4 for lv in levels)
