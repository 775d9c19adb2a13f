"""The one place benchmarks get matplotlib (optional: `pip install 'heron[bench]'`)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning that says how
    to get it) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'heron[bench]'): no PNG written")
        return None
    return plt
