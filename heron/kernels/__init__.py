"""Hand-written CPU kernels for what PyTorch has no fused op for, compiled with the machine's
C++ compiler (``torch.utils.cpp_extension`` + ninja) into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)/``heron_kernels_<key>``.

The key hashes everything the compiled module depends on (sources, CPU flags, the torch build
and its folder, the Python ABI, compiler and flags), so two virtualenvs with their own torch
never rebuild each other's kernels. The build takes several minutes on a few cores;
``heron kernels build`` (run by ``make install``) does it ahead of time, else the first use
does, logging its progress; a start with the kernels built needs no compiler. An ``flock``
serialises builds between processes and is released by the OS when its holder dies, so a
build killed midway never blocks a later start: under the flock, the killed build's
compilers are stopped and torch's own ``lock`` file (which torch waits on forever) removed.
Where the build fails (no compiler) or ``HERON_CPU_KERNELS=0``, callers keep their PyTorch
path; one warning says why."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from heron.errors import HeronError

logger = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = [
    _DIR / name
    for name in (
        "paged_decode.cpp",
        "layer_ops.cpp",
        "sparse_prefill.cpp",
        "dequantize.cpp",
        "quantized_gemv.cpp",
        "bf16_gemv.cpp",
        "decode_layers.cpp",
        "token_mask.cpp",
        "bindings.cpp",
    )
]
_HEADERS = [_DIR / "heron_kernels.h", _DIR / "simd.h"]
# Tuples: torch's load appends its own flags to the lists it is given.
_CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_STILL_COMPILING_EVERY_S = 30.0
_LINK = "the module (linking)"


class KernelBuildError(HeronError):
    """The kernels did not build: ``reason`` is one line for a log, the message holds the
    compiler's whole output."""

    def __init__(self, reason: str, output: str = "") -> None:
        super().__init__(f"{reason}\n{output}".strip())
        self.reason = reason


def _cpu_flags() -> str:
    """The CPU's feature flags: the build uses -march=native, so a kernel cache shared with
    another CPU must not be reused (the key carries these)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str:
    """The C++ compiler torch's build calls (its ``CXX`` rule)."""
    return os.environ.get("CXX", "c++")


def identity() -> dict[str, str]:
    """What the compiled module depends on: its sources, the CPU it is tuned for, the torch it
    links against (version, commit, debug, C++ ABI, and the folder whose headers the compile
    command names: ninja rebuilds for another one), the Python ABI, the compiler and flags."""
    sources = "".join(path.read_text() for path in [*_SOURCES, *_HEADERS])
    return {
        "sources": hashlib.sha1(sources.encode()).hexdigest()[:12],
        "cpu": _cpu_flags(),
        "torch": f"{torch.__version__} {torch.version.git_version} debug={torch.version.debug} "
        f"cxx11_abi={torch._C._GLIBCXX_USE_CXX11_ABI}",
        "torch_dir": str(Path(torch.__file__).parent),
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('SOABI')}",
        "compiler": _compiler(),
        "cflags": shlex.join(_CFLAGS),
        "ldflags": shlex.join(_LDFLAGS),
    }


def cache_key(parts: dict[str, str]) -> str:
    """The build's name from its :func:`identity`: another value of any part, another build."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_folder() -> Path:
    """Where this torch, Python, CPU and compiler's build of the kernels lives."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"heron_kernels_{cache_key(identity())}"


def is_built(folder: Path) -> bool:
    """Whether a build finished in ``folder`` (its stamp is written last)."""
    return (folder / "built.json").exists()


def _builders(folder: Path) -> dict[int, list[str]]:
    """The processes building in ``folder`` (torch runs ninja there, ninja the compilers and
    the linker), each with the sources it compiles (``_LINK`` for the linker, none for
    ninja): their command lines name the build's outputs."""
    objects = {f"{path.stem}.o": path.name for path in _SOURCES}
    here = folder.resolve()
    found: dict[int, list[str]] = {}
    try:
        entries = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:  # no /proc: none to see
        return found
    for entry in entries:
        try:
            if Path(os.readlink(entry / "cwd")) != here:
                continue
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or another user's
            continue
        args = " ".join(words).split()  # a shell's command too
        named = [objects[arg] for arg in args if arg in objects]
        if f"{folder.name}.so" in args:
            named = [_LINK]
        if Path(words[0]).name == "ninja" or named:
            found[int(entry.name)] = named
    return found


