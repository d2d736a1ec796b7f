"""Built-in model architectures. Each builder takes no arguments and returns a fresh module.
Layers are named so that recipes can address them (``layers: [fc1, "re:conv.*"]``)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def lenet300() -> nn.Module:
    """LeNet-300-100: 784-300-100-10, 266,610 parameters."""
    return _seq(flatten=nn.Flatten(), fc1=nn.Linear(784, 300), relu1=nn.ReLU(),
                fc2=nn.Linear(300, 100), relu2=nn.ReLU(), fc3=nn.Linear(100, 10))


def lenet5() -> nn.Module:
    """LeNet-5 as in Caffe's MNIST example: 431,080 parameters, 2,293,000 MACs at 28x28."""
    return _seq(conv1=nn.Conv2d(1, 20, 5), pool1=nn.MaxPool2d(2), conv2=nn.Conv2d(20, 50, 5),
                pool2=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(800, 500), relu=nn.ReLU(),
                fc2=nn.Linear(500, 10))


def mnist1d_cnn() -> nn.Module:
    """A small 1-D CNN for MNIST-1D (inputs of shape (N, 1, 40)); 31,498 parameters."""
    return _seq(conv1=nn.Conv1d(1, 64, 5, padding=2), relu1=nn.ReLU(),
                conv2=nn.Conv1d(64, 64, 3, stride=2, padding=1), relu2=nn.ReLU(),
                conv3=nn.Conv1d(64, 64, 3, stride=2, padding=1), relu3=nn.ReLU(),
                flatten=nn.Flatten(), fc=nn.Linear(640, 10))
