"""Ensembles: several compressed members run side by side and combined, deployed as one model.

``{stage: ensemble, members: [[stages...], [stages...], {model: mnist1d-cnn-tiny, train: {...}}],
combine: average, seeds: [0, 1, 2]}``. A member is a list of stages applied to a copy of the input
model, or a different architecture (a zoo student, a built-in task's architecture or
``package.module:factory``) trained from scratch as by a ``distill`` stage (distilled from the
baseline unless ``train.distill.alpha`` is 0), then its own ``stages``. Each member runs its stages
with its own seed, so members differ by seed, architecture and compression.

``combine`` (outputs read as class logits along dim 1, except ``logits``):
- ``average``: log of the mean of the members' softmax probabilities;
- ``logits``: the mean of the members' outputs (any output, also embeddings);
- ``vote``: one-hot of each member's argmax, summed, plus half the mean probability (ties go to the
  class the members are more sure of; a majority always wins);
- ``weighted``: log of a weighted mean of the probabilities, weights fitted on the validation split;
- ``stack``: a linear (logistic) combiner on the members' log-probabilities, trained on the
  validation split (held towards the plain average by an L2 penalty).
Neither fit ever reads the test split. The result is one ``Ensemble`` module, exported as one ONNX
graph: the members side by side, then the combiner.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from torch import nn
from torch.nn import functional as F

from ..context import Context
from ..errors import RecipeError
from ..primitives.ensemble import Ensemble, combine_outputs
from ..spec import FineTune, Strict, StageSpec, describe
from .cluster import ClusterSpec
from .distill import DistillSpec
from .lowrank import LowRankSpec
from .prune import PruneSpec
from .quantize import QuantizeSpec

#: what a member's stages may be (ensembles do not nest)
MEMBER_STAGES = {"prune": PruneSpec, "quantize": QuantizeSpec, "cluster": ClusterSpec, "lowrank": LowRankSpec,
                 "distill": DistillSpec}


def _rule(line: str) -> PydanticCustomError:
    return PydanticCustomError("spec_rule", "{line}", {"line": line})


class ModelMember(Strict):
    """A member of another architecture, trained from scratch first, then compressed by ``stages``."""

    model: str = Field(description="a zoo student, a built-in task's architecture or package.module:factory")
    train: FineTune = Field(default_factory=lambda: DistillSpec.model_fields["train"].default_factory(),
                            description="training from scratch, as the distill stage's train (distilled from "
                                        "the baseline unless distill.alpha is 0)")
    stages: list[Any] = Field(default_factory=list, description="stages applied after training")


class EnsembleSpec(StageSpec):
    """``{stage: ensemble, members: [[{stage: prune, sparsity: 0.9}], [{stage: cluster, bits: 4}]]}``"""

    stage: Literal["ensemble"] = "ensemble"
    members: list[Any] = Field(description="at least two: each a list of stages applied to a copy of the input "
                                           "model, or {model, train, stages}")
    combine: Literal["average", "logits", "vote", "weighted", "stack"] = "average"
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, description="one per member (default: "
                                                              "the stage's seed + member index)")
    l2: float = Field(default=1e-2, ge=0, le=100, description="stack: L2 penalty pulling the combiner towards "
                                                              "the plain average")

    @model_validator(mode="after")
    def _members(self) -> EnsembleSpec:
        if not isinstance(self.members, list) or len(self.members) < 2:
            n = len(self.members) if isinstance(self.members, list) else 0
            raise _rule(f"members must list at least 2 members; got {n}")
        self.members = [_member(m, i) for i, m in enumerate(self.members)]
        if self.seeds is not None and len(self.seeds) != len(self.members):
            raise _rule(f"seeds must give one seed per member ({len(self.members)}); got {len(self.seeds)}")
        if self.finetune is not None:
            raise _rule("finetune is not taken by an ensemble (each member's stages fine-tune it); got "
                        f"{self.finetune.model_dump(exclude_defaults=True)}")
        return self


def _nested(err: dict, prefix: tuple) -> str:
    return describe({**err, "loc": (*prefix, *err["loc"])}, MEMBER_STAGES)


def _stages(items: Any, prefix: tuple) -> list[StageSpec]:
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(prefix))
    if not isinstance(items, list):
        raise _rule(f"{where} must be a list of stages; got {items!r}")
    out = []
    for j, item in enumerate(items):
        if isinstance(item, StageSpec):
            out.append(item)
            continue
        tag = item.get("stage") if isinstance(item, dict) else None
        if tag == "ensemble":
            raise _rule(f"{where}[{j}].stage must not be ensemble (ensembles do not nest); got 'ensemble'")
        if tag not in MEMBER_STAGES:
            raise _rule(f"{where}[{j}].stage must be one of {', '.join(MEMBER_STAGES)}; got {tag!r}")
        try:
            out.append(MEMBER_STAGES[tag].model_validate(item))
        except ValidationError as e:
            raise _rule(_nested(e.errors()[0], (*prefix, j))) from None
    return out


def _member(m: Any, i: int) -> list[StageSpec] | ModelMember:
    if isinstance(m, ModelMember):
        m.stages = _stages(m.stages, ("members", i, "stages"))
        return m
    if isinstance(m, dict):
        try:
            member = ModelMember.model_validate(m)
        except ValidationError as e:
            raise _rule(_nested(e.errors()[0], ("members", i))) from None
        member.stages = _stages(member.stages, ("members", i, "stages"))
        return member
    return _stages(m, ("members", i))



# ---- fitting on validation data ---------------------------------------------------------------

@torch.no_grad()
def _val_outputs(members: list[nn.Module], data) -> tuple[list[torch.Tensor], torch.Tensor]:
    from ..task import predict

    outs = [predict(m, data)[0] for m in members]
    return outs, torch.cat([y for _, y in data])


def fit_weights(outs: list[torch.Tensor], y: torch.Tensor, loss, steps: int = 50) -> torch.Tensor:
    """Member weights (on the simplex) minimising the task loss of the weighted average on ``outs``."""
    a = torch.zeros(len(outs), requires_grad=True)
    opt = torch.optim.LBFGS([a], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(combine_outputs(outs, "weighted", torch.softmax(a, 0)), y)
        value.backward()
        return value

    opt.step(closure)
    return torch.softmax(a.detach(), 0)


def fit_stack(outs: list[torch.Tensor], y: torch.Tensor, loss, l2: float, steps: int = 100) -> nn.Linear:
    """A linear combiner of the members' log-probabilities, started at (and pulled towards by ``l2``) the
    plain average of log-probabilities; full-batch L-BFGS, deterministic."""
    n, k = len(outs), outs[0].shape[1]
    lin = nn.Linear(n * k, k)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(k).repeat(1, n) / n)
        lin.bias.zero_()
    start = lin.weight.detach().clone()
    feats = torch.cat([F.log_softmax(o, 1) for o in outs], 1)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(lin(feats), y) + l2 * ((lin.weight - start) ** 2).sum()
        value.backward()
        return value

    opt.step(closure)
    return lin.requires_grad_(False).eval()


# ---- the stage -------------------------------------------------------------------------------

def _describe(member: list[StageSpec] | ModelMember) -> str:
    stages = member.stages if isinstance(member, ModelMember) else member
    names = [s.name or s.stage for s in stages]
    if isinstance(member, ModelMember):
        names.insert(0, f"{member.model} trained {member.train.epochs} epoch(s)")
    return " + ".join(names) or "the input model unchanged"


def _build_member(model: nn.Module, member: list[StageSpec] | ModelMember, ctx: Context, i: int,
                  seed: int) -> nn.Module:
    if ctx.run_stage is None:
        raise TypeError("ensemble.apply(): ctx.run_stage must run a member's stages (compress passes "
                        "pipeline.run_stage); got None")
    stages = list(member.stages) if isinstance(member, ModelMember) else list(member)
    if isinstance(member, ModelMember):
        stages.insert(0, DistillSpec(student=member.model, train=member.train))
    where = f"{ctx.where}.members[{i}]"
    m = copy.deepcopy(model)
    for j, spec in enumerate(stages):
        workdir = ctx.workdir / "ensemble" / f"member{i}" if ctx.workdir is not None else None
        sub = Context(task=ctx.task, seed=seed + 1000 * j, where=f"{where}[{j}]", progress=ctx.progress,
                      workdir=workdir, inspect=ctx.inspect, run_stage=ctx.run_stage, device=ctx.device)
        m = ctx.run_stage(m, spec, sub)
        ctx.log.touched.update({f"members.{i}.{k}": v for k, v in sub.log.touched.items()})
        ctx.log.skipped.update({f"members.{i}.{k}": v for k, v in sub.log.skipped.items()})
        ctx.log.notes += [f"members[{i}]: {n}" for n in sub.log.notes]
    return m.eval()


def _check_shapes(members: list[nn.Module], ctx: Context) -> None:
    with torch.no_grad():
        shapes = [tuple(m.eval()(ctx.task.example_input).shape) for m in members]
    for i, s in enumerate(shapes[1:], 1):
        if s != shapes[0]:
            raise RecipeError(f"{ctx.where}.members[{i}] outputs shape {s} but members[0] outputs {shapes[0]}; "
                              "every member must output the same shape")


def _member_notes(members: list[nn.Module], spec: EnsembleSpec, ctx: Context) -> None:
    """Each member's own metric and packed bytes, measured on the test split like a report row."""
    from ..measure import measure

    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (m, member) in enumerate(zip(members, spec.members)):
            got = measure(m, ctx.task, onnx_path=Path(tmp) / f"member{i}.onnx",
                          artifact=Path(tmp) / f"member{i}.ecz", latency=False)
            total += got.stored_bytes
            ctx.log.notes.append(f"member {i} ({_describe(member)}): {got.metric_name} {got.metric:.4f}, "
                                 f"{got.stored_bytes:,} bytes .ecz, {got.params:,} params, {got.macs:,} MACs")
    ctx.log.notes.append(f"members' own .ecz files add up to {total:,} bytes; the row counts the ensemble's one file")


