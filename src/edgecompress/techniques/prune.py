"""Pruning: zero the least important weights, or remove channels and blocks outright.

One stage, every variant a parameter:

- ``criterion``: magnitude (``norm`` 1 or 2), taylor (|gradient x weight| over calibration batches),
  activation (mean activation or APoZ of channels; structured only), random (a baseline);
- ``granularity``: unstructured, balanced (every output row keeps the same count), nm (``pattern:
  "2:4"``), channel (Torch-Pruning's dependency graph; modules physically shrink), block (shape-
  preserving blocks replaced by identity);
- allocation: ``scope: global`` (one threshold), ``layer`` (uniform), ``sensitivity`` (a scan, then
  per-layer ratios reaching ``target`` with the least predicted loss), plus ``per_layer`` overrides;
- ``schedule``: oneshot, iterative (``steps`` prunes, fine-tune between), gradual (Zhu & Gupta
  polynomial during fine-tune), lottery (rewind survivors to initialisation, retrain).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from ..context import Context
from ..errors import RecipeError
from ..layers import forward_with_hooks, leave_output_alone, match, replace, select, weighted_layers
from ..primitives import saliency
from ..primitives.attention import split_attention
from ..spec import StageSpec
from ..task import evaluate, is_fraction
from . import _torch_pruning as tpw

log = logging.getLogger(__name__)

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


def apply(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    if spec.granularity == "block":
        return _remove_blocks(model, spec, ctx)
    if spec.granularity == "channel":
        return _structured(model, spec, ctx)
    return _unstructured(model, spec, ctx)


# ---- scores ----------------------------------------------------------------------------------


def _calib(ctx: Context, spec: PruneSpec):
    for i, batch in enumerate(ctx.task.calib_data):
        if i >= spec.calib_batches:
            break
        yield batch


def _grads(model: nn.Module, params: dict[str, nn.Parameter], spec: PruneSpec, ctx: Context) -> dict[str, list]:
    """Gradients of the task loss for each of ``params``, one per calibration batch (eval mode)."""
    was = model.training
    model.eval()
    grads: dict[str, list] = {n: [] for n in params}
    saved = {n: p.grad for n, p in model.named_parameters()}
    try:
        with torch.enable_grad():
            for x, y in _calib(ctx, spec):
                model.zero_grad(set_to_none=True)
                ctx.task.loss(model(x), y).backward()
                for n, p in params.items():
                    grads[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]
        model.train(was)
    return grads


def element_scores(model: nn.Module, params: dict[str, nn.Parameter], spec: PruneSpec, ctx: Context,
                   offset: int = 0) -> dict[str, torch.Tensor]:
    """Score of every entry of each parameter by the spec's criterion (higher = keep)."""
    if spec.criterion == "taylor":
        grads = _grads(model, params, spec, ctx)
        return {n: saliency.taylor(p.detach(), grads[n]) for n, p in params.items()}
    if spec.criterion == "random":
        gen = ctx.generator(offset)
        return {n: saliency.random_scores(p.shape, gen) for n, p in params.items()}
    return {n: saliency.magnitude(p.detach(), spec.norm) for n, p in params.items()}


