"""Reusable scratch buffers (see :class:`Workspace`)."""

from __future__ import annotations

import torch


class Workspace:
    """Named buffers reused across calls. A fresh large CPU allocation is page-faulted in on
    first touch, which can cost as much as the work that fills it (gathered key blocks,
    a dequantized weight); reusing the buffer avoids that. Each name holds the largest shape
    asked of it; ``get`` returns a view of the size asked."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)
