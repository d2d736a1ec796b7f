"""Addressing layers by name: exact name first, then ``re:`` regular expressions."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .errors import RecipeError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def weighted_layers(model: nn.Module, types: tuple[type, ...] = PRUNABLE) -> dict[str, nn.Module]:
    """Named modules of ``types`` that hold a weight, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, types) and getattr(m, "weight", None) is not None}


def parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding layer ``name`` and the attribute it is held under."""
    head, _, tail = name.rpartition(".")
    return (model.get_submodule(head) if head else model), tail


def replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` in place of layer ``name`` (a dotted name from ``named_modules``); returns the
    layer it replaced. The one way edgecompress swaps a layer."""
    owner, attr = parent(model, name)
    old = owner.get_submodule(attr)
    setattr(owner, attr, module)
    return old


def next_siblings(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """Modules that run after layer ``name`` in its nn.Sequential parent (empty when not in a Sequential)."""
    owner, attr = parent(model, name)
    if not isinstance(owner, nn.Sequential):
        return []
    keys = list(owner._modules)
    prefix = name[: -len(attr)]
    return [(prefix + k, owner._modules[k]) for k in keys[keys.index(attr) + 1:]]


def match(names: Iterable[str], pattern: str) -> list[str]:
    names = list(names)
    if not pattern.startswith("re:"):
        return [pattern] if pattern in names else []
    rx = re.compile(pattern[3:])
    return [n for n in names if rx.fullmatch(n)]


def select(candidates: Sequence[str], include: Sequence[str] | None, exclude: Sequence[str] | None,
           where: str = "") -> list[str]:
    """The candidates chosen by ``include`` (all when None) minus ``exclude``, in candidate order.

    A pattern that matches nothing is an error naming the field and the pattern.
    """
    chosen: set[str] = set(candidates) if include is None else set()
    for key, patterns in (("layers", include), ("exclude", exclude)):
        for i, pat in enumerate(patterns or []):
            hit = match(candidates, pat)
            if not hit:
                prefix = f"{where}." if where else ""
                raise RecipeError(f"{prefix}{key}[{i}] matches no layer; got {pat!r} "
                                  f"(layers: {', '.join(candidates)})")
            if key == "layers":
                chosen.update(hit)
            else:
                chosen.difference_update(hit)
    return [c for c in candidates if c in chosen]


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def output_layers(model: nn.Module, example: torch.Tensor, *, fallback: bool = True) -> list[str]:
    """Weighted layers whose output is the model's output (the classifier of a classifier).

    A layer counts when the model returns its output tensor, a view of it (flatten, squeeze), or when
    it is the last weighted layer to run and its output has the model output's shape. With
    ``fallback`` and no such layer, the last layer in definition order is returned.
    """
    layers = weighted_layers(model)
    produced: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: produced.append((n, o)))
             for n, m in layers.items()]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    outs = _tensors(out)
    names: list[str] = []
    for n, o in produced:
        if not isinstance(o, torch.Tensor):
            continue
        if any(o is t or (o.numel() == t.numel() and o.untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
               for t in outs):
            names.append(n)
    if not names and produced and isinstance(produced[-1][1], torch.Tensor):
        n, o = produced[-1]
        if any(o.shape == t.shape for t in outs):
            names.append(n)
    if not names and fallback:
        names = list(layers)[-1:]
    return list(dict.fromkeys(names))


def leave_output_alone(model: nn.Module, example: torch.Tensor, candidates: Sequence[str],
                       include: Sequence[str] | None, keep_output: bool,
                       named: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """``candidates`` without the model's output layer, unless ``include`` (or a pattern in ``named``)
    names it or ``keep_output`` is off; returns the remaining names and why each one was left out."""
    if not keep_output or include is not None:
        return list(candidates), {}
    named = list(named)
    outputs = {n for n in output_layers(model, example, fallback=False)
               if not any(match([n], p) for p in named)}
    why = ("the model's output layer is left whole (name it in layers, or keep_output: false, "
           "to include it)")
    return [c for c in candidates if c not in outputs], {c: why for c in candidates if c in outputs}


def layer_macs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
    """MACs per sample of each named layer (output elements x weights per output), from one forward."""
    macs: dict[str, int] = {}

    def hook(m, _i, o, n):
        out = o[0] if isinstance(o, (tuple, list)) else o
        macs[n] = (out[0].numel() if out.dim() > 1 else out.numel()) * m.weight[0].numel()

    forward_with_hooks(model, example, [(model.get_submodule(n), lambda m, i, o, n=n: hook(m, i, o, n))
                                        for n in names])
    return macs


def forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks) -> None:
    """One forward of ``example`` without gradients, with ``hooks`` ((module, forward hook) pairs)
    registered for it and removed after, whatever happens."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