def _stop_leftover_builders(folder: Path) -> None:
    """Stops the ninja and compilers of a build whose heron process was killed (called under
    the build lock, any build in ``folder`` is such a one): ninja dies at its next line of
    output with no one reading it, logging none of its work, so the next build redoes it all,
    and beside the leftovers it would write the same files at once."""
    pids = sorted(_builders(folder))
    if pids:
        logger.info(
            "stopping the compilers of an interrupted kernel build (pid %s)",
            ", ".join(map(str, pids)),
        )
    while pids:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        pids = sorted(_builders(folder))


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Holds the builds of ``folder`` to one process at a time: an ``flock``, which the OS
    drops when its holder dies, so it is never stale. Any live builder holds it, so a torch
    ``lock`` file found while holding it was left by a build that was killed: torch would wait
    for it forever, it is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "heron.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            logger.info(
                "waiting for another heron process to finish building the kernels (pid %s)",
                f.read().strip() or "unknown",
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _stop_leftover_builders(folder)
        stale = folder / "lock"
        if stale.exists():
            stale.unlink()
            logger.info("removed %s, left by an interrupted kernel build", stale)
        yield


def _compiled_since(obj: Path, since: float) -> bool:
    try:
        return obj.stat().st_mtime >= since
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _progress(folder: Path) -> Iterator[None]:
    """Logs each source as ninja writes its object, and after ``_STILL_COMPILING_EVERY_S``
    without one, how long the build has run and what it is compiling."""
    start, since = time.monotonic(), time.time()
    fresh: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        last_log = start
        while not stop.wait(1.0):
            now = time.monotonic()
            for path in _SOURCES:
                if path.stem not in fresh and _compiled_since(folder / f"{path.stem}.o", since):
                    fresh.add(path.stem)
                    last_log = now
                    logger.info("compiled %s (%.0f s)", path.name, now - start)
            if now - last_log >= _STILL_COMPILING_EVERY_S:
                last_log = now
                busy = sorted({name for names in _builders(folder).values() for name in names})
                logger.info(
                    "still building heron's CPU kernels (%.0f s): %s",
                    now - start,
                    ", ".join(busy) or "starting",
                )

    thread = threading.Thread(target=watch, name="heron-kernels-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _import(folder: Path, name: str) -> ModuleType:
    """The built module, imported without torch's ``load`` (no ninja, no compiler needed)."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_line(output: str) -> str:
    """The compiler's first error in a failed build's output, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[-1] if lines else "")


def _check_tools() -> None:
    """A clear error for a missing compiler or ninja, before torch prints its own banners."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = shlex.split(_compiler())[0]
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler: {compiler!r} not found (set CXX to another)")
    if not is_ninja_available():
        raise KernelBuildError("ninja not found (pip install ninja)")


def build() -> ModuleType:
    """The compiled kernels, built first where this machine has no build for its torch,
    Python, CPU and compiler yet (once per machine and torch install; several minutes on a
    few cores). Waits for another process building the same; raises
    :class:`KernelBuildError` where the build fails."""
    folder = build_folder()
    if not is_built(folder):
        with _build_lock(folder):
            if not is_built(folder):  # else another process built it while this one waited
                return _build(folder)
    logger.info("loading heron's CPU kernels from %s", folder)
    return _import(folder, folder.name)


def _build(folder: Path) -> ModuleType:
    """Compiles the kernels into ``folder`` (under its build lock) and imports them."""
    _check_tools()
    from torch.utils.cpp_extension import load

    logger.info(
        "compiling heron's CPU kernels into %s: %d C++ sources, several minutes on a few cores, "
        "once per machine and torch install (`heron kernels build` does it ahead of time)",
        folder,
        len(_SOURCES),
    )
    start = time.monotonic()
    try:
        with _progress(folder):
            module = load(
                name=folder.name,
                sources=[str(path) for path in _SOURCES],
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(folder),
                verbose=False,
            )
    except Exception as e:  # a compile error: torch's message holds the compiler's output
        raise KernelBuildError(f"build failed: {_error_line(str(e))}", str(e)) from e
    (folder / "built.json").write_text(json.dumps(identity(), indent=1) + "\n")
    logger.info("heron's CPU kernels built in %.0f s", time.monotonic() - start)
    return module


def enabled() -> bool:
    """Whether the kernels are wanted (``HERON_CPU_KERNELS=0`` turns them off)."""
    return os.environ.get("HERON_CPU_KERNELS", "1") != "0"


def _load() -> ModuleType | None:
    """:func:`build`, or None where the kernels are off or do not build: one warning says
    why, PyTorch ops run instead."""
    if not enabled():
        logger.info("heron's CPU kernels are off (HERON_CPU_KERNELS=0)")
        return None
    try:
        return build()
    except Exception as e:  # no compiler, no ninja, a build error, a module that won't import
        reason = e.reason if isinstance(e, KernelBuildError) else f"{type(e).__name__}: {e}"
        logger.warning(
            "heron's CPU kernels are unavailable, using PyTorch ops instead (%s; "
            "`heron kernels build` shows the details)",
            reason,
        )
        logger.debug("the kernel build's output:\n%s", e)
        return None


_module = functools.cache(_load)


def available() -> bool:
    """Whether the compiled kernels load here (compiles them on the first call)."""
    return _module() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether a layer op may run on ``x`` through the kernels (a CPU tensor, kernels built)."""
    return x.device.type == "cpu" and available()


