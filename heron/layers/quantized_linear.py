"""Weight-only quantized linears (``quantization="int8"`` / ``"int4"``), kept packed in memory.

Decode is memory-bound: a step reads every weight once for a handful of rows, so reading 1 or
0.5 byte per weight instead of 4 is the speed-up. Those few-row products take bf16
activations and run through heron's kernels (``heron.kernels.int8_gemv`` / ``int4_gemv``, on
PyTorch's packed layouts, faster per weight than PyTorch's) where the CPU has AVX-512 (VNNI
and VBMI for int4), else PyTorch's packed CPU kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``). Many-row products (prefill chunks, big decode batches) are
compute-bound and those kernels are slow there, so above a module's ``max_gemv_rows`` rows
the weight is dequantized to the activations' dtype for the call and the dense GEMM does the
work.

- int8: symmetric, one scale per output channel (``w = q * scale``).
- int4: asymmetric, one scale and zero per ``group_size`` inputs of each output channel
  (``w = (q - 8) * scale + zero``, q in 0..15): the layout of GGUF's Q4_0/Q4_1 blocks and of
  PyTorch's int4 kernel.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from heron import kernels
from heron.errors import InvalidRequestError
from heron.layers.workspace import Workspace
from heron.platform import cpu_has_fast_bf16

QUANTIZATIONS = ("none", "int8", "int4")
# Rows up to which the packed kernels beat dequantize + dense GEMM. PyTorch's and heron's int8
# widen every weight to floats for each few rows, so by a few dozen rows the GEMM catches up:
GEMV_MAX_ROWS = 16
# heron's int4 does not widen weights to floats and unpacks a weight group once for all rows,
# so it stays ahead for several times as many rows:
HERON_INT4_MAX_ROWS = 64
INT4_GROUP_SIZES = (32, 64, 128)  # the first that divides in_features is used
_KERNEL_DTYPE = torch.bfloat16  # the packed kernels take bf16 activations and scales
# How heron's C++ decode loop computes a linear (heron.kernels.DecodeLinear's arguments):
# (kind, weight, scales, group size, bias, few-rows weight), the same product as the module's
# forward for up to its max_gemv_rows rows. The few-rows weight: a packed bf16 linear's plain
# weight, which heron's bf16 GEMV reads for a few rows (heron.layers.packed_linear).
LinearSpec = tuple[
    str, torch.Tensor, torch.Tensor | None, int, torch.Tensor | None, torch.Tensor | None
]


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)  # float32, for the dequantized path
        self.register_buffer("kernel_scale", scale.to(_KERNEL_DTYPE))
        self.bias = _bias(linear)
        self.heron_gemv = kernels.usable(self.qweight) and kernels.int8_gemv_runs()
        self.max_gemv_rows = GEMV_MAX_ROWS

    def dequantize(self, dtype: torch.dtype, into: torch.Tensor | None = None) -> torch.Tensor:
        """The [out, in] weight in ``dtype``; heron's kernels may write it into ``into`` (a
        buffer of that shape and dtype), so use the returned tensor."""
        if dtype == torch.bfloat16 and _fast_dequantize(self.qweight):
            return kernels.dequantize_int8(self.qweight, self.kernel_scale, into)
        if dtype == torch.float32 and kernels.usable(self.qweight):
            return kernels.dequantize_int8_float(self.qweight, self.scale, into)
        return self.qweight.to(dtype).mul_(self.scale[:, None].to(dtype))

    def decode_spec(self) -> LinearSpec:
        kind = "int8" if self.heron_gemv else "int8_aten"
        return (kind, self.qweight, self.kernel_scale, 0, self.bias, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features)
        if rows.shape[0] > self.max_gemv_rows or rows.device.type != "cpu":
            return _dense(self, x)
        int8_mm = kernels.int8_gemv if self.heron_gemv else torch._weight_int8pack_mm
        y = int8_mm(_in_kernel_dtype(rows), self.qweight, self.kernel_scale)
        return _finish(y, x, self.bias, self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        q, scale, zero = quantize_int4(linear.weight.detach().float(), group_size)
        # [in / group, out, 2]: the kernel's scales-and-zeros layout
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", scale_zero.to(_KERNEL_DTYPE))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.bias = _bias(linear)
        block_n = _int4_block_n()
        self.dequantizable = block_n is not None and self.out_features % block_n == 0
        self.heron_gemv = (
            kernels.int4_gemv_runs()
            and block_n == kernels.int4_gemv_block()
            and self.out_features % block_n == 0
            and group_size % 32 == 0
        )
        self.max_gemv_rows = HERON_INT4_MAX_ROWS if self.heron_gemv else GEMV_MAX_ROWS

    def dequantize(self, dtype: torch.dtype, into: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`Int8Linear.dequantize`."""
        out_f, in_f = self.out_features, self.in_features
        if dtype == torch.bfloat16 and self.dequantizable and _fast_dequantize(self.packed):
            return kernels.dequantize_int4(
                self.packed, self.scale_zero, out_f, in_f, self.group_size, _int4_block_n(), into
            )
        if dtype == torch.float32 and self.dequantizable and kernels.usable(self.packed):
            return kernels.dequantize_int4_float(
                self.packed, self.scale_zero, out_f, in_f, self.group_size, _int4_block_n(), into
            )
        w = unpack_int4(self.packed, out_f, in_f, dtype).view(out_f, -1, self.group_size)
        scale, zero = self.scale_zero.to(dtype).permute(2, 1, 0)[..., None]  # [out, groups, 1]
        return w.sub_(8).mul_(scale).add_(zero).view(out_f, in_f)

    def decode_spec(self) -> LinearSpec:
        kind = "int4" if self.heron_gemv else "int4_aten"
        return (kind, self.packed, self.scale_zero, self.group_size, self.bias, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features)
        if rows.shape[0] > self.max_gemv_rows and self.dequantizable:
            return _dense(self, x)
        xk = _in_kernel_dtype(rows)
        if self.heron_gemv:  # implies dequantizable: at most max_gemv_rows rows here
            y = kernels.int4_gemv(
                xk, self.packed, self.scale_zero, self.group_size, self.out_features
            )
        else:
            y = torch._weight_int4pack_mm_for_cpu(xk, self.packed, self.group_size, self.scale_zero)
        return _finish(y, x, self.bias, self.out_features)


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (q int32 in 0..15, scale [out, in / group], zero [out, in / group])
    with ``w ~= (q - 8) * scale + zero``: each group's range mapped onto 16 levels."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    zero = lo + 8 * scale
    return q.to(torch.int32).reshape(out_f, in_f), scale, zero


