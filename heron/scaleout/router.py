"""ReplicaRouter: the HTTP server's request loop over engine replicas on Ray.

``heron serve --data-parallel-size N`` starts N ``ServingReplica`` actors (each a whole engine
with its own loop thread) and puts this router where the single engine's ``AsyncEngine``
would be: the routes, validation, SSE and metrics code are the same. Each request goes, among
the replicas within ``balance_slack`` requests in flight of the least busy one, to the one
that has seen the longest prefix of its prompt (heron.scaleout.prefix_affinity: a
conversation's next turn or a shared system prompt finds its KV blocks in that replica's
prefix cache), else to the least busy; its outputs are pumped from the replica's Ray stream
into the ``RequestStream`` the route reads. A client that goes away cancels the stream,
which aborts the request inside its replica and frees its KV blocks there. ``/metrics`` shows the
replicas' engine stats summed, polled every ``stats_interval`` seconds. A replica that dies
(its process or node gone) fails the requests it was serving with HTTP 503; the others go on
serving, and only when none is left does ``/health`` say the server is down."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from heron.config import DataParallelConfig, EngineConfig, SamplingParams
from heron.errors import InvalidRequestError
from heron.methods import check_engine_methods
from heron.outputs import RequestOutput
from heron.scaleout.cluster import ReplicaDiedError, ReplicaGroup, replica_error
from heron.scaleout.prefix_affinity import PrefixAffinity
from heron.scaleout.serving_replica import ServingReplica
from heron.server.async_engine import EngineDeadError, RequestStream, refuse_if_full
from heron.server.served_model import ServedModel

logger = logging.getLogger(__name__)


class ReplicaRouter:
    """A ``heron.server.served_model.RequestLoop`` over ``group``'s ServingReplicas."""

    def __init__(
        self,
        group: ReplicaGroup,
        max_waiting: int,
        block_size: int,
        routing: str = "prefix",
        stats_interval: float = 0.5,
        balance_slack: int = 8,
    ) -> None:
        self.group = group
        self.max_waiting = max_waiting
        self.stats_interval = stats_interval
        # How many more requests in flight than the least busy replica has a replica may take
        # for the sake of a prefix it has seen (SGLang's router balances the same way).
        self.balance_slack = balance_slack
        # "least_busy": no prefix bookkeeping; every request to the least busy replica
        self.affinity = None
        if routing == "prefix":
            self.affinity = PrefixAffinity(len(group.actors), block_size)
        self.in_flight = [0] * len(group.actors)  # requests each replica is serving for us
        stats = group.get([a.stats.remote() for a in group.actors])
        self.last_stats: dict[str, float] = _sum(stats)
        # request id -> (the replica's Ray stream, the task pumping it, the route's stream)
        self._calls: dict[str, tuple[Any, asyncio.Task, RequestStream]] = {}
        self._pending_adds = 0
        self._poller: asyncio.Task | None = None
        self._stopped = False
        self._closing = False  # set by abort_all(): new requests are refused
        self.dead: set[int] = set()  # replicas whose process is gone

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Called from the app's lifespan, on the server's event loop."""
        self._poller = asyncio.get_running_loop().create_task(self._poll_stats())

    def stop(self) -> None:
        """Fail what is in flight, then stop the replicas (and a local Ray cluster)."""
        if self._stopped:
            return
        self._stopped = True
        if self._poller is not None:
            self._poller.cancel()
        self.abort_all(EngineDeadError("the server shut down before this finished"))
        self.group.shutdown()

    def abort_all(self, error: BaseException) -> None:
        """Refuse new requests and fail every one in flight with ``error`` (their replicas
        abort them)."""
        self._closing = True
        for request_id in list(self._calls):
            self.abort(request_id, error)

    @property
    def alive(self) -> bool:
        return (
            self._poller is not None and not self._stopped and len(self.dead) < len(self.in_flight)
        )

    @property
    def num_waiting(self) -> int:
        return int(self.last_stats.get("num_waiting", 0)) + self._pending_adds

    async def _poll_stats(self) -> None:
        while True:
            live = self._live()
            stats = await asyncio.gather(
                *(self.group.actors[i].stats.remote() for i in live), return_exceptions=True
            )
            for i, result in zip(live, stats, strict=True):
                if isinstance(result, Exception):
                    self._lost(i, replica_error(self.group.ray, result))
            answered = [r for r in stats if not isinstance(r, BaseException)]
            if answered:  # with none left, /metrics keeps showing the last figures
                self.last_stats = _sum(answered)
            await asyncio.sleep(self.stats_interval)

    def _live(self) -> list[int]:
        return [i for i in range(len(self.in_flight)) if i not in self.dead]

    def _lost(self, replica: int, error: Exception) -> None:
        """Note a replica as gone if ``error`` says its process is (other errors are the
        request's own)."""
        if isinstance(error, ReplicaDiedError) and replica not in self.dead:
            self.dead.add(replica)
            left = len(self.in_flight) - len(self.dead)
            logger.error("replica %d is gone (%s); %d replicas left", replica, error, left)

    # ------------------------------------------------------------------ requests
    async def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt_text: str | None = None,
    ) -> RequestStream:
        """Submit one request to a replica (see the module's docstring). Raises at once if it
        is refused (the replica's ``InvalidRequestError`` or full queue, shutdown, a dead
        replica)."""
        if self._stopped or self._closing or self._poller is None:
            raise EngineDeadError("the server is shutting down")
        if not self.alive:
            raise EngineDeadError("every engine replica is gone")
        refuse_if_full(self.num_waiting, self.max_waiting)
        while True:
            i, hashes = self._pick(prompt_ids)
            call = self.group.actors[i].stream.remote(prompt_ids, params, request_id, prompt_text)
            self.in_flight[i] += 1
            self._pending_adds += 1
            try:
                await self._next(call)  # None: the replica's engine took it
                if self._closing:  # abort_all() ran meanwhile: undone below
                    raise EngineDeadError("the server is shutting down")
                break
            except ReplicaDiedError as e:  # nothing started there: try another replica
                self.in_flight[i] -= 1
                self._lost(i, e)
                if not self.alive:
                    raise EngineDeadError("every engine replica is gone") from None
            except BaseException:
                self.in_flight[i] -= 1
                self.group.ray.cancel(call)  # also when this await was cancelled midway
                raise
            finally:
                self._pending_adds -= 1
        if self.affinity is not None:
            self.affinity.record(i, hashes)
        stream = RequestStream(self.abort, request_id)
        pump = asyncio.get_running_loop().create_task(self._pump(call, stream, i, request_id))
        self._calls[request_id] = (call, pump, stream)
        return stream

    def _pick(self, prompt_ids: list[int]) -> tuple[int, list[int]]:
        """The replica for a prompt (a live one), and the prompt's block hashes."""
        live = self._live()
        least = min(self.in_flight[i] for i in live)
        if self.affinity is None:
            return min(live, key=lambda i: (self.in_flight[i], i)), []
        hashes = self.affinity.block_hashes(prompt_ids)
        matched = self.affinity.matched(hashes)
        fair = [i for i in live if self.in_flight[i] <= least + self.balance_slack]
        return max(fair, key=lambda i: (matched[i], -self.in_flight[i], -i)), hashes

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Cancel the request's Ray stream: its replica aborts it and frees its blocks.
        ``error``: what the route reading the request gets (none when it left itself)."""
        entry = self._calls.pop(request_id, None)
        if entry is None:
            return
        call, pump, stream = entry
        pump.cancel()
        self.group.ray.cancel(call)
        if error is not None:
            stream.queue.put_nowait(error)

    async def _pump(self, call: Any, stream: RequestStream, replica: int, request_id: str):
        try:
            while True:
                out: RequestOutput = await self._next(call)
                stream.queue.put_nowait(out)
                if out.finished:
                    return
        except StopAsyncIteration:
            stream.queue.put_nowait(EngineDeadError("the replica ended the request early"))
        except Exception as e:
            self._lost(replica, e)
            stream.queue.put_nowait(e)
        finally:
            self.in_flight[replica] -= 1
            self._calls.pop(request_id, None)

    async def _next(self, call: Any) -> Any:
        """The next item of a replica's stream, with the replica's own error raised."""
        try:
            return await (await call.__anext__())
        except StopAsyncIteration:
            raise
        except Exception as e:
            raise replica_error(self.group.ray, e) from None


def serve_replicas(
    engine_kwargs: dict[str, Any], config: DataParallelConfig, max_waiting: int
) -> ServedModel:
    """Start ``config.data_parallel_size`` serving replicas and the router over them."""
    try:  # bad engine settings fail here, before any replica starts
        engine_config = EngineConfig(**engine_kwargs)
    except TypeError as e:
        raise InvalidRequestError(f"engine settings: {e}") from None
    check_engine_methods(engine_config)
    group = ReplicaGroup(ServingReplica, config, engine_kwargs, max_waiting)
    first = group.info[0]
    return ServedModel(
        ReplicaRouter(group, max_waiting, engine_config.block_size, config.routing),
        first["tokenizer"],
        first["model_path"],
        min(info["max_model_len"] for info in group.info),  # each sized its own KV cache
        first["max_num_seqs"],
        first["vocab_size"],
    )


def _sum(stats: list[dict[str, float]]) -> dict[str, float]:
    """The replicas' engine stats added up (all of them are counts)."""
    total: dict[str, float] = {}
    for s in stats:
        for key, value in s.items():
            total[key] = total.get(key, 0) + value
    return total
