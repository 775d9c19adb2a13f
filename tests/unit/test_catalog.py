"""Known models shipped in parts: assembled once into the cache, hash-checked at assembly and
at every load, and never used when the bytes are wrong. Runs on small fake parts in a
throwaway package, so it needs no real model."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from heron.errors import ModelLoadError
from heron.models.catalog import KNOWN_MODELS, KnownModel, Part, resolve_model_path

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


@pytest.fixture
def fake_model(tmp_path, monkeypatch) -> KnownModel:
    pkg = tmp_path / "site" / "heron_fake_parts"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for i, data in enumerate(PARTS):
        (pkg / "data" / f"p{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"".join(PARTS)
    return KnownModel(
        name="fake",
        family="llama",
        params="1",
        quantization="F32",
        license="none",
        filename="fake.gguf",
        requirements=("heron-fake-parts==1.0",),
        parts=tuple(Part("heron_fake_parts", f"data/p{i}.bin") for i in range(len(PARTS))),
        description="fake",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )


def test_parts_are_assembled_once_into_the_cache(fake_model, tmp_path):
    assert fake_model.locate() is None and fake_model.parts_installed()
    path = fake_model.path_for_loading()
    assert path == tmp_path / "cache" / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert fake_model.locate() == path
    mtime = path.stat().st_mtime_ns
    assert fake_model.path_for_loading() == path and path.stat().st_mtime_ns == mtime


def test_a_corrupt_assembled_file_is_refused_at_load(fake_model):
    path = fake_model.path_for_loading()
    data = bytearray(path.read_bytes())
    data[10] ^= 1  # same size, so only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        fake_model.path_for_loading()


def test_parts_with_the_wrong_hash_are_not_assembled(fake_model):
    wrong = dataclasses.replace(fake_model, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        wrong.path_for_loading()
    assert not list(wrong.cache_path.parent.iterdir())  # no file, no leftover temp file


def test_missing_parts_name_the_install_command(fake_model):
    missing = dataclasses.replace(fake_model, parts=(*fake_model.parts, Part("no_such_pkg", "x")))
    with pytest.raises(ModelLoadError, match="heron models --install fake"):
        missing.path_for_loading()


def test_known_names_resolve_case_insensitively():
    default = KNOWN_MODELS["smollm2-135m-instruct"].locate()
    assert resolve_model_path("SmolLM2-135M-Instruct") == default
