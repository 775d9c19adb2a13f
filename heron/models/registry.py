"""Architecture registry: one entry per model family file.

A new family (Qwen2, Gemma3, ...) is one module with a ``...ForCausalLM`` class and one line
here; GGUF's ``general.architecture`` and HF's ``architectures``/``model_type`` both map to it."""

from __future__ import annotations

from torch import nn

from heron.errors import ModelLoadError
from heron.models.gemma3 import Gemma3ForCausalLM
from heron.models.llama import LlamaForCausalLM
from heron.models.qwen2 import Qwen2ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

# Hugging Face class names that are the same network as a registered family.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture {architecture!r}; heron supports: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None