@functools.cache
def _sparse_prefill_supported() -> bool:
    return available() and _module().sparse_prefill_supported()


def sparse_prefill_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`sparse_prefill` runs on tensors of this device and dtype: bf16 on a CPU,
    kernels built with AVX512_BF16 (oneDNN's brgemm multiplies on AMX, heron's own
    vdpbf16ps loop elsewhere)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _sparse_prefill_supported()


def sparse_prefill_usable(q: torch.Tensor) -> bool:
    """Whether :func:`sparse_prefill` runs on ``q`` (:func:`sparse_prefill_runs`)."""
    return sparse_prefill_runs(q.device, q.dtype)


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
    q_start: int,
    block: int,
    scale: float,
    table: torch.Tensor | None = None,
    cache_block: int = 1,
) -> torch.Tensor:
    """Block-sparse causal attention of a prefill chunk: ``q`` [Lq, H, D] at positions
    ``q_start ..`` over the keys/values of positions ``0 .. q_start + Lq - 1``, read in place
    from ``k``/``v`` [rows, Hkv, D] (strided views are fine while D is contiguous): position
    ``p`` at row ``p``, or with ``table`` (int64 block ids, a layer's paged cache) at row
    ``table[p // cache_block] * cache_block + p % cache_block``. Row ``h * nQB + i`` (query
    head h, the chunk's i-th query block of ``block`` positions) attends to the key blocks
    ``cols[row_ptr[r]:row_ptr[r + 1]]`` (absolute block indices, causal, its diagonal among
    them). Returns [Lq, H, D]. Call only where :func:`sparse_prefill_usable` is true."""
    return _module().sparse_prefill(
        q, k, v, table, cache_block, row_ptr, cols, q_start, block, scale
    )


def xattention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    block: int,
    stride: int,
    scale: float,
    table: torch.Tensor | None = None,
    cache_block: int = 1,
) -> torch.Tensor:
    """XAttention's block scores (heron.sparse.patterns.xattention) in one pass: ``q``
    [Lq, H, D] at positions ``q_start ..``, the keys read from ``k`` as :func:`sparse_prefill`
    reads them. Per query block row, the antidiagonal (stride ``stride``) scores, their causal
    softmax per strided query row, summed per (query block, key block): [H, nQB, nKB] fp32.
    Call only where :func:`sparse_prefill_usable` is true."""
    return _module().xattention_scores(q, k, table, cache_block, q_start, block, stride, scale)


def select_blocks(scores: torch.Tensor, threshold: float, qb0: int) -> torch.Tensor:
    """Per row of ``scores`` [H, nQB, nKB] fp32 (query block ``qb0 + i``), the fewest causal
    key blocks whose share of the row's causal total reaches ``threshold``, plus the first
    block and the diagonal: a bool mask, what ``heron.sparse.patterns.select_cumulative`` and
    ``enforce_always_kept`` compute (ties broken toward earlier blocks) in one pass."""
    return _module().select_blocks(scores, threshold, qb0)


