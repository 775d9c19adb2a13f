"""A benchmark record: what one ``heron bench`` run measured, in one JSON envelope that every
bench shares (the bench, heron's version and git commit, the UTC date, the command's settings,
the machine, the load on it), with the rows of its table in ``docs/benchmarks.md``.

Records under ``benchmarks/results/<machine slug>/`` are the only source of the measured
figures in the docs: ``heron bench report`` generates the tables from them, so a figure is
never copied by hand and always names the machine, commit and settings that produced it."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_DIR = Path("benchmarks/results")

# The instruction-set extensions heron's kernels and oneDNN choose their code paths by.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_vbmi", "avx512_bf16", "avx512_fp16")


@dataclass
class Row:
    """One line of a bench's table in the docs: a heron configuration against its reference
    measured in the same run (a baseline engine, plain decoding, the full cache...)."""

    measured: str  # what, with its unit: "decode tok/s (batch 1), int4 weights"
    heron: float
    baseline: str = ""  # the reference's name; "" where the run had none
    baseline_value: float | None = None
    ratio: float | None = None  # heron / baseline for speeds; None where a ratio means nothing


def speed_row(measured: str, heron: float, baseline: str = "", value: float | None = None) -> Row:
    """A row whose ratio is heron's speed over the baseline's (above 1: heron is faster)."""
    ratio = heron / value if value else None
    return Row(measured, heron, baseline if value is not None else "", value, ratio)


@dataclass
class Results:
    """A bench's part of its record: its full results (JSON-able) and its table's rows."""

    bench: str
    data: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    model: str = ""  # the model file and dtype, for the table's caption


def make_record(
    results: Results, settings: dict[str, Any] | None = None, command: str = ""
) -> dict[str, Any]:
    """The envelope around ``results``, whose data's keys join it at the top level (where a
    key is the envelope's too, the envelope's wins)."""
    machine = machine_info()
    load = cpu_busy_elsewhere()
    record = {
        "bench": results.bench,
        "heron_version": _heron_version(),
        "git_commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "command": command,
        "settings": settings or {},
        "model": results.model,
        "machine": machine,
        "machine_slug": machine_slug(machine),
        # the load average counts this bench too; the busy cores are other processes' alone
        "load": {"load_average": list(os.getloadavg()), "other_cpu_busy": load},
        "table": [asdict(r) for r in results.rows],
    }
    for key, value in results.data.items():
        record.setdefault(key, value)
    return record


def write_record(record: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def record_path(results_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """``<results_dir>/<machine slug>/<bench>-<UTC date>.json``."""
    stamp = record["date"].replace("-", "").replace(":", "")
    return Path(results_dir) / record["machine_slug"] / f"{record['bench']}-{stamp}.json"


# ---------------------------------------------------------------------------- the machine
def machine_info() -> dict[str, Any]:
    """The CPU (model, the flags that pick heron's code paths, cores), memory, the software
    versions and whether heron's compiled kernels are built: what a figure depends on."""
    import torch

    cpu, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers_version": _version("transformers"),
        "heron_version": _heron_version(),
        "heron_kernels": _kernels_built(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_slug(machine: dict[str, Any]) -> str:
    """A folder name for the machine: CPU model, cores and the widest of its vector
    extensions (and the GPU, if any), e.g. ``intel-xeon-platinum-8488c-2cpu-amx``."""
    flags = set(machine.get("cpu_flags", ()))
    tier = next(
        (
            name
            for name, flag in (
                ("amx", "amx_tile"),
                ("avx512-bf16", "avx512_bf16"),
                ("avx512", "avx512f"),
                ("avx2", "avx2"),
            )
            if flag in flags
        ),
        "",
    )
    cpus = machine.get("usable_cpus") or machine.get("cpu_count")
    parts = [_slug(machine.get("cpu_model", "unknown cpu")), f"{cpus}cpu", tier]
    if machine.get("gpu"):
        parts.append(_slug(machine["gpu"]))
    return "-".join(p for p in parts if p)


def _slug(name: str) -> str:
    name = re.sub(r"\((R|TM|tm)\)|\bCPU\b|@.*$|\b\d+-Core\b|\bProcessor\b", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and which of the relevant flags (and every ``amx_*``) it has."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if "model name" in fields and "flags" in fields:
                    break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    relevant = [f for f in _FLAGS if f in flags] + sorted(f for f in flags if f.startswith("amx"))
    return fields.get("model name") or platform.processor() or "unknown", relevant


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _kernels_built() -> bool:
    """Whether heron's compiled kernels are built and on (checked without building them)."""
    from heron import kernels

    return kernels.enabled() and kernels.is_built(kernels.build_folder())


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _heron_version() -> str:
    import heron

    return heron.__version__


def git_commit() -> str | None:
    """The commit of the heron checkout this runs from (``+dirty`` when its ``heron/`` has
    uncommitted changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "heron")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


# ---------------------------------------------------------------------------- the load
def cpu_busy_elsewhere(window: float = 1.0) -> float | None:
    """CPU cores kept busy by other processes over ``window`` seconds, while this one idles.

    On a small machine another process running torch makes both engines' thread pools fight
    for cores and slows them many times over, so the number goes into the results."""
    try:
        before = _cpu_times()
        time.sleep(window)
        after = _cpu_times()
    except (OSError, ValueError):
        return None
    busy = (after[0] - before[0]) / max(after[1] - before[1], 1) * (os.cpu_count() or 1)
    if busy >= 0.2:
        logger.warning(
            "other processes keep %.1f of %d CPU cores busy: the timings will be noisy",
            busy,
            os.cpu_count() or 0,
        )
    return round(busy, 2)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total
