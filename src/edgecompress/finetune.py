"""Recovery fine-tuning: a plain loop with two hooks.

``extra_loss`` adds a term (distillation plugs in here); ``after_step`` runs after every optimizer
step (pruning masks are re-applied here, so zeros stay zeros through every step).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .spec import FineTune

Progress = Callable[[str, int, int], None]
ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[int, int], None]


def shuffled(data: DataLoader, seed: int, batch_size: int | None = None) -> DataLoader:
    """The same data, reshuffled from ``seed`` each epoch through a local generator."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data.dataset, batch_size=batch_size or data.batch_size or 64, shuffle=True, generator=gen)


def make_optimizer(params, spec: FineTune) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every parameter entry whose mask is False."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name in params:
                params[name].mul_(mask)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of the weights that already hold zeros (pruned earlier): they stay zero."""
    return {n: p != 0 for n, p in model.named_parameters()
            if n.rpartition(".")[2].startswith("weight") and p.dim() > 1 and bool((p == 0).any())}


def finetune(model: nn.Module, data: DataLoader, spec: FineTune, *, loss: Callable, seed: int,
             masks: dict[str, torch.Tensor] | None = None, extra_loss: ExtraLoss | None = None,
             after_step: Sequence[AfterStep] = (), progress: Progress | None = None,
             label: str = "fine-tune", params=None) -> nn.Module:
    """Train ``model`` in place for ``spec.epochs`` epochs and return it in eval mode."""
    loader = shuffled(data, seed, spec.batch_size)
    total = spec.epochs * len(loader)
    if total == 0:
        return model.eval()
    # a loss that reads intermediate features hooks into the model for the loop only; one with
    # parameters of its own (distillation's feature projections) trains them alongside
    attached = extra_loss.attach(model) if hasattr(extra_loss, "attach") else contextlib.nullcontext()
    params = list(params if params is not None else model.parameters())
    params += list(extra_loss.parameters()) if isinstance(extra_loss, nn.Module) else []
    opt = make_optimizer(params, spec)
    base_lr = [g["lr"] for g in opt.param_groups]
    masks = masks or {}
    apply_masks(model, masks)
    step = 0
    with torch.random.fork_rng(devices=[]), attached:
        torch.manual_seed(seed)
        model.train()
        for _ in range(spec.epochs):
            for x, y in loader:
                if spec.schedule == "cosine":
                    f = 0.5 * (1 + math.cos(math.pi * step / total))
                    for g, lr in zip(opt.param_groups, base_lr):
                        g["lr"] = lr * f
                out = model(x)
                objective = loss(out, y)
                if extra_loss is not None:
                    objective = objective + extra_loss(model, x, y, out)
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                step += 1
                apply_masks(model, masks)
                for hook in after_step:
                    hook(step, total)
                if progress is not None:
                    progress(label, step, total)
    return model.eval()
