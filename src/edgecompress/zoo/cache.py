"""Where trained baselines are kept: ``$EDGECOMPRESS_CACHE`` (default ``~/.cache/edgecompress``),
as safetensors files written atomically (a crash or a second process never leaves half a file)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import write_atomic


def cache_dir() -> Path:
    root = os.environ.get("EDGECOMPRESS_CACHE") or Path.home() / ".cache" / "edgecompress"
    return Path(root)


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as a safetensors file at ``path``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
