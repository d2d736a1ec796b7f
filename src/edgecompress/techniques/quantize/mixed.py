"""Mixed precision (``bits: auto``): bits per layer within a budget, from each layer's sensitivity measured
on the whole quantized model."""
from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

from ...context import Context, calibration_batches
from ...primitives import bitalloc
from ...primitives import quant as Q
from ...primitives.quant import QuantSpec
from .calibrate import observer
from .spec import QuantizeSpec, stored_bits, weight_spec

log = logging.getLogger(__name__)

#: allocations from the top of the Pareto front scored on the whole quantized model (plus uniform)
MIXED_SHORTLIST = 8
#: most allocations scored on the whole quantized model after the sensitivity scan, local search included
MIXED_EVALS = 40


class Probe:
    """The model as the stage will run it, re-weighted per allocation without being rebuilt.

    A private copy of ``model`` where each chosen layer's weight is its min-max fake-quantized value at
    the allocation's bit width; in static and qat mode each layer's input is fake-quantized on the
    activation grid calibrated from the float model (as the stage's observers do); with
    ``bias_correction`` each layer's output is shifted by E[(W - Wq) x], as the stage does, with x the
    float model's inputs to the layer (exact through the layer's mean input, since the layer is
    linear). ``distortion(bits)`` scores an allocation on the calibration inputs: KL divergence of the
    softmax from the float model's, per sample, for classifiers (metric ``accuracy``), otherwise the
    squared error relative to the float outputs' mean square.
    """

    def __init__(self, model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> None:
        self.model = copy.deepcopy(model).eval()
        self.spec = spec
        self.layers = {n: self.model.get_submodule(n) for n in names}
        self.w0 = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        xs = [x for x, _ in calibration_batches(ctx.task, spec.calib_batches)]
        try:  # one large batch runs far faster than many small ones on a busy CPU
            self.xs = [torch.cat(xs)] if len(xs) > 1 else xs
        except (RuntimeError, TypeError):
            self.xs = xs
        self.samples = sum(len(x) for x in self.xs)
        self.in_specs: dict[str, QuantSpec] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.current: dict[str, int] = {}  # the bit width each layer's weight holds now
        self._shift: dict[tuple[str, int], torch.Tensor] = {}
        static = spec.mode in ("static", "qat")
        obs = {n: observer(spec) for n in names} if static else {}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def see(name):
            def fn(mod, inp):
                x = inp[0]
                if name in obs:
                    obs[name].observe(x)
                if spec.bias_correction:
                    flat = x.reshape(-1, x.shape[-1]) if isinstance(mod, nn.Linear) else x
                    sums[name] = sums.get(name, 0) + flat.sum(dim=0, keepdim=not isinstance(mod, nn.Linear))
                    counts[name] = counts.get(name, 0) + flat.shape[0]
            return fn

        hooks = [m.register_forward_pre_hook(see(n)) for n, m in self.layers.items()]
        try:
            with torch.no_grad():
                self.refs = [self.model(x) for x in self.xs]
        finally:
            for h in hooks:
                h.remove()
        self.classify = ctx.task.metric == "accuracy" and all(r.dim() == 2 for r in self.refs)
        self.in_specs = {n: o.result() for n, o in obs.items()}
        self.mean_in = {n: s / counts[n] for n, s in sums.items()}
        for n, m in self.layers.items():
            m.register_forward_pre_hook(self._pre(n))
            m.register_forward_hook(self._post(n))

    def _pre(self, name: str):
        def fn(mod, inp):
            s = self.in_specs.get(name)
            return None if s is None else (Q.fake_quant(inp[0], s), *inp[1:])
        return fn

    def _post(self, name: str):
        def fn(mod, inp, out):
            s = self.shift.get(name)
            if s is None:
                return None
            shape = [1] * out.dim()
            shape[out.dim() - 1 if isinstance(mod, nn.Linear) else 1] = -1
            return out + s.reshape(shape)
        return fn

    def weight(self, name: str, bits: int) -> torch.Tensor:
        w0 = self.w0[name]
        return Q.fake_quant(w0, Q.calibrate(w0, weight_spec(self.spec, bits, self.layers[name])))

    def bias_shift(self, name: str, bits: int) -> torch.Tensor:
        """E[(W - Wq) x] per output channel over the float model's inputs to the layer."""
        key = (name, bits)
        if key not in self._shift:
            layer, dw = self.layers[name], self.w0[name] - self.weight(name, bits)
            if isinstance(layer, nn.Linear):
                self._shift[key] = F.linear(self.mean_in[name], dw)
            else:
                y = layer._conv_forward(self.mean_in[name], dw, None)
                self._shift[key] = y.mean(dim=[d for d in range(y.dim()) if d != 1])
        return self._shift[key]

    @torch.no_grad()
    def distortion(self, bits: dict[str, int]) -> torch.Tensor:
        """Per calibration sample (its mean is the allocation's score)."""
        for n, m in self.layers.items():  # only layers whose width changed are quantized again
            if self.current.get(n) != bits[n]:
                m.weight.copy_(self.weight(n, bits[n]))
                self.current[n] = bits[n]
        self.shift = {n: self.bias_shift(n, bits[n]) for n in self.layers} if self.spec.bias_correction else {}
        outs = [self.model(x) for x in self.xs]
        if self.classify:
            return torch.cat([F.kl_div(F.log_softmax(o, 1), F.log_softmax(r, 1), log_target=True,
                                       reduction="none").sum(1) for o, r in zip(outs, self.refs)])
        err = torch.cat([((o - r) ** 2).reshape(len(o), -1).sum(1) for o, r in zip(outs, self.refs)])
        return err * self.samples / max(sum(float((r ** 2).sum()) for r in self.refs), 1e-30)


def mixed_bits(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> dict[str, int]:
    """Bits per layer for ``bits: auto``.

    1. Sensitivity: the distortion of the whole quantized model (``Probe``) when one layer drops to
       each candidate width while the others keep the widest.
    2. Allocation: the exact minimum of the summed sensitivities within the budget
       (``primitives.bitalloc``), and the next ``MIXED_SHORTLIST - 1`` points of its Pareto front.
    3. Choice: those allocations and the widest uniform one within the budget are scored on the whole
       quantized model; a local search (one layer a step up or down, or one up and another down,
       ranked by the summed sensitivities) moves to the least distortion, up to ``MIXED_EVALS`` scored
       allocations in all. The best mixed allocation replaces uniform only when its paired gain over the
       calibration samples exceeds one standard error.
    Every allocation scored first spends what is left of the budget, a step at a time, on the layer
    whose sensitivity drops the most per bit: more bits never raise a layer's expected error, and the
    small differences between close allocations on a few hundred calibration samples are noise.
    Costs count the bits a code really spans (8 is 7 under reduce_range) and packed bytes.
    """
    layers = {n: model.get_submodule(n) for n in names}
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(sizes.values())
    cands: dict[str, list[int]] = {}
    for n, m in layers.items():  # one nominal width per distinct stored width
        by_stored: dict[int, int] = {}
        for b in spec.candidate_bits:
            by_stored.setdefault(stored_bits(spec, b, m), b)
        cands[n] = sorted(by_stored.values())
    stored = {n: {b: stored_bits(spec, b, layers[n]) for b in cands[n]} for n in names}
    if spec.budget_bytes is not None and spec.budget_bits is not None:
        costs = {n: {b: 8 * math.ceil(sizes[n] * s / 8) for b, s in stored[n].items()} for n in names}
        budget = min(math.floor(spec.budget_bits * total + 1e-6), 8 * spec.budget_bytes)
    elif spec.budget_bytes is not None:
        costs = {n: {b: math.ceil(sizes[n] * s / 8) for b, s in stored[n].items()} for n in names}
        budget = spec.budget_bytes
    else:
        costs = {n: {b: sizes[n] * s for b, s in stored[n].items()} for n in names}
        budget = math.floor(spec.budget_bits * total + 1e-6)

    probe = Probe(model, names, spec, ctx)
    seen: dict[tuple[int, ...], torch.Tensor] = {}

    def per_sample(a: dict[str, int]) -> torch.Tensor:
        key = tuple(a[n] for n in names)
        if key not in seen:
            seen[key] = probe.distortion(a)
        return seen[key]

    def score(a: dict[str, int]) -> float:
        return float(per_sample(a).mean())

    top = {n: cands[n][-1] for n in names}
    sens: dict[str, dict[int, float]] = {}
    for i, n in enumerate(names):
        sens[n] = {b: score({**top, n: b}) for b in cands[n]}
        if ctx.progress is not None:
            ctx.progress(f"{ctx.where} mixed-precision sensitivity", i + 1, len(names))
    scan = len(seen)
    shortlist = bitalloc.allocate(costs, sens, budget, keep=MIXED_SHORTLIST)
    if not shortlist:
        low = {n: cands[n][0] for n in names}
        ctx.log.notes.append(f"bits: auto cannot meet the budget: the fewest bits ({min(spec.candidate_bits)} for "
                             f"every layer) cost {sum(costs[n][low[n]] for n in names):,} "
                             f"{'bytes' if spec.budget_bits is None else 'bits'} > {budget:,}; every layer gets "
                             "the fewest bits")
        return low
    common = sorted(set.intersection(*(set(c) for c in cands.values())))
    uniform = next(({n: b for n in names} for b in reversed(common)
                    if sum(costs[n][b] for n in names) <= budget), None)
    if uniform is not None and uniform not in shortlist:
        shortlist.append(uniform)

    def cost(a: dict[str, int]) -> int:
        return sum(costs[n][a[n]] for n in names)

    def predicted(a: dict[str, int]) -> float:
        return sum(sens[n][a[n]] for n in names)

    def fill(a: dict[str, int]) -> dict[str, int]:
        """What is left of the budget, a step at a time, to the layer whose sensitivity drops most per cost."""
        a = dict(a)
        while True:
            steps = []
            for n in names:
                i = cands[n].index(a[n])
                if i + 1 < len(cands[n]):
                    up = {**a, n: cands[n][i + 1]}
                    gain = sens[n][a[n]] - sens[n][up[n]]
                    if cost(up) <= budget and gain > 0:
                        steps.append((gain / (costs[n][up[n]] - costs[n][a[n]]), n, up))
            if not steps:
                return a
            a = max(steps, key=lambda s: s[0])[2]

    shortlist = [fill(a) if a is not uniform else a for a in shortlist]
    best = min(shortlist, key=lambda a: (score(a), -cost(a)))
    # local search on the whole model: one layer a step up or down, or one up and another down
    while len(seen) - scan < MIXED_EVALS:
        moves = []
        for up in [None, *names]:
            for down in [None, *names]:
                if up == down:
                    continue
                a = dict(best)
                ok = True
                for n, step in ((up, 1), (down, -1)):
                    if n is not None:
                        i = cands[n].index(a[n]) + step
                        ok = ok and 0 <= i < len(cands[n])
                        a[n] = cands[n][min(max(i, 0), len(cands[n]) - 1)]
                if ok and cost(a) <= budget:
                    a = fill(a)
                    if tuple(a[n] for n in names) not in seen and a not in moves:
                        moves.append(a)
        moves.sort(key=predicted)
        better = None
        for a in moves[:max(0, MIXED_EVALS + scan - len(seen))]:
            if score(a) < score(best) and (better is None or score(a) < score(better)):
                better = a
        if better is None:
            break
        best = better
    what = "KL divergence from the float model's softmax" if probe.classify else "relative squared error"
    msg = (f"bits: auto scored {len(seen)} allocations on the whole quantized model ({scan} in the per-layer "
           f"scan; {what} on {probe.samples} calibration samples): ")
    if uniform is not None and best != uniform:
        # leave uniform only on evidence: a paired gain larger than one standard error
        d = per_sample(best) - per_sample(uniform)
        se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        if float(d.mean()) + se >= 0:
            msg += (f"the best mixed allocation ({', '.join(f'{n}={best[n]}' for n in names)}: {score(best):.4g}) "
                    f"beats uniform by less than one standard error ({se:.2g}), so uniform; ")
            best = uniform
    msg += f"chosen {score(best):.4g}"
    if uniform is not None:
        msg += f"; uniform {uniform[names[0]]} bits {score(uniform):.4g}"
    ctx.log.notes.append(msg)
    log.debug("mixed-precision sensitivity: %s", sens)
    return best


# ---- the stage -----------------------------------------------------------------------------