def unpack_int4(
    packed: torch.Tensor, out_features: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The [out, in] levels (0..15, as ``dtype``) held in the CPU kernel's packed layout:
    blocks of ``block_n`` output rows; byte ``[block, k, j]`` holds row ``j`` (low nibble) and
    row ``j + block_n / 2`` (high nibble) of input ``k``."""
    block_n = _int4_block_n()
    half = block_n // 2
    p = packed.view(out_features // block_n, in_features, half).transpose(1, 2)
    out = torch.empty(out_features // block_n, block_n, in_features, dtype=dtype)
    out[:, :half] = p & 15
    out[:, half:] = p >> 4
    return out.view(out_features, in_features)


def _fast_dequantize(weight: torch.Tensor) -> bool:
    """Whether heron's one-pass kernels dequantize this packed weight to bf16 (the same bits
    as the modules' PyTorch ops, in one pass where those take several)."""
    return kernels.usable(weight) and kernels.dequantize_runs()


@functools.cache
def _int4_block_n() -> int | None:
    """The row-block width of this PyTorch build's int4 packing (it depends on the CPU's
    vector width), found by packing a probe and checking the unpacking reproduces it exactly;
    None when no known layout fits, and then the packed kernel serves every call."""
    out_f, in_f = 256, 64
    probe = torch.randint(0, 16, (out_f, in_f), generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for block_n in (32, 64, 16, 128):
        p = packed.view(out_f // block_n, in_f, block_n // 2)
        rows = torch.cat([p & 15, p >> 4], dim=-1).transpose(1, 2).reshape(out_f, in_f)
        if torch.equal(rows.to(probe.dtype), probe):
            return block_n
    return None


def quantize_linears(model: nn.Module, quantization: str) -> None:
    """Replace every ``nn.Linear`` of ``model`` with its packed form. The LM head (``lm_head``;
    tied to the embedding, it gets its own packed copy and the embedding stays as it is) is
    int8 under int4 too: as in llama.cpp's Q4 mixes, 4-bit logits cost far more accuracy
    than the head's share of the time."""
    if quantization == "none":
        return
    if quantization not in QUANTIZATIONS:
        raise InvalidRequestError(
            f"quantization: must be one of {QUANTIZATIONS}, got {quantization!r}",
            param="quantization",
        )
    if quantization == "int4" and next(model.parameters()).device.type != "cpu":
        raise InvalidRequestError(
            "quantization: int4 uses PyTorch's CPU int4 kernel; on a GPU use int8 or none",
            param="quantization",
        )
    replace_linears(
        model, lambda name, linear: _quantize(linear, "int8" if name == "lm_head" else quantization)
    )


def decode_spec(linear: nn.Module) -> LinearSpec | None:
    """``linear``'s :data:`LinearSpec` where it has one (a plain ``nn.Linear`` or a packed
    form), else None."""
    if type(linear) is nn.Linear:
        return ("dense", linear.weight, None, 0, linear.bias, None)
    spec = getattr(linear, "decode_spec", None)
    return None if spec is None else spec()


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Swap every ``nn.Linear`` of ``model`` for ``make(its attribute name, it)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(name, child))


def _quantize(linear: nn.Linear, quantization: str) -> nn.Module:
    if quantization == "int8":
        return Int8Linear(linear)
    for group_size in INT4_GROUP_SIZES:
        if linear.in_features % group_size == 0:
            return Int4Linear(linear, group_size)
    raise InvalidRequestError(
        f"quantization: int4 needs in_features divisible by 32; a layer has "
        f"{linear.in_features}; use int8",
        param="quantization",
    )


def _dense(layer: Int8Linear | Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """The many-rows path: dequantize and run the dense GEMM, in float32 when ``x`` is bf16 on
    a CPU that only emulates bf16 matmul (several times slower there), else in ``x``'s dtype."""
    dtype = x.dtype
    if dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_fast_bf16():
        dtype = torch.float32
    bias = None if layer.bias is None else layer.bias.to(dtype)
    xd = x.to(dtype)
    into = None
    if dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu":
        into = _workspace().get("dequantized", (layer.out_features, layer.in_features), xd)
    return F.linear(xd, layer.dequantize(dtype, into), bias).to(x.dtype)


_WORKSPACES = threading.local()


def _workspace() -> Workspace:
    """This thread's buffers. Every many-row product dequantizes into the same one (a fresh
    tensor of the weight's size page-faults its memory in every time, which costs more than
    the dequantization); it holds the largest weight the thread dequantized."""
    ws = getattr(_WORKSPACES, "ws", None)
    if ws is None:
        ws = _WORKSPACES.ws = Workspace()
    return ws


def _bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)


# A batch-1 decode step calls these ~120 times: the helpers below skip no-op reshapes and
# casts, which still cost a dispatch each (a few percent of such a step).
def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, in_features)


def _in_kernel_dtype(rows: torch.Tensor) -> torch.Tensor:
    return rows if rows.dtype == _KERNEL_DTYPE else rows.to(_KERNEL_DTYPE)


def _finish(
    y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], out_features)
    return y if bias is None else y.add_(bias)  # in place: keeps the activations' dtype
