"""The models and data the benchmarks build beside the zoo's baselines: a built-in architecture from
another seed, trained and cached once, and a loader's batches as two tensors."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from edgecompress.finetune import finetune
from edgecompress.zoo import BUILTINS


def seeded(name: str, seed: int) -> nn.Module:
    """The built-in task ``name``'s architecture initialised from ``seed`` (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILTINS[name].build()


def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    """Batches of 64, in order, as the zoo trains on."""
    return DataLoader(TensorDataset(x, y), batch_size=64)


def tensors(data: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input and every target of ``data``, each as one tensor."""
    xs, ys = zip(*data)
    return torch.cat(xs), torch.cat(ys)


def cached(name: str, seed: int, path: Path, data: Callable[[], DataLoader], loss: Callable) -> nn.Module:
    """``name``'s architecture from ``seed`` trained with the zoo's schedule on ``data()`` (training seed
    ``seed``), kept at ``path`` as safetensors and read back from there once it exists."""
    model = seeded(name, seed)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    finetune(model, data(), BUILTINS[name].train, loss=loss, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()
