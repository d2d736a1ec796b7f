"""Unstructured, balanced and N:M pruning: masks over single weights from the stage's importance,
allocated globally, per layer or by a sensitivity scan, and the schedules that apply them (one shot,
iterative, Zhu & Gupta's gradual ramp, lottery tickets)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...context import Context
from ...layers import leave_output_alone, select, weighted_layers
from ...primitives import saliency
from ...task import evaluate
from .importance import Importance
from .scan import sensitivity_scan
from .spec import PruneSpec, explicit_ratios


class Unstructured:
    """Mask computation for unstructured, balanced and N:M granularities over the chosen layers,
    from the scores ``importance`` gives each weight."""

    def __init__(self, model: nn.Module, spec: PruneSpec, ctx: Context, importance: Importance):
        self.model, self.spec, self.ctx, self.importance = model, spec, ctx, importance
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
        self.explicit = explicit_ratios(list(dict.fromkeys(self.layer_of.values())), spec, ctx)
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
        scores = self.importance(self.model, self.params, step=self.calls if prev else 0)
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
        score = self.importance(self.model, {name: w})[name]
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


def prune_unstructured(model: nn.Module, spec: PruneSpec, ctx: Context, importance: Importance) -> nn.Module:
    """Zero single weights as the spec's granularity, allocation and schedule say; masks are held
    through every fine-tune of the stage."""
    u = Unstructured(model, spec, ctx, importance)
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
        ctx.log.notes.append("sensitivity allocation: " + ", ".join(
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
    from ...zoo import BUILTINS

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