def apply(model: nn.Module, spec: EnsembleSpec, ctx: Context) -> nn.Module:
    task = ctx.task
    if spec.combine in ("weighted", "stack") and task.val_data is None:
        raise RecipeError(f"{ctx.where}.combine {spec.combine} is fitted on validation data; got a task without "
                          "val_data")
    seeds = spec.seeds if spec.seeds is not None else [ctx.seed + i for i in range(len(spec.members))]
    members = [_build_member(model, member, ctx, i, seed)
               for i, (member, seed) in enumerate(zip(spec.members, seeds))]
    _check_shapes(members, ctx)
    weights = combiner = None
    if spec.combine in ("weighted", "stack"):
        outs, y = _val_outputs(members, task.val_data)
        if spec.combine == "weighted":
            weights = fit_weights(outs, y, task.loss)
            ctx.log.notes.append("weights fitted on the validation split: "
                                 + ", ".join(f"{w:.3f}" for w in weights.tolist()))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed)
                combiner = fit_stack(outs, y, task.loss, spec.l2)
            ctx.log.notes.append(f"stacking combiner ({combiner.in_features} -> {combiner.out_features}, "
                                 f"L2 {spec.l2:g}) trained on the validation split ({len(y)} examples)")
    for i, (member, seed) in enumerate(zip(spec.members, seeds)):
        ctx.log.touched[f"members.{i}"] = f"seed {seed}: {_describe(member)}"
    _member_notes(members, spec, ctx)
    return Ensemble(members, spec.combine, weights, combiner).eval()


def check_exports(recipe) -> None:
    """The TFLite export lowers one sequential model: a recipe whose final model is an ensemble (no
    distill stage after it) is refused before any work. (The C export runs the members one after
    another in one arena: ``export.c.ensemble``.)"""
    last = {s.stage: i for i, s in enumerate(recipe.stages)}
    where = last.get("ensemble") if last.get("ensemble", -1) > last.get("distill", -1) else None
    if where is not None and "tflite" in recipe.export:
        raise RecipeError(f"export tflite cannot take the ensemble of stages[{where}] (the tflite export lowers one "
                          "sequential model); export onnx, ecz or c; got export: [" + ", ".join(recipe.export) + "]")
