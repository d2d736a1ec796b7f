"""The prune stage's spec: every variant a parameter, the cross-field rules checked before any work,
and the ``per_layer`` overrides resolved against a model's layer names."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from ...context import Context
from ...errors import RecipeError
from ...layers import match
from ...spec import StageSpec

Ratio = Annotated[float, Field(ge=0, lt=1)]
STRUCTURED = ("channel", "block")


def _rule(line: str) -> PydanticCustomError:
    """A cross-field rule broken: ``line`` is the text after the stage's path."""
    return PydanticCustomError("spec_rule", "{line}", {"line": line})


class PruneSpec(StageSpec):
    """``{stage: prune, criterion: magnitude, norm: 1, sparsity: 0.9, scope: global}``"""

    stage: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "taylor", "activation", "random"] = "magnitude"
    norm: Literal[1, 2] = 1
    activation: Literal["mean", "apoz"] = Field(default="mean", description="statistic of criterion activation")
    granularity: Literal["unstructured", "balanced", "nm", "channel", "block"] = "unstructured"
    pattern: str | None = Field(default=None, description='N:M pattern of granularity nm, e.g. "2:4"')
    sparsity: float | None = Field(default=None, ge=0, lt=1,
                                   description="fraction removed: of the targeted weights, of each group's "
                                               "channels (channel), of the candidate blocks (block), or of "
                                               "the target quantity (scope sensitivity)")
    scope: Literal["global", "layer", "sensitivity"] = "global"
    target: Literal["sparsity", "params", "macs"] = Field(default="sparsity",
                                                          description="what scope sensitivity budgets")
    per_layer: dict[str, Ratio] | None = Field(default=None, description="ratio by layer name or re: pattern")
    layers: list[str] | None = Field(default=None, description="names or re: patterns; default all Linear/Conv")
    exclude: list[str] | None = None
    keep_output: bool = Field(default=True, description="leave the model's output layer (the classifier) "
                              "whole unless layers or per_layer names it")
    schedule: Literal["oneshot", "iterative", "gradual", "lottery"] = "oneshot"
    steps: int = Field(default=3, ge=1, le=100, description="prune steps of schedules iterative and lottery")
    frequency: int = Field(default=10, ge=1, le=100000, description="gradual: optimizer steps between prunes")
    ramp: float = Field(default=0.75, gt=0, le=1, description="gradual: fraction of fine-tune steps to reach sparsity")
    rewind_epochs: int = Field(default=0, ge=0, le=1000,
                               description="lottery: 0 rewinds to initialisation, k to it after k epochs")
    calib_batches: int = Field(default=8, ge=1, le=10000, description="batches for taylor, activation, scans")
    scan_ratios: list[Ratio] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98], min_length=1)

    @model_validator(mode="after")
    def _rules(self) -> PruneSpec:
        g = self.granularity
        if g == "nm":
            if self.pattern is None:
                raise _rule("pattern is required for granularity nm (e.g. \"2:4\")")
            m = re.fullmatch(r"(\d+):(\d+)", self.pattern)
            if not m or not 0 < int(m[1]) < int(m[2]) <= 64:
                raise _rule(f"pattern must be N:M with 0 < N < M <= 64; got {self.pattern!r}")
        elif self.pattern is not None:
            raise _rule(f"pattern needs granularity nm; got granularity {g!r}")
        if self.sparsity is None and g != "nm":
            raise _rule("sparsity is required")
        if self.criterion == "activation" and g != "channel":
            raise _rule(f"criterion activation needs granularity channel; got {g!r}")
        if self.scope == "sensitivity" and g in ("nm", "block"):
            raise _rule(f"scope sensitivity needs granularity unstructured, balanced or channel; got {g!r}")
        if self.target != "sparsity" and self.scope != "sensitivity":
            raise _rule(f"target {self.target} needs scope sensitivity; got scope {self.scope!r}")
        if self.target == "macs" and g != "channel":
            raise _rule(f"target macs needs granularity channel (zeros do not remove MACs); got {g!r}")
        if self.schedule in ("gradual", "lottery") and g in STRUCTURED:
            raise _rule(f"schedule {self.schedule} needs granularity unstructured, balanced or nm; got {g!r}")
        if self.schedule == "iterative" and g == "block":
            raise _rule("schedule iterative needs granularity unstructured, balanced, nm or channel; got 'block'")
        if self.schedule != "oneshot" and self.finetune is None:
            raise _rule(f"finetune is required for schedule {self.schedule}")
        return self

    @property
    def nm(self) -> tuple[int, int]:
        n, m = (self.pattern or "2:4").split(":")
        return int(n), int(m)


def explicit_ratios(names: list[str], spec: PruneSpec, ctx: Context) -> dict[str, float]:
    """Explicit ratios: the first ``per_layer`` pattern matching a layer wins."""
    out: dict[str, float] = {}
    for i, (pat, r) in enumerate((spec.per_layer or {}).items()):
        hit = match(names, pat)
        if not hit:
            raise RecipeError(f"{ctx.where}.per_layer[{i}] matches no layer; got {pat!r} (layers: {', '.join(names)})")
        for n in hit:
            out.setdefault(n, r)
    return out
