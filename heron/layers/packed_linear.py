"""Linears with their weight pre-packed for oneDNN (CPU, ``quantization="none"``).

``F.linear`` on a plain bf16 weight lets oneDNN re-block the weight on every call; packed
once at load time (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU weight
prepacking uses), the same products are bit-identical and faster: the re-blocking weighs most
up to a few hundred rows, and at thousands the GEMM's own work hides it.

float32 goes through MKL, which is fast on Intel CPUs (there the packed kernel was neither
faster nor bit-identical, so float32 stays unpacked) and slow elsewhere, most of all at a few
rows, where oneDNN's packed kernel is several times faster. So on other vendors' CPUs
float32 linears are packed too; their outputs then differ from F.linear's by rounding
(~1e-6 relative), and each row's result no longer depends on how many rows share the call
(MKL's does).

The tied LM head gets its own packed copy (the embedding keeps the plain weight): one more
embedding-sized tensor in memory.

A decode step's few rows (up to ``kernels.bf16_gemv_max_rows()``: 64, 16 with AMX) go through
heron's bf16 GEMV instead where the CPU has AVX512_BF16 (``heron.kernels.bf16_gemv``): it
streams the plain [out, in] weight faster than oneDNN's packed GEMM at a few rows (close to
the memory's speed, where a step spends most of its time), and each row's result does
not depend on how many rows share the call, so speculative verify rows reproduce plain
decoding's tokens in bf16.
That keeps the plain weight next to the packed one: a second copy of every bf16 linear's
weight (SmolLM2-135M: +202 MiB, Qwen2.5-0.5B: +942 MiB), except a tied head's, which is the
embedding's own. So a model gets it only where that copy takes at most a quarter of the
memory available at load (a 7B model in bf16 on a 24 GB machine does not; logged either way).
Outputs of those few rows differ from F.linear's by rounding (fp32 sums in another order)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from heron import kernels
from heron.layers.quantized_linear import LinearSpec, replace_linears
from heron.platform import cpu_is_intel, free_memory_bytes

logger = logging.getLogger(__name__)

# Rows the packed layout is chosen for (oneDNN takes any count; this is a decode batch).
_PACK_ROWS = 64


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, gemv: bool = True) -> None:
        """``gemv``: keep the plain bf16 weight for heron's bf16 GEMV where it runs here."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS), persistent=False
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        # The plain weight heron's bf16 GEMV reads for up to gemv_rows rows (0: oneDNN always).
        few_rows = gemv and weight.dtype == torch.bfloat16 and _bf16_gemv_runs(weight)
        self.register_buffer("few_rows_weight", weight if few_rows else None, persistent=False)
        self.gemv_rows = kernels.bf16_gemv_max_rows() if few_rows else 0

    def decode_spec(self) -> LinearSpec:
        return ("mkldnn", self.packed, None, 0, self.bias, self.few_rows_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.few_rows_weight is not None and x.dim() == 2 and x.shape[0] <= self.gemv_rows:
            return kernels.bf16_gemv(x, self.few_rows_weight, self.bias)
        return _onednn_linear(x, self.packed, self.bias)


def _onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_linears(model: nn.Module) -> None:
    """Replace every ``nn.Linear`` of a CPU model with a :class:`PackedLinear` where that is
    faster: bf16 always, float32 on CPUs other than Intel's; a no-op for other dtypes and
    devices, or where this PyTorch has no oneDNN (logged)."""
    first = next(model.parameters())
    if first.device.type != "cpu" or not packs(first.dtype):
        return
    if not (torch.backends.mkldnn.is_available() and _packs_correctly(first.dtype)):
        logger.info("oneDNN weight packing unavailable here: %s linears run unpacked", first.dtype)
        return
    gemv = _room_for_gemv_weights(model)
    replace_linears(model, lambda name, linear: PackedLinear(linear, gemv))


def _room_for_gemv_weights(model: nn.Module) -> bool:
    """Whether the plain bf16 weights heron's GEMV reads may stay next to the packed ones:
    at most a quarter of the memory available now (logged)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0].weight.dtype != torch.bfloat16:
        return False
    if not _bf16_gemv_runs(linears[0].weight):
        return False
    shared = {
        p.data_ptr()
        for m in model.modules()
        if not isinstance(m, nn.Linear)
        for p in m.parameters(recurse=False)
    }  # a tied head reads the embedding
    extra = sum(m.weight.nbytes for m in linears if m.weight.data_ptr() not in shared)
    free = free_memory_bytes(torch.device("cpu"))
    room = extra <= free // 4
    logger.info(
        "bf16 GEMV for decode steps %s: its plain weights take %.0f MiB next to the packed "
        "ones (%.0f MiB available)",
        "on" if room else "off",
        extra / 2**20,
        free / 2**20,
    )
    return room


def packs(dtype: torch.dtype) -> bool:
    """Whether CPU linears of ``dtype`` are worth packing here (see the module's docstring)."""
    return dtype == torch.bfloat16 or (dtype == torch.float32 and not cpu_is_intel())


def _bf16_gemv_runs(weight: torch.Tensor) -> bool:
    """Whether heron's bf16 GEMV takes ``weight`` here (a contiguous CPU bf16 weight, kernels
    built with AVX512_BF16)."""
    return weight.is_contiguous() and kernels.usable(weight) and kernels.bf16_gemv_runs()


def _packs_correctly(dtype: torch.dtype) -> bool:
    """Whether the packed op runs here and gives F.linear's result: its very bits in bf16,
    within rounding in float32 (a probe, once per load)."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(dtype)
    x = torch.randn(5, 64, generator=g).to(dtype)
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight, _PACK_ROWS)
            got, want = _onednn_linear(x, packed, linear.bias), linear(x)
    except (RuntimeError, AttributeError) as e:
        logger.debug("oneDNN packing probe failed: %s", e)
        return False
    if dtype == torch.bfloat16:
        return torch.equal(got, want)
    return torch.allclose(got, want, rtol=1e-5, atol=1e-5)
