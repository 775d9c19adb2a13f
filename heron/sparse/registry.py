"""Sparse prefill patterns by name (``patterns.SPARSE_PATTERNS``), as
``EngineConfig.sparse_prefill`` and the CLI's ``--sparse-prefill`` name them, with their
options (``sparse_prefill_options``). Importing this module registers every pattern."""

import heron.sparse.flexprefill  # noqa: F401  (each pattern registers in its module)
import heron.sparse.vertical_slash  # noqa: F401
import heron.sparse.xattention  # noqa: F401
from heron.sparse.patterns import SPARSE_PATTERNS

__all__ = ["SPARSE_PATTERNS"]
