"""Where heron runs: device and default dtype, and how much memory is free for the KV cache."""

from __future__ import annotations

import functools
import math
import os
import weakref

import numpy as np
import torch

from heron.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(
            "device: 'cuda' requested but no CUDA GPU is visible; use --device cpu", param="device"
        )
    return torch.device(device)


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX-512 BF16 or AMX); without it oneDNN
    emulates bf16 and float32 is several times faster."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_is_intel() -> bool:
    """Whether the CPU is Intel's: PyTorch's float32 GEMMs go through MKL, which runs its fast
    code paths only there (elsewhere its few-row float32 GEMMs are several times slower than
    oneDNN's)."""
    return "GenuineIntel" in _cpuinfo()


def resolve_dtype(dtype: str, device: torch.device, quantized: bool = False) -> torch.dtype:
    """``auto``: bfloat16 on GPUs, on CPUs with native bf16, and with quantized weights (the
    packed CPU kernels take bf16 activations, and their many-rows path falls back to float32
    GEMMs where bf16 is emulated); float32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda" or quantized:
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype == "float16" and device.type == "cpu":
        raise InvalidRequestError(
            "dtype: float16 is GPU-only here; use bfloat16 or float32 on CPU", param="dtype"
        )
    return _DTYPES[dtype]


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new KV cache may take: on CPU, the OS's available memory less what this
    process's live ``lazy_zeros`` caches may still touch (counted whole, as if resident)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(0, int(line.split()[1]) * 1024 - _lazy_bytes[0])
    except OSError:
        pass
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(0, avail - _lazy_bytes[0])


_lazy_bytes = [0]  # bytes of the live lazy_zeros tensors of this process


def _release(nbytes: int) -> None:
    _lazy_bytes[0] -= nbytes


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor for a large cache. On CPU its memory comes from calloc (through
    numpy), whose fresh pages the OS zeroes on first touch: ``torch.zeros`` writes every byte up
    front (seconds for a multi-GB KV cache) and makes all of it resident, where this
    costs nothing until used. 64-byte aligned, like PyTorch's own allocations. Until the
    memory is freed, ``free_memory_bytes`` counts it as taken, so a second engine in the same
    process sizes its cache as it did when the first one's was resident."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    array = np.zeros(nbytes + 64, dtype=np.uint8)
    _lazy_bytes[0] += array.nbytes
    weakref.finalize(array, _release, array.nbytes)
    raw = torch.from_numpy(array)
    start = -raw.data_ptr() % 64
    return raw[start : start + nbytes].view(dtype).view(shape)
