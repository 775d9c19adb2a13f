"""A GGUF reader for loading weights: the metadata and where each tensor lies, in one pass.

gguf's ``GGUFReader`` makes a numpy view of every element of every metadata array, which
takes many seconds for a vocabulary of a few hundred thousand tokens (Gemma 3, Qwen2). Loading
needs the scalar metadata and the tensors, not the vocabulary (the tokenizer
reads that itself, once, and is cached), so this reader steps over the ``tokenizer.ggml.*``
arrays by their lengths. Tensor bytes are memory-mapped; heron.models.gguf_dequant dequantizes
them."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {  # GGUF value type -> struct format (little-endian)
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), as Hugging Face stores it
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """``metadata`` (key -> value, ``tokenizer.ggml.*`` arrays left out) and ``tensors``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map = np.memmap(path, mode="r")
        self._buf = memoryview(self._map)
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            vtype = self._scalar(4)
            skip = key.startswith("tokenizer.ggml.") and vtype == _ARRAY
            value = self._value(vtype, skip)
            if not skip:
                self.metadata[key] = value
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            qtype = GGMLQuantizationType(self._scalar(4))
            infos.append((name, tuple(reversed(dims)), qtype, self._scalar(10)))
        align = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        for name, shape, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * type_size
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors.append(GGUFTensor(name, shape, qtype, start, nbytes))

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes shaped ``[*shape[:-1], bytes per row]``, as gguf.quants wants."""
        data = self._map[t.offset : t.offset + t.nbytes]
        return data.reshape(*t.shape[:-1], -1)

    def _scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype]
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        text = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, vtype: int, skip: bool = False) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            return self._scalar(vtype)
        etype, count = self._scalar(4), self._scalar(10)
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            start, self._pos = self._pos, self._pos + count * size
            if skip:
                return None
            dtype = np.dtype(_SCALARS[etype])
            return np.frombuffer(self._buf, dtype, count, start).tolist()
        items = []
        for _ in range(count):
            if skip and etype == _STRING:  # step over without decoding
                self._pos += 8 + struct.unpack_from("<Q", self._buf, self._pos)[0]
            else:
                items.append(self._value(etype))
        return None if skip else items