def vnni_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``c + a @ b`` in fp32 for bf16 ``a`` [M, K] and ``b`` [K, N] through the AVX512_BF16
    tile loop that :func:`sparse_prefill` multiplies with where the CPU has no AMX (whatever
    this CPU has, so tests reach it everywhere). Call only where :func:`sparse_prefill_usable`
    is true."""
    return _module().vnni_matmul(a, b, c)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
    visible: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Decode attention read in place from the paged cache: ``q`` [B, Hkv, G, D] (the G query
    heads of each KV head), caches [slots, Hkv, D], ``tables`` [B, W] int64 block ids,
    ``lens`` [B] int64 (slots ``< len`` are attended); ``visible`` [B, 2] int64 (from, bits):
    slot ``from + j`` is attended only where bit j is set (a draft tree's row sees its
    ancestors); ``window`` > 0: only slots ``>= len - window`` are attended (a sliding-window
    layer). Returns [B, Hkv, G, D]. Call only where :func:`available` is true."""
    return _module().paged_decode(
        q, k_cache, v_cache, tables, lens, visible, block_size, scale, window
    )


def write_rows_(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """``cache[slots[t]] = x[t]``, what ``cache.index_copy_(0, slots, x)`` does, as plain row
    copies: ``cache`` [rows, Hkv, D] contiguous, ``x`` [T, Hkv, D] of its dtype with D
    contiguous, ``slots`` [T] int64 inside the cache."""
    _module().write_rows_(cache, slots, x)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """RMSNorm over the last dimension of ``x`` ([T, D] or [T, H, D], last dim contiguous)
    with ``weight + offset``; with ``residual``, of ``x + residual``, returning
    ``[x + residual, normed]``, else ``[normed]``. Rounds like ``heron.layers.norm.RMSNorm``."""
    return _module().rms_norm(x, residual, weight, eps, offset)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding applied to ``x`` [T, H, D] in place; ``cos``/``sin`` [T, 1, D] in x's
    dtype, sin with rotate-half's sign folded in (:class:`heron.layers.rotary.RotaryEmbedding`)."""
    _module().rotary_(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [T, 2I] (the fused projection's two halves)."""
    return _module().silu_mul(gate_up)


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor, vocab_size: int
) -> None:
    """``logits[r, t] = -inf`` wherever bit ``t`` of ``bitmask[r]`` is clear, for each ``r``
    in ``rows`` (int64); ``logits`` [B, V] float32, ``bitmask`` [B, ceil(V / 32)] int32, as
    xgrammar fills it."""
    _module().apply_token_bitmask_(logits, bitmask, rows, vocab_size)


@functools.cache
def dequantize_runs() -> bool:
    """Whether :func:`dequantize_int4` and :func:`dequantize_int8` run here (kernels built
    with AVX-512 bf16)."""
    return available() and _module().dequantize_supported()


def dequantize_int4(
    packed: torch.Tensor,
    scale_zero: torch.Tensor,
    out_features: int,
    in_features: int,
    group_size: int,
    block_n: int,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bf16 [out, in] weight held in PyTorch's CPU int4 pack (rows in blocks of
    ``block_n``) with its bf16 scales and zeros [in / group, out, 2]: what
    ``heron.layers.quantized_linear.Int4Linear.dequantize`` computes in bf16, bit for bit;
    written into ``into`` (contiguous bf16 [out, in]) when given. Call only where
    :func:`dequantize_runs` is true."""
    return _module().dequantize_int4(
        packed, scale_zero, out_features, in_features, group_size, block_n, into
    )


def dequantize_int8(
    weight: torch.Tensor, scale: torch.Tensor, into: torch.Tensor | None = None
) -> torch.Tensor:
    """The bf16 [out, in] weight of an int8 ``weight`` and its bf16 ``scale`` per output row:
    ``weight.to(bf16) * scale[:, None]`` bit for bit, in one pass; written into ``into``
    (contiguous bf16 [out, in]) when given. Call only where :func:`dequantize_runs` is
    true."""
    return _module().dequantize_int8(weight, scale, into)


def dequantize_int4_float(
    packed: torch.Tensor,
    scale_zero: torch.Tensor,
    out_features: int,
    in_features: int,
    group_size: int,
    block_n: int,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dequantize_int4` in float32 (any CPU the kernels build on): what
    ``Int4Linear.dequantize(torch.float32)`` computes, bit for bit."""
    return _module().dequantize_int4_float(
        packed, scale_zero, out_features, in_features, group_size, block_n, into
    )


def dequantize_int8_float(
    weight: torch.Tensor, scale: torch.Tensor, into: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`dequantize_int8` in float32 with float32 scales (any CPU the kernels build on):
    ``weight.float() * scale[:, None]``, bit for bit."""
    return _module().dequantize_int8_float(weight, scale, into)


@functools.cache
def int8_gemv_runs() -> bool:
    """Whether :func:`int8_gemv` runs here (kernels built with AVX-512 or AVX2)."""
    return available() and _module().int8_gemv_supported()


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T * scale`` for a few bf16 rows ``x`` [M, K], an int8 ``weight`` [N, K]
    and one scale per output row: what ``torch._weight_int8pack_mm`` computes (fp32
    accumulation, one bf16 rounding), faster where the weight is not in cache. Call only
    where :func:`int8_gemv_runs` is true."""
    return _module().int8_gemv(x, weight, scale)


@functools.cache
def bf16_gemv_runs() -> bool:
    """Whether :func:`bf16_gemv` runs here (kernels built with AVX512_BF16)."""
    return available() and _module().bf16_gemv_supported()


@functools.cache
def bf16_gemv_max_rows() -> int:
    """Rows up to which :func:`bf16_gemv` is faster than oneDNN's packed GEMM."""
    return _module().bf16_gemv_max_rows()


def bf16_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few bf16 rows ``x`` [M, K] and a plain bf16 ``weight``
    [N, K]: fp32 sums, one bf16 rounding; each row's result independent of the others'.
    Faster than oneDNN where the weight is not in cache. Call only where
    :func:`bf16_gemv_runs` is true."""
    return _module().bf16_gemv(x, weight, bias)


@functools.cache
def int4_gemv_runs() -> bool:
    """Whether :func:`int4_gemv` runs here (kernels built with AVX-512 VNNI and VBMI, or
    AVX2)."""
    return available() and _module().int4_gemv_supported()


def int4_gemv_block() -> int:
    """The row block of PyTorch's int4 pack that :func:`int4_gemv` reads (64: the AVX-512
    layout, 32: the AVX2 one); call only where :func:`int4_gemv_runs` is true."""
    return _module().int4_gemv_block()


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """What ``torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)``
    computes for a few bf16 rows ``x`` [M, K] (within bf16 rounding), faster per weight:
    ``packed`` in PyTorch's layout with blocks of :func:`int4_gemv_block` rows,
    ``out_features`` a multiple of that, groups a multiple of 32 inputs. Call only where
    :func:`int4_gemv_runs` is true."""
    return _module().int4_gemv(x, packed, scale_zero, group_size, out_features)


def decode_linear(
    kind: str,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    few_rows_weight: torch.Tensor | None,
) -> object:
    """One linear of :func:`decode_layers` (``heron.layers.quantized_linear.LinearSpec``)."""
    return _module().DecodeLinear(kind, weight, scales, group_size, bias, few_rows_weight)


def decode_layer(
    input_norm: torch.Tensor,
    qkv: object,
    o: object,
    post_norm: torch.Tensor,
    gate_up: object,
    down: object,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    pre_ff_norm: torch.Tensor | None = None,
    post_ff_norm: torch.Tensor | None = None,
    local: bool = False,
) -> object:
    """One decoder layer of :func:`decode_layers`: its RMSNorm weights and its four linears
    (:func:`decode_linear`). Llama / Qwen2 layers have the first six; Gemma3 layers also have
    q/k norms and sandwich norms (``pre_ff_norm``, ``post_ff_norm``; ``post_norm`` then
    normalises the attention output), and ``local`` sliding-window layers."""
    return _module().DecodeLayer(
        input_norm,
        qkv,
        o,
        post_norm,
        gate_up,
        down,
        q_norm,
        k_norm,
        pre_ff_norm,
        post_ff_norm,
        local,
    )


def decode_options(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    eps: float,
    offset: float,
    gelu_tanh: bool,
) -> object:
    """What a model's layers share for :func:`decode_layers`: head counts and size, the
    attention scale, RMSNorm's eps and weight offset, GeGLU (tanh) instead of SwiGLU."""
    return _module().DecodeOptions(num_heads, num_kv_heads, head_dim, scale, eps, offset, gelu_tanh)


def decode_layers(layers: list[object], options: object) -> object:
    """A decoder as one C++ loop for decode steps (``heron.models.decode_loop``). Its
    ``forward(x, rotary, k_caches, v_caches, slot_mapping, tables, lens, visible, block_size,
    window, layer_indices)`` computes what the layers' forward computes layer after layer, op
    for op (so bit for bit), for ``x`` [B, hidden], B decode rows of one query each attending
    through :func:`paged_decode`; ``rotary``: [cos, sin] or [cos, sin, local cos, local sin];
    ``window``: the local layers' sliding window (0: none). Call only where :func:`available`
    is true."""
    return _module().DecodeLayers(layers, options)