def input_activation_scores(model: nn.Module, spec: PruneSpec, ctx: Context) -> dict[nn.Module, torch.Tensor]:
    """Per input channel of every Linear/Conv: mean |activation|, or 1 - APoZ."""
    layers = weighted_layers(model)
    acc: dict[nn.Module, list] = {}

    def hook(m, inputs):
        x = inputs[0]
        s, z, c = saliency.activation_stats(x, saliency.channel_dim(x))
        if m in acc:
            acc[m][0] += s
            acc[m][1] += z
            acc[m][2] += c
        else:
            acc[m] = [s, z, c]

    hooks = [m.register_forward_pre_hook(hook) for m in layers.values()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in _calib(ctx, spec):
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if spec.activation == "apoz":
        return {m: 1 - saliency.apoz(z, c) for m, (_, z, c) in acc.items()}
    return {m: saliency.mean_activation(s, c) for m, (s, _, c) in acc.items()}


# ---- unstructured, balanced, N:M -------------------------------------------------------------


def _per_layer(names: list[str], spec: PruneSpec, ctx: Context) -> dict[str, float]:
    """Explicit ratios: the first ``per_layer`` pattern matching a layer wins."""
    out: dict[str, float] = {}
    for i, (pat, r) in enumerate((spec.per_layer or {}).items()):
        hit = match(names, pat)
        if not hit:
            raise RecipeError(f"{ctx.where}.per_layer[{i}] matches no layer; got {pat!r} (layers: {', '.join(names)})")
        for n in hit:
            out.setdefault(n, r)
    return out


class Unstructured:
    """Mask computation for unstructured, balanced and N:M granularities over the chosen layers."""

    def __init__(self, model: nn.Module, spec: PruneSpec, ctx: Context):
        self.model, self.spec, self.ctx = model, spec, ctx
        layers = weighted_layers(model)
        rnns = {n: m for n, m in model.named_modules() if isinstance(m, nn.RNNBase)}
        names = select([*layers, *rnns], spec.layers, spec.exclude, where=ctx.where)
        for n in [*layers, *rnns]:
            if n not in names:
                ctx.log.skipped[n] = "excluded by the recipe"
            elif n in rnns and spec.scope == "sensitivity":
                ctx.log.skipped[n] = "scope sensitivity scans Linear and Conv layers; a recurrent layer is left whole"
        recurrent = [n for n in names if n in rnns and spec.scope != "sensitivity"]
        names = [n for n in names if n in layers]
        names, left = leave_output_alone(model, ctx.task.example_input, names, spec.layers, spec.keep_output,
                                         named=spec.per_layer or {})
        ctx.log.skipped.update(left)
        if spec.granularity == "nm":
            n_, m_ = spec.nm
            for n in list(names):
                size = layers[n].weight.shape[1]
                if size % m_:
                    ctx.log.skipped[n] = f"input size {size} is not a multiple of {m_} ({spec.pattern} needs whole groups)"
                    names.remove(n)
        self.names = names
        self.params = {f"{n}.weight": layers[n].weight for n in names}
        self.layer_of = {f"{n}.weight": n for n in names}
        self._add_recurrent({n: rnns[n] for n in recurrent}, spec, ctx)
        self.explicit = _per_layer(list(dict.fromkeys(self.layer_of.values())), spec, ctx)
        self.scan: dict | None = None
        self.calls = 0

    def _add_recurrent(self, rnns: dict[str, nn.Module], spec: PruneSpec, ctx: Context) -> None:
        """The input and hidden weight matrices of GRU/LSTM/RNN layers (``weight_ih_l0``,
        ``weight_hh_l0``, ...): masked like any weight; N:M groups run along each matrix's inputs."""
        for n, rnn in rnns.items():
            for pname, w in rnn.named_parameters(recurse=False):
                if not pname.startswith("weight_"):
                    continue
                if spec.granularity == "nm" and w.shape[1] % spec.nm[1]:
                    ctx.log.skipped[f"{n}.{pname}"] = (f"input size {w.shape[1]} is not a multiple of {spec.nm[1]} "
                                                       f"({spec.pattern} needs whole groups)")
                    continue
                self.params[f"{n}.{pname}"] = w
                self.layer_of[f"{n}.{pname}"] = n

    def masks(self, sparsity: float, prev: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Masks (by parameter name) pruning ``sparsity`` as the spec allocates it; entries already
        pruned in ``prev`` stay pruned."""
        spec = self.spec
        self.calls += 1
        scores = element_scores(self.model, self.params, spec, self.ctx, offset=self.calls if prev else 0)
        if prev is not None:
            scores = {k: torch.where(prev[k], s.float(), torch.tensor(-float("inf"))) for k, s in scores.items()}
        keys = list(self.params)
        if spec.granularity == "nm":
            n, m = spec.nm
            return {k: saliency.nm_mask(scores[k], n, m) for k in keys}
        ratios = self.ratios(sparsity, scores)
        if spec.granularity == "balanced":
            return {k: saliency.balanced_mask(scores[k], ratios[k]) for k in keys}
        masks = {}
        free = [k for k in keys if ratios[k] is None]
        if free:
            masks.update(zip(free, saliency.global_masks([scores[k] for k in free], self._global_ratio(sparsity))))
        for k in keys:
            if ratios[k] is not None:
                masks[k] = saliency.keep_mask(scores[k], round(ratios[k] * scores[k].numel()))
        return {k: masks[k] for k in keys}

    def _global_ratio(self, sparsity: float) -> float:
        return sparsity

    def ratios(self, sparsity: float, scores: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """Ratio per parameter; None = ranked under one global threshold with the other Nones."""
        spec = self.spec
        out: dict[str, float | None] = {}
        if spec.scope == "sensitivity":
            alloc = self.allocation(sparsity)
            return {f"{n}.weight": alloc[n] for n in self.names}
        for k, n in self.layer_of.items():
            out[k] = self.explicit.get(n, sparsity if spec.scope == "layer" else None)
        if spec.granularity == "balanced":
            free = [k for k in out if out[k] is None]
            if free:
                gm = saliency.global_masks([scores[k] for k in free], sparsity)
                for k, m in zip(free, gm):
                    out[k] = 1 - m.float().mean().item()
        return out

    def allocation(self, sparsity: float) -> dict[str, float]:
        if self.scan is None:
            self.scan = sensitivity_scan(self.model, self.names, self.spec, self.ctx, self._scan_one)
        total = self.scan["totals"][self.spec.target]
        return saliency.allocate(self.scan["drops"], self.scan["savings"][self.spec.target], self.scan["ratios"],
                                 sparsity * total)

    def _scan_one(self, name: str, ratios: list[float]) -> tuple[list[float], dict[str, list[float]]]:
        w = weighted_layers(self.model)[name].weight
        score = element_scores(self.model, {name: w}, self.spec, self.ctx)[name]
        orig = w.detach().clone()
        metrics = []
        try:
            for r in ratios:
                with torch.no_grad():
                    if self.spec.granularity == "balanced":
                        w.mul_(saliency.balanced_mask(score, r))
                    else:
                        w.mul_(saliency.keep_mask(score, round(r * w.numel())))
                metrics.append(evaluate(self.model, self.ctx.task, self.ctx.task.calib_data))
                with torch.no_grad():
                    w.copy_(orig)
        finally:
            with torch.no_grad():
                w.copy_(orig)
        saved = [r * w.numel() for r in ratios]
        return metrics, {"sparsity": saved, "params": saved}

    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, m in masks.items():
                self.params[k].mul_(m)

    def log(self, masks: dict[str, torch.Tensor]) -> None:
        what = {"nm": f"{self.spec.pattern} pattern", "balanced": "same count per row"}.get(self.spec.granularity)
        for k, m in masks.items():
            extra = f" ({what})" if what else ""
            self.ctx.log.touched[k.removesuffix(".weight")] = f"sparsity {1 - m.float().mean().item():.4f}{extra}"


def _unstructured(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    u = Unstructured(model, spec, ctx)
    final = spec.sparsity if spec.sparsity is not None else 1 - spec.nm[0] / spec.nm[1]
    if spec.schedule == "oneshot":
        masks = u.masks(final)
        u.apply(masks)
    elif spec.schedule == "iterative":
        masks = None
        for i, s in enumerate(saliency.iterative_sparsities(final, spec.steps)):
            masks = u.masks(s, masks)
            u.apply(masks)
            ctx.finetune(model, spec.finetune, masks=masks, label=f"{ctx.where} step {i + 1}/{spec.steps} fine-tune")
    elif spec.schedule == "gradual":
        masks = _gradual(model, u, final, spec, ctx)
    else:
        masks = _lottery(model, u, final, spec, ctx)
    u.log(masks)
    if spec.scope == "sensitivity" and u.scan is not None:
        ctx.log.notes.append(f"sensitivity allocation: " + ", ".join(
            f"{n} {r:.2f}" for n, r in u.allocation(final).items()))
    return model


def _gradual(model: nn.Module, u: Unstructured, final: float, spec: PruneSpec, ctx: Context) -> dict:
    """Zhu & Gupta: sparsity follows a cubic ramp from 0 to ``final`` over the first ``ramp`` of
    the fine-tune, pruning every ``frequency`` optimizer steps; masks hold between prunes."""
    masks = {k: torch.ones_like(p, dtype=torch.bool) for k, p in u.params.items()}
    nm = spec.granularity == "nm"

    def step(t: int, total: int) -> None:
        if t % spec.frequency and t != total:
            return
        s = saliency.polynomial_sparsity(t, total, final, end=spec.ramp)
        if nm and s < final:
            return  # N:M has one sparsity: it is applied once the ramp ends
        new = u.masks(s, masks)
        masks.update(new)
        u.apply(masks)

    ctx.finetune(model, spec.finetune, masks=masks, after_step=[step], label=f"{ctx.where} gradual fine-tune")
    final_masks = u.masks(final, masks)  # the ramp ends before the last step; this is a no-op check
    u.apply(final_masks)
    return final_masks


def _rewind_state(model: nn.Module, spec: PruneSpec, ctx: Context) -> dict[str, torch.Tensor]:
    """The weights survivors are reset to: the built-in baseline's own initialisation (rebuilt from
    its seed), else a fresh seeded initialisation; trained ``rewind_epochs`` epochs when > 0."""
    from ..zoo import BUILTINS

    fresh, how = None, ""
    b = BUILTINS.get(ctx.task.name)
    if b is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(b.seed)
            cand = b.build()
        ref = model.state_dict()
        if cand.state_dict().keys() == ref.keys() and all(cand.state_dict()[k].shape == ref[k].shape for k in ref):
            fresh, how = cand, f"the baseline's initialisation (seed {b.seed})"
    if fresh is None:
        fresh = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        how = f"a fresh initialisation (seed {ctx.seed}; the task records none)"
    if spec.rewind_epochs:
        ft = spec.finetune.model_copy(update={"epochs": spec.rewind_epochs})
        ctx.finetune(fresh, ft, masks={}, label=f"{ctx.where} rewind point")
        how += f" trained {spec.rewind_epochs} epoch(s)"
    ctx.log.notes.append(f"lottery ticket: survivors rewound to {how}")
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


def _lottery(model: nn.Module, u: Unstructured, final: float, spec: PruneSpec, ctx: Context) -> dict:
    rewind = _rewind_state(model, spec, ctx)
    masks = None
    for i, s in enumerate(saliency.iterative_sparsities(final, spec.steps)):
        masks = u.masks(s, masks)
        model.load_state_dict(rewind)
        u.apply(masks)
        ctx.finetune(model, spec.finetune, masks=masks, label=f"{ctx.where} ticket {i + 1}/{spec.steps} training")
    return masks


# ---- sensitivity scans -----------------------------------------------------------------------


def _digest(model: nn.Module, spec: PruneSpec, names: list[str], ctx: Context) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    key = {"granularity": spec.granularity, "criterion": spec.criterion, "norm": spec.norm,
           "activation": spec.activation, "ratios": spec.scan_ratios, "layers": names,
           "calib_batches": spec.calib_batches, "seed": ctx.seed if spec.criterion == "random" else None}
    h.update(json.dumps(key, sort_keys=True).encode())
    for i, (x, y) in enumerate(ctx.task.calib_data):
        if i >= 4:
            break
        h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _plot(scan: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    scale = 100 if is_fraction(scan["metric"]) else 1
    ax = fig.add_subplot(1, 1, 1)
    for name, drops in scan["drops"].items():
        ax.plot([0] + scan["ratios"], [0] + [scale * d for d in drops], marker="o", label=name)
    ax.set_xlabel(f"{scan['granularity']} pruning ratio of the layer alone")
    ax.set_ylabel(f"{scan['metric']} drop" + (" (points)" if scale == 100 else ""))
    ax.set_title("sensitivity scan (validation data)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def sensitivity_scan(model: nn.Module, names: list[str], spec: PruneSpec, ctx: Context, one) -> dict:
    """Each layer pruned alone at ``spec.scan_ratios`` and evaluated on validation data; saved as
    JSON and PNG in the cache (and the stage's work folder) and reused for the same model."""
    from ..zoo import cache_dir

    key = _digest(model, spec, names, ctx)
    folder = cache_dir() / "sensitivity"
    path = folder / f"{ctx.task.name.replace(':', '_').replace('/', '_')}-{key}.json"
    if path.is_file():
        try:
            scan = json.loads(path.read_text())
            ctx.log.notes.append(f"sensitivity scan reused from {path}")
            _copy_to_workdir(scan, path, ctx)
            return scan
        except (OSError, ValueError) as e:
            log.warning("sensitivity scan %s unreadable (%s); scanning again", path, e)
    base = evaluate(model, ctx.task, ctx.task.calib_data)
    ratios = list(spec.scan_ratios)
    scan = {"task": ctx.task.name, "key": key, "granularity": spec.granularity, "criterion": spec.criterion,
            "metric": ctx.task.metric_name, "baseline": base, "ratios": ratios, "metrics": {}, "drops": {},
            "savings": {}, "totals": {}}
    savings: dict[str, dict[str, list[float]]] = {}
    for i, n in enumerate(names):
        metrics, saved = one(n, ratios)
        if ctx.progress is not None:
            ctx.progress(f"{ctx.where} sensitivity scan", i + 1, len(names))
        scan["metrics"][n] = metrics
        scan["drops"][n] = [base - m for m in metrics]
        for unit, vals in saved.items():
            savings.setdefault(unit, {})[n] = vals
    scan["savings"] = savings
    scan["totals"] = _totals(model, names, spec, ctx)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(scan, indent=1))
    tmp.replace(path)
    _plot(scan, path.with_suffix(".png"))
    ctx.log.notes.append(f"sensitivity scan saved to {path} (+ .png)")
    _copy_to_workdir(scan, path, ctx)
    return scan


def _copy_to_workdir(scan: dict, path: Path, ctx: Context) -> None:
    if ctx.workdir is None:
        return
    stem = Path(ctx.workdir) / f"sensitivity-{ctx.where.replace('[', '').replace(']', '')}"
    stem.with_suffix(".json").write_text(json.dumps(scan, indent=1))
    png = path.with_suffix(".png")
    if not png.is_file():
        _plot(scan, png)
    stem.with_suffix(".png").write_bytes(png.read_bytes())


def _totals(model: nn.Module, names: list[str], spec: PruneSpec, ctx: Context) -> dict[str, float]:
    layers = weighted_layers(model)
    if spec.granularity == "channel":
        macs, params = tpw.count(model, ctx.task.example_input)
        return {"sparsity": 1.0, "params": params, "macs": macs}
    return {"sparsity": float(sum(layers[n].weight.numel() for n in names)),
            "params": float(sum(p.numel() for p in model.parameters()))}


# ---- structured: channels --------------------------------------------------------------------


def _importance(model: nn.Module, spec: PruneSpec, ctx: Context, offset: int = 0) -> tpw.GroupScores:
    normalize = spec.scope == "global"
    if spec.criterion == "activation":
        return tpw.GroupScores(inputs=input_activation_scores(model, spec, ctx), normalize=normalize)
    params = {n: m.weight for n, m in model.named_modules()
              if isinstance(m, tpw.ScoredTypes) and getattr(m, "weight", None) is not None}
    scores = element_scores(model, params, spec, ctx, offset)
    return tpw.GroupScores(params={id(params[n]): s for n, s in scores.items()}, normalize=normalize)


def _structured(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    split_attention(model, ctx)  # Torch-Pruning then removes whole heads of q/k/v/out_proj together
    layers = weighted_layers(model)
    names = select(list(layers), spec.layers, spec.exclude, where=ctx.where)
    explicit = _per_layer(names, spec, ctx)
    steps = saliency.iterative_sparsities(spec.sparsity, spec.steps) if spec.schedule == "iterative" else [spec.sparsity]
    alloc = None
    if spec.scope == "sensitivity":
        alloc = _channel_allocation(model, names, spec, ctx)
    before = {n: tpw.shape(m) for n, m in layers.items()}
    skipped: dict[str, str] = {}
    for i, s in enumerate(steps):
        pruner = tpw.Pruner(model, ctx.task.example_input, names, where=ctx.where)
        per_group: dict[str, float] = {}
        for root, members in pruner.groups.items():
            r = next((explicit[m] for m in members if m in explicit), None)
            if alloc is not None and r is None:
                r = alloc.get(root, 0.0)
            if r is not None:
                per_group[root] = _step_ratio(r, len(steps))
        pruner.prune(_importance(model, spec, ctx, offset=i),
                     ratio=0.0 if alloc is not None else _step_ratio(spec.sparsity, len(steps)),
                     per_group=per_group, global_ranking=spec.scope == "global")
        skipped.update(pruner.plan.skipped)
        ctx.log.notes.extend(pruner.plan.notes)
        if spec.schedule == "iterative":
            ctx.finetune(model, spec.finetune, label=f"{ctx.where} step {i + 1}/{len(steps)} fine-tune")
    for n, m in layers.items():
        now = tpw.shape(m)
        if now != before[n]:
            ctx.log.touched[n] = f"out {before[n][0]} -> {now[0]}, in {before[n][1]} -> {now[1]}"
        elif n in skipped:
            ctx.log.skipped[n] = skipped[n]
    for n in layers:
        if n not in names:
            ctx.log.skipped.setdefault(n, "excluded by the recipe")
    if alloc is not None:
        ctx.log.notes.append("sensitivity allocation (channel ratio per group): " +
                             ", ".join(f"{n} {r:.2f}" for n, r in alloc.items()))
    return model


def _step_ratio(final: float, steps: int) -> float:
    """The fraction of the remaining channels each of ``steps`` equal steps removes."""
    return 1 - (1 - final) ** (1 / steps)


def _channel_allocation(model: nn.Module, names: list[str], spec: PruneSpec, ctx: Context) -> dict[str, float]:
    ex = ctx.task.example_input
    groups = list(tpw.Pruner(copy.deepcopy(model), ex, names, where=ctx.where).groups)
    base_macs, base_params = tpw.count(model, ex)

    def one(root: str, ratios: list[float]):
        metrics, macs, params = [], [], []
        for r in ratios:
            m2 = copy.deepcopy(model)
            p = tpw.Pruner(m2, ex, names, where=ctx.where)
            p.prune(_importance(m2, spec, ctx), ratio=0.0, per_group={root: r})
            metrics.append(evaluate(m2, ctx.task, ctx.task.calib_data))
            mc, pc = tpw.count(m2, ex)
            macs.append(float(base_macs - mc))
            params.append(float(base_params - pc))
        return metrics, {"macs": macs, "params": params, "sparsity": [r / len(groups) for r in ratios]}

    scan = sensitivity_scan(model, groups, spec, ctx, one)
    total = scan["totals"][spec.target]
    return saliency.allocate(scan["drops"], scan["savings"][spec.target], scan["ratios"], spec.sparsity * total)


# ---- structured: blocks ----------------------------------------------------------------------


def _shape_preserving(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Outermost named modules holding a Linear/Conv whose output has their input's shape; one that
    holds a stack of such blocks (a Sequential or ModuleList of them, itself or as a child, as
    ``nn.TransformerEncoder.layers``) gives way to the blocks of the stack."""
    same = _all_shape_preserving(model, example)
    held = [n for n, m in model.named_modules() if n in same and weighted_layers(m)]
    modules = dict(model.named_modules())

    def outermost(names: list[str]) -> list[str]:
        out: list[str] = []
        for n in sorted(names, key=lambda n: n.count(".")):
            if not any(n.startswith(p + ".") for p in out):
                out.append(n)
        return out

    def stack(n: str) -> list[str]:
        inner = outermost([m for m in held if m.startswith(n + ".")])
        parents = {m.rpartition(".")[0] for m in inner}
        if len(inner) >= 2 and len(parents) == 1 and isinstance(modules[parents.pop()], (nn.Sequential, nn.ModuleList)):
            return [b for m in inner for b in stack(m)]
        return [n]

    return sorted((b for n in outermost(held) for b in stack(n)), key=list(modules).index)


def _loss(model: nn.Module, spec: PruneSpec, ctx: Context) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in _calib(ctx, spec):
            total += float(ctx.task.loss(model(x), y)) * len(y)
            count += len(y)
    return total / max(count, 1)


def _drop(model: nn.Module, name: str):
    """Take block ``name`` out of the forward pass: removed from a ModuleList (whose owner loops over
    it, as nn.TransformerEncoder does), else replaced by identity. Returns the undo."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    orig = parent.get_submodule(leaf)
    if isinstance(parent, nn.ModuleList) and len(parent) > 1:
        i = int(leaf)
        del parent[i]
        return lambda: parent.insert(i, orig)
    replace(model, name, nn.Identity())
    return lambda: replace(model, name, orig)


def _remove_blocks(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    """Replace the least important shape-preserving blocks by identity. Importance is the increase
    of the calibration loss when the block alone is removed (random for criterion random)."""
    model.eval()
    modules = dict(model.named_modules())
    if spec.layers:
        names = select([n for n in modules if n], spec.layers, spec.exclude, where=ctx.where)
        shaped = _all_shape_preserving(model, ctx.task.example_input)
        for n in names:
            if n not in shaped:
                ctx.log.skipped[n] = "its output shape differs from its input: identity cannot replace it"
        cands = [n for n in names if n in shaped]
    else:
        cands = _shape_preserving(model, ctx.task.example_input)
        cands = select(cands, None, spec.exclude, where=ctx.where) if cands and spec.exclude else cands
    k = round(spec.sparsity * len(cands))
    if not cands:
        ctx.log.notes.append("no shape-preserving block or layer: nothing can be replaced by identity")
        return model
    base = _loss(model, spec, ctx)
    if spec.criterion == "random":
        imp = dict(zip(cands, saliency.random_scores((len(cands),), ctx.generator()).tolist()))
    else:
        imp = {}
        for n in cands:
            undo = _drop(model, n)
            imp[n] = _loss(model, spec, ctx) - base
            undo()
    order = sorted(cands, key=lambda n: (imp[n], cands.index(n)))
    for n in sorted(order[:k], key=lambda n: -cands.index(n)):  # the last first: list indices stay valid
        parent = model.get_submodule(n.rpartition(".")[0])
        in_list = isinstance(parent, nn.ModuleList)
        if in_list and len(parent) == 1:
            ctx.log.skipped[n] = "kept: the last block of its layer list"
            continue
        _drop(model, n)
        ctx.log.touched[n] = (f"{'removed from its layer list' if in_list else 'replaced by identity'} "
                              f"(calibration loss +{imp[n]:.4f} alone)")
    for n in order[k:]:
        ctx.log.skipped[n] = (f"kept: more important (calibration loss +{imp[n]:.4f} without it)" if k else
                              f"kept: sparsity {spec.sparsity:g} of {len(cands)} candidate block(s) removes none "
                              f"(calibration loss +{imp[n]:.4f} without it)")
    return model


def _all_shape_preserving(model: nn.Module, example: torch.Tensor) -> set[str]:
    same: set[str] = set()
    forward_with_hooks(model, example, [(m, lambda _m, i, o, n=n: same.add(n) if i and torch.is_tensor(i[0]) and
                                         torch.is_tensor(o) and i[0].shape == o.shape else None)
                                        for n, m in model.named_modules() if n])
    return same
