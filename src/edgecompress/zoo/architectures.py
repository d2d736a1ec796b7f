"""Models as users write them, for the conformance matrix (``python -m bench.conformance``).

Each function here is a ``package.module:factory`` returning a ``Task``, exactly what a user hands
edgecompress (``--task edgecompress.zoo.architectures:vit_mha``): torchvision's MobileNetV3-Small,
ShuffleNetV2 x0.5, ResNet-18 and RegNetX-400MF (extra ``architectures``), a vision transformer on
``nn.MultiheadAttention``, a classifier on ``nn.TransformerEncoderLayer``, a DenseNet-style
concatenation net with squeeze-excitation and a groups=4 conv, a 1-D conv audio net and an
Embedding + GRU text model. Weights are random (seeded, nothing downloaded) and trained briefly
on small data, so a short fine-tune after compression means something:

- images: scikit-learn's digits (``data.digits``) padded to 32x32, three channels for torchvision;
- audio: synthetic 1-D clips, 10 classes of tone pairs in noise (256 samples);
- text: synthetic token sequences, the class is which of 10 marker tokens occurs most often.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from .._torchvision import define_ops
from ..errors import RecipeError
from ..finetune import finetune
from ..spec import FineTune
from ..task import Task
from .cache import cache_dir, save_weights
from .data import digits

#: training epochs of a baseline at batch 32 (each architecture sets its own: enough to be well above chance)
EPOCHS = 3
SEED = 0
VERSION = 1  # of the cached baselines (``$EDGECOMPRESS_CACHE/arch-NAME-v1.safetensors``)

def import_torchvision():
    """torchvision, whose models are plain Python. ``import edgecompress`` lets it import beside the
    CPU torch (``edgecompress._torchvision``); when torchvision was imported before that and failed on
    its missing compiled operators, their schemas are defined here and the import runs again."""
    try:
        import torchvision
    except ImportError as e:
        raise RecipeError(f"torchvision is not installed (pip install 'edgecompress[architectures]'): {e}") from None
    except RuntimeError:
        define_ops()
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    return torchvision


def available() -> bool:
    """True when torchvision (extra ``architectures``) is installed."""
    return importlib.util.find_spec("torchvision") is not None


# ---- data --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _images(channels: int):
    """digits at 32x32 (zero padding around the 28x28), ``channels`` copies of the gray plane."""
    return tuple((F.pad(x, (2, 2, 2, 2)).expand(-1, channels, -1, -1).contiguous(), y) for x, y in digits())


@functools.lru_cache(maxsize=1)
def _audio(n: int = 1280, length: int = 256):
    """Class c: a sum of two tones at frequencies 3 + 2c and 40 - 2c cycles per clip, random phases and
    amplitudes, plus noise. Split 60/20/20."""
    g = torch.Generator().manual_seed(SEED)
    y = torch.arange(n) % 10
    t = torch.arange(length, dtype=torch.float32) / length
    f1, f2 = (3 + 2 * y).float(), (40 - 2 * y).float()
    ph = torch.rand(n, 2, generator=g) * 2 * math.pi
    amp = 0.5 + torch.rand(n, 2, generator=g)
    x = (amp[:, :1] * torch.sin(2 * math.pi * f1[:, None] * t + ph[:, :1])
         + amp[:, 1:] * torch.sin(2 * math.pi * f2[:, None] * t + ph[:, 1:])
         + 0.8 * torch.randn(n, length, generator=g))
    return _split(x.unsqueeze(1), y)


VOCAB, SEQ = 200, 32


@functools.lru_cache(maxsize=1)
def _text(n: int = 1280):
    """Token ids (n, 32) drawn from 200 words; class c's marker token 10 + c occurs 3-5 times, two other
    markers once or twice each, so the label needs counting over the sequence."""
    g = torch.Generator().manual_seed(SEED)
    y = torch.arange(n) % 10
    x = torch.randint(20, VOCAB, (n, SEQ), generator=g)
    for i in range(n):
        pos = torch.randperm(SEQ, generator=g)
        k = int(torch.randint(3, 6, (1,), generator=g))
        x[i, pos[:k]] = 10 + y[i]
        others = torch.randperm(10, generator=g)
        others = others[others != y[i]][:2]
        j = k
        for o in others:
            m = int(torch.randint(1, 3, (1,), generator=g))
            x[i, pos[j:j + m]] = 10 + o
            j += m
    return _split(x, y)


def _split(x: torch.Tensor, y: torch.Tensor):
    n = len(y)
    a, b = int(0.6 * n), int(0.8 * n)
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


# ---- models written as users write them ----------------------------------------------------------

class PatchViT(nn.Module):
    """A small vision transformer: 4x4 patch embedding, learned positions, two pre-norm blocks on
    ``nn.MultiheadAttention``, mean-pooled head."""

    def __init__(self, channels: int = 1, size: int = 32, patch: int = 4, dim: int = 64, heads: int = 4,
                 depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EncoderClassifier(nn.Module):
    """Rows of a digit as a sequence of 32 tokens through ``nn.TransformerEncoder`` (two
    ``nn.TransformerEncoderLayer``, post-norm, ReLU), mean-pooled head."""

    def __init__(self, size: int = 32, dim: int = 64, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(size, dim)
        self.pos = nn.Parameter(torch.randn(1, size, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1, 2)) + self.pos
        return self.head(self.encoder(x).mean(dim=1))


class SE(nn.Module):
    """Squeeze-excitation: channel gates from a global average through a bottleneck and a sigmoid."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class DenseSENet(nn.Module):
    """DenseNet-style: each layer's output concatenated to its input, a grouped (groups=4) conv in
    the second block, squeeze-excitation after each block, average-pool transitions."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8))
        self.se1 = SE(32)
        self.trans1 = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(32, 16, groups=4), DenseLayer(48, 16))
        self.se2 = SE(64)
        self.trans2 = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.se1(self.block1(self.stem(x))))
        x = self.trans2(self.se2(self.block2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class AudioNet(nn.Module):
    """A 1-D conv net on raw audio: strided Conv1d stem, three conv/BN/ReLU stages, global average."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16), nn.ReLU()]
        for cin, cout in ((16, 32), (32, 32), (32, 64)):
            layers += [nn.Conv1d(cin, cout, 5, padding=2), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TextGRU(nn.Module):
    """Embedding (200 x 32) -> one-layer GRU (hidden 64) -> the last state -> linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.rnn = nn.GRU(32, 64, batch_first=True)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.fc(out[:, -1])


# ---- tasks ------------------------------------------------------------------------------------

#: examples per split (train, validation, test): small, so that a whole matrix runs in minutes on 2 cores
SIZES = (512, 128, 256)


#: name -> the full (train, validation, test) splits its task was cut from (see ``held_out``)
_SPLITS: dict = {}


def held_out(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example of task ``name``'s data that its model never saw: the test split, then the
    training and validation examples past ``SIZES`` (for digits 1,157 images instead of the 256 of the
    test split, so that a change of one point is 11 images, not 2.6). Build the task first."""
    (xtr, ytr), (xv, yv), (xt, yt) = _SPLITS[name]
    n_train, n_val, n_test = SIZES
    return (torch.cat([xt[:n_test], xtr[n_train:], xv[n_val:], xt[n_test:]]),
            torch.cat([yt[:n_test], ytr[n_train:], yv[n_val:], yt[n_test:]]))


def _task(name: str, build, splits, *, epochs: int = EPOCHS, lr: float = 3e-3, batch_size: int = 64) -> Task:
    _SPLITS[name] = splits
    (xtr, ytr), val, test = ((x[:n], y[:n]) for (x, y), n in zip(splits, SIZES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = build()
    path = cache_dir() / f"arch-{name}-v{VERSION}.safetensors"
    try:
        model.load_state_dict(load_file(str(path)))
    except (FileNotFoundError, SafetensorError, RuntimeError, OSError):
        train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=32)
        threads = torch.get_num_threads()
        try:  # small layers: one thread is faster than two contended ones
            torch.set_num_threads(1)
            finetune(model, train, FineTune(epochs=epochs, lr=lr), loss=F.cross_entropy, seed=SEED,
                     label=f"train {name}")
        finally:
            torch.set_num_threads(threads)
        save_weights(model.state_dict(), path)
    return Task(model=model.eval(), train_data=(xtr, ytr), val_data=val, eval_data=test, metric="accuracy",
                example_input=test[0][:1], name=name, batch_size=batch_size)


def _tv(fn: str, **kw):
    def build():
        return getattr(import_torchvision().models, fn)(weights=None, num_classes=10, **kw)
    return build


def mobilenet_v3_small() -> Task:
    """torchvision MobileNetV3-Small (hardswish, squeeze-excitation, depthwise convs), 32x32 RGB."""
    return _task("mobilenet_v3_small", _tv("mobilenet_v3_small"), _images(3), epochs=15)


def shufflenet_v2() -> Task:
    """torchvision ShuffleNetV2 x0.5 (channel split and shuffle, depthwise convs), 32x32 RGB."""
    return _task("shufflenet_v2", _tv("shufflenet_v2_x0_5"), _images(3), epochs=15)


def resnet18() -> Task:
    """torchvision ResNet-18 (11.2M parameters), 32x32 RGB."""
    return _task("resnet18", _tv("resnet18"), _images(3), epochs=8, lr=1e-3)


def regnet() -> Task:
    """torchvision RegNetX-400MF (grouped convs, 16 channels per group), 32x32 RGB."""
    return _task("regnet", _tv("regnet_x_400mf"), _images(3), epochs=8)


def vit_mha() -> Task:
    """A small ViT on nn.MultiheadAttention (see PatchViT), 32x32 gray."""
    return _task("vit_mha", PatchViT, _images(1), epochs=25, lr=2e-3)


def transformer_encoder() -> Task:
    """A classifier on nn.TransformerEncoderLayer reading image rows as tokens (see EncoderClassifier)."""
    return _task("transformer_encoder", EncoderClassifier, _images(1), epochs=15, lr=2e-3)


def dense_se() -> Task:
    """The DenseNet-style concatenation net with squeeze-excitation and a groups=4 conv, 32x32 gray."""
    return _task("dense_se", DenseSENet, _images(1), epochs=15)


def audio_cnn() -> Task:
    """A 1-D conv net on synthetic audio clips (1 x 256)."""
    return _task("audio_cnn", AudioNet, _audio())


def text_gru() -> Task:
    """Embedding + GRU on synthetic token sequences (32 tokens)."""
    return _task("text_gru", TextGRU, _text(), epochs=15, lr=5e-3)


TASKS = {"mobilenet_v3_small": mobilenet_v3_small, "shufflenet_v2": shufflenet_v2, "resnet18": resnet18,
         "regnet": regnet, "vit_mha": vit_mha, "transformer_encoder": transformer_encoder, "dense_se": dense_se,
         "audio_cnn": audio_cnn, "text_gru": text_gru}


# ---- students for the distill stage (``student: edgecompress.zoo.architectures:student_NAME``) ----

class SmallCNN(nn.Module):
    """Two conv/BN/ReLU/pool stages and a linear head on a 4x4 map: a student for any of the image tasks."""

    def __init__(self, channels: int = 1, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(2 * width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class MeanEmbed(nn.Module):
    """Token embeddings averaged over the non-padding tokens, then a linear map to ``out`` features."""

    def __init__(self, vocab: int, dim: int, out: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != 0).float().unsqueeze(-1)
        h = (self.embed(x) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.fc(h)


def student_mobilenet_v3_small() -> nn.Module:
    return SmallCNN(3)


student_shufflenet_v2 = student_resnet18 = student_regnet = student_mobilenet_v3_small


def student_vit_mha() -> nn.Module:
    return SmallCNN(1)


student_transformer_encoder = student_dense_se = student_vit_mha


def student_audio_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 8, 9, stride=4, padding=4), nn.ReLU(), nn.Conv1d(8, 16, 5, stride=2, padding=2),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 10))


def student_text_gru() -> nn.Module:
    return MeanEmbed(VOCAB, 16, 10)


def student_embed() -> nn.Module:
    """A student for ``minilm-embed``: BERT's vocabulary averaged into 64 features, mapped to 384."""
    return MeanEmbed(30522, 64, 384)
