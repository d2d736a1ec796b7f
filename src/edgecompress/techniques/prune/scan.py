"""Sensitivity scans: each layer (or channel group) pruned alone at a list of ratios and evaluated on
validation data, cached by a digest of the model, the spec and the data, and plotted."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ...context import Context, calibration_batches
from ...files import write_atomic
from ...layers import weighted_layers
from ...task import evaluate, is_fraction
from .depgraph import count as count_params
from .spec import PruneSpec

log = logging.getLogger(__name__)

# one(name, ratios) -> (metric at each ratio, {unit: amount saved at each ratio})
ScanOne = Callable[[str, list[float]], tuple[list[float], dict[str, list[float]]]]


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
    for x, _ in calibration_batches(ctx.task, 4):
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


def sensitivity_scan(model: nn.Module, names: list[str], spec: PruneSpec, ctx: Context, one: ScanOne) -> dict:
    """Each layer pruned alone at ``spec.scan_ratios`` and evaluated on validation data; saved as
    JSON and PNG in the cache (and the stage's work folder) and reused for the same model."""
    from ...zoo import cache_dir

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
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(scan, indent=1)))
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
        macs, params = count_params(model, ctx.task.example_input)
        return {"sparsity": 1.0, "params": params, "macs": macs}
    return {"sparsity": float(sum(layers[n].weight.numel() for n in names)),
            "params": float(sum(p.numel() for p in model.parameters()))}
