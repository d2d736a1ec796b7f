"""Addressing layers by name: exact name first, then ``re:`` regular expressions."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from .errors import RecipeError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def weighted_layers(model: nn.Module, types: tuple[type, ...] = PRUNABLE) -> dict[str, nn.Module]:
    """Named modules of ``types`` that hold a weight, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, types) and getattr(m, "weight", None) is not None}


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
