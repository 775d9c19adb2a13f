"""The C++ decode loop (``heron.kernels.decode_layers``) for a model's decoder layers: when a
step may take it, and building it from the layers' weights on first use.

A step of plain decode rows (one query each, attending through the compiled kernel to a plain
KV cache, sliding windows included) runs every layer in one C++ call: the same ops in the same
order as the Python layers, without the interpreter, module calls and dispatch between them.
Every other step runs the Python layers, which stay the reference the loop is tested
against."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from heron import kernels
from heron.layers.attention import AttentionMetadata
from heron.layers.mlp import gelu_tanh
from heron.layers.norm import RMSNorm
from heron.layers.quantized_linear import decode_spec

_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


class DecodeLoop:
    """One model's loop. ``enabled = False`` keeps every step in Python (the tests compare)."""

    def __init__(self, layers: nn.ModuleList, activation: Literal["silu", "gelu_tanh"]) -> None:
        """``activation``: the MLP's, which every layer must use (SwiGLU or GeGLU-tanh)."""
        self.layers = layers
        self.activation = activation
        self.enabled = True
        # (the C++ loop, the most rows it takes), built on first use; False: not possible
        self._built: tuple[object, int] | Literal[False] | None = None

    def applies(self, x: torch.Tensor, kv_caches: Sequence, meta: AttentionMetadata) -> bool:
        """Whether this step's rows may run through the loop (building it the first time)."""
        if not (
            self.enabled
            and meta.plain_decodes(x.shape[0])
            and isinstance(kv_caches[0][0], torch.Tensor)
            and kernels.usable(x)
        ):
            return False
        if self._built is None:
            self._built = self._build() or False
        return bool(self._built) and x.shape[0] <= self._built[1]

    def run(
        self,
        x: torch.Tensor,
        rotary: Sequence[torch.Tensor],
        kv_caches: Sequence,
        meta: AttentionMetadata,
        which: Sequence[int],
    ) -> torch.Tensor:
        """The layers ``which`` over ``x`` [B, hidden]; ``rotary``: the global layers' cos and
        sin, then the local layers' where they differ. Call where :meth:`applies`."""
        keys, values = zip(*kv_caches, strict=True)
        return self._built[0].forward(
            x,
            list(rotary),
            keys,
            values,
            meta.slot_mapping,
            meta.decode_blocks,
            meta.decode_lens,
            meta.decode_visible,
            meta.block_size,
            meta.sliding_window,
            list(which),
        )

    def _build(self) -> tuple[object, int] | None:
        """The loop and the most rows it takes, or None where a layer holds something it does
        not replay (a linear of another kind, another activation, norms that differ)."""
        attn = self.layers[0].self_attn
        norm = self.layers[0].input_layernorm
        act = _ACTIVATIONS[self.activation]
        layers, max_rows = [], sys.maxsize
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            specs = [decode_spec(m) for m in linears]
            norms = [m for m in layer.modules() if isinstance(m, RMSNorm)]
            if (
                None in specs
                or mlp.act is not act
                or a.scale != attn.scale
                or any(n.offset != norm.offset or n.eps != norm.eps for n in norms)
            ):
                return None
            # Packed int8 / int4 linears run their few-row kernels only up to a row count.
            max_rows = min([max_rows, *(getattr(m, "max_gemv_rows", sys.maxsize) for m in linears)])
            qkv, o, gate_up, down = (kernels.decode_linear(*spec) for spec in specs)
            sandwich = hasattr(layer, "pre_feedforward_layernorm")
            layers.append(
                kernels.decode_layer(
                    layer.input_layernorm.weight,
                    qkv,
                    o,
                    layer.post_attention_layernorm.weight,
                    gate_up,
                    down,
                    None if a.q_norm is None else a.q_norm.weight,
                    None if a.k_norm is None else a.k_norm.weight,
                    layer.pre_feedforward_layernorm.weight if sandwich else None,
                    layer.post_feedforward_layernorm.weight if sandwich else None,
                    a.sliding,
                )
            )
        options = kernels.decode_options(
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            attn.scale,
            norm.eps,
            norm.offset,
            self.activation == "gelu_tanh",
        )
        loop = kernels.decode_layers(layers, options)
        return loop, max_rows
