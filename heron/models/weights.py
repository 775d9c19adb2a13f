"""Turning checkpoint tensors (Hugging Face names) into a heron module's parameters."""

from __future__ import annotations

import torch
from torch import nn

from heron.errors import ModelLoadError
from heron.models.config import ModelConfig


def empty_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An embedding whose weight the loader sets, built without the random init: besides
    being wasted work, ``normal_`` on the meta device (where models are built) imports
    ``torch._dynamo``, seconds of every process's start-up."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


def fuse_projections(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names -> heron names: strip the ``model.`` prefix and fuse qkv / gate_up."""
    out = {k.removeprefix("model."): v for k, v in weights.items()}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            names = [f"{p}self_attn.{n}_proj.{kind}" for n in "qkv"]
            if all(n in out for n in names):
                out[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat([out.pop(n) for n in names])
        gate, up = f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"
        if gate in out and up in out:
            out[f"{p}mlp.gate_up_proj.weight"] = torch.cat([out.pop(gate), out.pop(up)])
    return out


def load_state_dict_strict(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Make the tensors the module's parameters (no copy: they become its memory, which saves
    writing a model's worth of fresh pages); a missing or unexpected tensor is a load error.
    A parameter shared by several modules (tied embeddings) stays shared."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    # rotary_emb.inv_freq and similar buffers may ride along in HF checkpoints.
    unexpected = [n for n in unexpected if "rotary" not in n]
    if missing or unexpected:
        raise ModelLoadError(
            f"weights do not match the {module.__class__.__name__} layout: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, p in params.items():
        w = weights[name]
        if tuple(w.shape) != tuple(p.shape):
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(w.shape)}, expected {tuple(p.shape)}"
            )
    new = {
        id(p): nn.Parameter(weights[name].to(p.dtype).contiguous(), requires_grad=False)
        for name, p in params.items()
    }
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, new[id(p)])


def load_fused_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], cfg: ModelConfig
) -> None:
    """Load Hugging Face-named tensors into a decoder with fused qkv / gate_up projections and
    an ``lm_head`` that may be tied to ``embed_tokens``."""
    fused = fuse_projections(weights, cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # moving off "meta" untied them
        fused.pop("lm_head.weight", None)
    load_state_dict_strict(model, fused)
