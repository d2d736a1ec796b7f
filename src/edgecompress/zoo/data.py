"""Built-in data sets, made offline and deterministically from what packages ship."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

Split = tuple[torch.Tensor, torch.Tensor]


@lru_cache(maxsize=1)
def digits(seed: int = 0) -> tuple[Split, Split, Split]:
    """scikit-learn's bundled 8x8 digits in [0, 1], upsampled to 28x28 (bilinear), split 60/20/20
    stratified with a fixed seed into train, validation and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.4, stratify=d.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=d.target[rest], random_state=seed)
    return tuple((x[i], y[i]) for i in (np.sort(train), np.sort(val), np.sort(test)))  # type: ignore[return-value]


@lru_cache(maxsize=1)
def mnist1d(val_size: int = 400) -> tuple[Split, Split, Split]:
    """MNIST-1D from the ``mnist1d`` package's ``make_dataset`` with its default arguments
    (4,000 train / 1,000 test, generated locally); the last ``val_size`` training examples are
    held out for validation. Inputs have shape (N, 1, 40)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d["y"], dtype=torch.long)
    xt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    yt = torch.tensor(d["y_test"], dtype=torch.long)
    n = len(y) - val_size
    return (x[:n], y[:n]), (x[n:], y[n:]), (xt, yt)
