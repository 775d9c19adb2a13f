"""ReplicaGroup: Ray started (or joined) and one actor per engine replica, each with its CPUs.

Written once for both fronts: ``DataParallelLLM`` (offline batches) and the HTTP server's
``ReplicaRouter``. Replica classes take ``(index, threads, *args)`` and have a ``start()``
that builds the engine and returns where it runs; errors raised inside a replica reach the
caller as themselves where they are heron's (a bad prompt stays an ``InvalidRequestError``)."""

from __future__ import annotations

import logging
from typing import Any

from heron.config import DataParallelConfig
from heron.errors import HeronError, InvalidRequestError
from heron.server.async_engine import EngineDeadError

logger = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError:
        raise HeronError(
            "engine replicas run on Ray, which is not installed: pip install 'ray>=2.40' "
            "(or heron's [ray] extra)"
        ) from None
    return ray


class ReplicaDiedError(EngineDeadError):
    """An engine replica's process went away (killed, out of memory, node lost)."""


class ReplicaGroup:
    """``config.data_parallel_size`` actors of ``replica_cls``, started and ready."""

    def __init__(self, replica_cls: type, config: DataParallelConfig, *args: Any) -> None:
        self.config = config
        self.ray = ray = import_ray()
        self.initialized_here = not ray.is_initialized()  # ray.init() is ours to undo
        self.actors: list[Any] = []
        if self.initialized_here:
            try:
                ray.init(
                    address=config.ray_address,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = config.ray_address or "a local cluster"
                raise HeronError(f"could not start or reach Ray ({where}): {e}") from None
        try:
            self.threads = self._cpus_per_replica()
            actor = ray.remote(num_cpus=self.threads)(replica_cls)
            size = config.data_parallel_size
            logger.info("starting %d engine replicas, %d CPUs each", size, self.threads)
            self.actors = [actor.remote(i, self.threads, *args) for i in range(size)]
            self.info: list[dict[str, Any]] = self.get([a.start.remote() for a in self.actors])
        except BaseException:
            self.shutdown()
            raise
        for info in self.info:
            logger.info(
                "replica %d: pid %d on %s, %d threads",
                info["replica"],
                info["pid"],
                info["host"],
                info["threads"],
            )

    def _cpus_per_replica(self) -> int:
        """The CPUs each replica gets, checked against what the cluster has free (Ray would
        otherwise wait for them forever)."""
        size = self.config.data_parallel_size
        free = int(self.ray.available_resources().get("CPU", 0))
        per = self.config.cpus_per_replica or max(1, free // size)
        if per * size > free:
            raise InvalidRequestError(
                f"data_parallel_size {size} x {per} CPUs per replica needs {per * size} CPUs, "
                f"but the Ray cluster has {free} free; use fewer replicas or CPUs per replica",
                param="data_parallel_size",
            )
        return per

    def get(self, refs: list[Any]) -> list[Any]:
        """``ray.get``, with a replica's own error raised (see ``replica_error``)."""
        try:
            return self.ray.get(refs)
        except Exception as e:
            raise replica_error(self.ray, e) from None

    def shutdown(self) -> None:
        """Stop the replicas; if this group connected this process to Ray, disconnect it (a
        local cluster it started stops, a running one it joined stays up)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.initialized_here and self.ray.is_initialized():
            self.ray.shutdown()


def replica_error(ray, e: Exception) -> Exception:
    """What a failed call to a replica should raise: heron's own error raised inside it, a
    ``ReplicaDiedError`` if the replica is gone, else Ray's error as it is."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, HeronError):
        return e.cause
    if isinstance(e, ray.exceptions.RayActorError):
        return ReplicaDiedError(f"an engine replica died: {e}")
    return e
