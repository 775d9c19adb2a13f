"""Read a checkpoint (GGUF file or Hugging Face folder) into a ModelConfig + HF-named tensors,
then build the registered model family on the requested device and dtype."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heron.errors import ModelLoadError
from heron.layers.packed_linear import pack_linears
from heron.layers.quantized_linear import quantize_linears
from heron.models.config import ModelConfig
from heron.models.config_checks import (
    HARMLESS_GGUF_TENSORS,
    check_gguf_metadata,
    check_hf_config,
)
from heron.models.gguf_dequant import dequantize
from heron.models.gguf_file import GGUFFile, GGUFTensor
from heron.models.registry import HF_ARCHITECTURES, get_model_class
from heron.models.rope_config import (
    context_length,
    hf_rope_parameters,
    rope_from_gguf,
    rope_from_hf,
)

# GGUF tensor names (per block, after "blk.N.") -> Hugging Face names (after "model.layers.N.").
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_to_hf_name(name: str, block_names: dict[str, str] | None = None) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown.

    ``block_names`` overrides the per-block table for one family (Gemma3's ``ffn_norm``)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        hf = (block_names or {}).get(m.group(2)) or _GGUF_BLOCK_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{hf}.{m.group(3)}" if hf else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


class Checkpoint:
    """A model's config and weights (HF names, CPU tensors) plus its tokenizer source."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: the one the model will run in; each floating tensor is converted to it
        as it is read, so a bf16 checkpoint run in bf16 is never copied to float32 and the
        memory a load takes is about the model's."""
        self.path = path
        if path.is_dir():
            self.config, self.weights = _read_hf_folder(path, dtype)
        elif path.suffix == ".gguf" or _has_gguf_magic(path):
            self.config, self.weights = _read_gguf(path, dtype)
        else:
            raise ModelLoadError(
                f"{path} is neither a .gguf file nor a Hugging Face folder with config.json"
            )

    def keep_first_layers(self, num_layers: int) -> None:
        """Drop the decoder layers from ``num_layers`` on, keeping the embeddings, final norm
        and head: a model's first layers as a cheap draft with the same tokenizer."""
        if not 1 <= num_layers <= self.config.num_layers:
            raise ModelLoadError(
                f"{self.path}: cannot keep {num_layers} of {self.config.num_layers} layers"
            )
        self.config.num_layers = num_layers
        self.weights = {
            name: w
            for name, w in self.weights.items()
            if not (m := re.match(r"model\.layers\.(\d+)\.", name)) or int(m.group(1)) < num_layers
        }


def build_model(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, quantization: str = "none"
) -> nn.Module:
    cls = get_model_class(ckpt.config.architecture)
    with torch.device("meta"):
        model = cls(ckpt.config).to(dtype)  # so tensors read in ``dtype`` are not converted
    model = model.to_empty(device="cpu")
    # Buffers (rotary tables) are computed, not loaded: rebuild them off the meta device.
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    model.load_weights(ckpt.weights)
    model = model.to(device=device, dtype=dtype).eval()
    quantize_linears(model, quantization)
    if quantization == "none":
        pack_linears(model)
    return model


# ---------------------------------------------------------------- GGUF


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _open_gguf(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except Exception as e:  # bad bytes raise many kinds
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (corrupt or truncated?): {e}"
        ) from None


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    gguf = _open_gguf(path)
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture")
    cls = get_model_class(arch)

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    shapes = {t.name: t.shape for t in gguf.tensors}
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    check_gguf_metadata(arch, meta, head_dim)
    rope_freqs = next((t for t in gguf.tensors if t.name == "rope_freqs.weight"), None)
    freq_factors = None
    if rope_freqs is not None:
        freq_factors = _dequantize(path, gguf, rope_freqs).reshape(-1).tolist()
    rope_scaling = rope_from_gguf(meta, arch, freq_factors)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or _gguf_vocab_size(path, shapes)),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=context_length(rope_scaling, int(key("context_length"))),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias=any(n.endswith("attn_q.bias") for n in shapes),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=sorted({int(t) for t in (eos, eot) if t is not None}),
        rope_scaling=rope_scaling,
        extra={"gguf_metadata": meta},
    )
    weights: dict[str, torch.Tensor] = {}
    for t in gguf.tensors:
        if t is rope_freqs:
            continue
        hf_name = gguf_to_hf_name(t.name, cls.gguf_block_names)
        if hf_name is None:
            if t.name.split(".")[-2] in HARMLESS_GGUF_TENSORS:
                continue
            raise ModelLoadError(f"{path}: GGUF tensor {t.name} is not supported for {arch}")
        tensor = _dequantize(path, gguf, t)
        weights[hf_name] = cls.gguf_tensor_fixup(hf_name, tensor, cfg).to(dtype)
    return cfg, weights


def _dequantize(path: Path, gguf: GGUFFile, t: GGUFTensor) -> torch.Tensor:
    try:
        return dequantize(gguf.raw(t), t.qtype).reshape(t.shape)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"{path}: tensor {t.name} has type {t.qtype.name}, which heron cannot read ({e})"
        ) from None


def _gguf_vocab_size(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """From the embedding's row count, where the metadata has no <arch>.vocab_size."""
    if "token_embd.weight" not in shapes:
        raise ModelLoadError(f"{path}: GGUF has neither <arch>.vocab_size nor token_embd.weight")
    return shapes["token_embd.weight"][0]


# ---------------------------------------------------------------- Hugging Face folder


def _read_hf_folder(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    arch_names = hf.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in arch_names if a in HF_ARCHITECTURES), None)
    arch = arch or hf.get("model_type", "?")
    get_model_class(arch)  # fail early on an unsupported family
    check_hf_config(arch, hf)
    rope = hf_rope_parameters(hf)
    rope_scaling = rope_from_hf(rope, hf)
    weights = _read_safetensors(path, dtype)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=context_length(
            rope_scaling, hf.get("max_position_embeddings", 2048)
        ),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=any(k.endswith("self_attn.q_proj.bias") for k in weights),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=[int(e) for e in eos_ids],
        extra={"hf_config": hf},
    )
    return cfg, weights


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files: those ``model.safetensors.index.json`` maps (a sharded checkpoint),
    else ``model.safetensors``, else every ``*.safetensors`` of the folder. A folder may hold
    other safetensors beside the model's (Mistral's ``consolidated.safetensors``)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path} lacks the shards {missing} its index names")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weight files")
    return files


def _read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files, floating ones converted to ``dtype`` one at
    a time as they are read."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt") as shard:
                for name in shard.keys():
                    tensor = shard.get_tensor(name)
                    weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except Exception as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file: {e}") from None
    return weights
