"""The method families the engine loads: importing this module registers their engine
plugins (heron.engine.plugin), in the order their hooks run (structured output last: it
masks the logits the other plugins produce). A new family adds its module here. The
``heron`` package imports it, so the engine, which names no method, never does."""

import heron.kv.plugin  # noqa: F401  (first: its request checks come first)
import heron.sparse.plugin  # noqa: F401
import heron.speculative.speculator  # noqa: F401
import heron.strategies.context_aware  # noqa: F401
import heron.strategies.entropy_adaptive  # noqa: F401
import heron.structured.plugin  # noqa: F401
