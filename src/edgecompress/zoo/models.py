"""Built-in model architectures. Each builder takes no arguments and returns a fresh module.
Layers are named so that recipes can address them (``layers: [fc1, "re:conv.*"]``)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def lenet300() -> nn.Module:
    """LeNet-300-100: 784-300-100-10, 266,610 parameters."""
    return seq(flatten=nn.Flatten(), fc1=nn.Linear(784, 300), relu1=nn.ReLU(),
                fc2=nn.Linear(300, 100), relu2=nn.ReLU(), fc3=nn.Linear(100, 10))


def lenet5() -> nn.Module:
    """LeNet-5 as in Caffe's MNIST example: 431,080 parameters, 2,293,000 MACs at 28x28."""
    return seq(conv1=nn.Conv2d(1, 20, 5), pool1=nn.MaxPool2d(2), conv2=nn.Conv2d(20, 50, 5),
                pool2=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(800, 500), relu=nn.ReLU(),
                fc2=nn.Linear(500, 10))


def mnist1d_cnn() -> nn.Module:
    """A small 1-D CNN for MNIST-1D (inputs of shape (N, 1, 40)); 31,498 parameters."""
    return seq(conv1=nn.Conv1d(1, 64, 5, padding=2), relu1=nn.ReLU(),
                conv2=nn.Conv1d(64, 64, 3, stride=2, padding=1), relu2=nn.ReLU(),
                conv3=nn.Conv1d(64, 64, 3, stride=2, padding=1), relu3=nn.ReLU(),
                flatten=nn.Flatten(), fc=nn.Linear(640, 10))


def lenet300_tiny() -> nn.Module:
    """A 784-32-10 MLP student for digits-lenet300: 25,450 parameters."""
    return seq(flatten=nn.Flatten(), fc1=nn.Linear(784, 32), relu1=nn.ReLU(), fc2=nn.Linear(32, 10))


def lenet5_tiny() -> nn.Module:
    """A 6/16-channel LeNet student for digits-lenet5: 19,670 parameters."""
    return seq(conv1=nn.Conv2d(1, 6, 5), pool1=nn.MaxPool2d(2), conv2=nn.Conv2d(6, 16, 5),
                pool2=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(256, 64), relu=nn.ReLU(),
                fc2=nn.Linear(64, 10))


def mnist1d_cnn_tiny() -> nn.Module:
    """An 8/16/16-channel 1-D CNN student for mnist1d-cnn: 2,842 parameters."""
    return seq(conv1=nn.Conv1d(1, 8, 5, padding=2), relu1=nn.ReLU(),
                conv2=nn.Conv1d(8, 16, 3, stride=2, padding=1), relu2=nn.ReLU(),
                conv3=nn.Conv1d(16, 16, 3, stride=2, padding=1), relu3=nn.ReLU(),
                flatten=nn.Flatten(), fc=nn.Linear(160, 10))

class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``: a residual block whose body and shortcut are named modules."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
             act: nn.Module | None = None) -> nn.Sequential:
    layers = dict(conv=nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn=nn.BatchNorm2d(cout))
    if act is not None:
        layers["act"] = act
    return seq(**layers)


def _basic_block(cin: int, cout: int, stride: int) -> Residual:
    body = seq(conv1=nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn1=nn.BatchNorm2d(cout), relu=nn.ReLU(),
                conv2=nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn2=nn.BatchNorm2d(cout))
    short = None if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride)
    return Residual(body, short, nn.ReLU())


def resnet8() -> nn.Module:
    """A small ResNet for 28x28 digits: a strided stem, three basic blocks (widths 16, 32, 64, the
    last two strided with 1x1 shortcuts) and a linear classifier; 8 weighted layers on the main path."""
    return seq(stem=conv_bn(1, 16, 3, 2, act=nn.ReLU()),
                block1=_basic_block(16, 16, 1), block2=_basic_block(16, 32, 2), block3=_basic_block(32, 64, 2),
                gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, 10))


def _inverted_residual(cin: int, cout: int, stride: int, expand: int = 3) -> nn.Module:
    hidden = cin * expand
    body = seq(expand=conv_bn(cin, hidden, 1, act=nn.ReLU6()),
                dw=conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()),
                project=conv_bn(hidden, cout, 1))
    return Residual(body) if stride == 1 and cin == cout else body


def mobilenet() -> nn.Module:
    """A MobileNetV2-style net for 28x28 digits: depthwise-separable inverted residual blocks
    (1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut where shapes match)."""
    return seq(stem=conv_bn(1, 16, 3, 2, act=nn.ReLU6()),
                ir1=_inverted_residual(16, 16, 2), ir2=_inverted_residual(16, 24, 1),
                ir3=_inverted_residual(24, 24, 1), ir4=_inverted_residual(24, 32, 2),
                ir5=_inverted_residual(32, 32, 1), head=conv_bn(32, 64, 1, act=nn.ReLU6()),
                gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, 10))


class RowRNN(nn.Module):
    """Reads a (N, 1, 28, 28) image as a sequence of 28 rows of 28 features: a one-layer recurrent
    layer ``rnn`` (batch first) and a linear classifier ``fc`` on its output at the last row."""

    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU], hidden: int = 64) -> None:
        super().__init__()
        self.rows = nn.Flatten(1, 2)
        self.rnn = cell(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.rnn(self.rows(x))
        return self.fc(out[:, -1])


def digits_lstm() -> nn.Module:
    """LSTM over the 28 rows of a digit, hidden size 64, then Linear(64, 10): 24,714 parameters."""
    return RowRNN(nn.LSTM)


def digits_gru() -> nn.Module:
    """GRU over the 28 rows of a digit, hidden size 64, then Linear(64, 10): 18,698 parameters."""
    return RowRNN(nn.GRU)
