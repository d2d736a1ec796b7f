"""The report's figures (bytes per stage, the trade-off, speed, the device, per-layer facts,
sensitivity scans), each a drawing function for ``kit.figure``; every number comes from the report."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...task import is_fraction
from .kit import PARTS, STAGE_COLOURS, WHOLE, NoFigure, wrap, esc

if TYPE_CHECKING:
    from ..base import Report, Row

def _need_rows(report: Report, n: int = 2) -> None:
    if len(report.rows) < n:
        raise NoFigure(f"Needs at least {n} rows to compare; this report has {len(report.rows)}.")


def draw_bytes(fig, report: Report) -> None:
    """Each row's file as one bar split by what its bytes hold, with the total and the ratio."""
    ax = fig.add_subplot(1, 1, 1)
    labels = [wrap(r.label) for r in report.rows]
    y = list(range(len(report.rows)))[::-1]
    shown: set[str] = set()
    for yi, r in zip(y, report.rows):
        m = r.metrics
        parts = [(k, m.breakdown[k]) for k in PARTS if m.breakdown.get(k)] or [("whole", m.stored_bytes)]
        total = sum(v for _, v in parts) or 1
        left = 0.0
        for k, v in parts:
            colour, name = PARTS.get(k, (WHOLE, f"{m.artifact} file (no breakdown)"))
            ax.barh(yi, 100 * v / total, left=left, color=colour, height=0.6,
                    label=None if name in shown else name)
            shown.add(name)
            if v / total > 0.12:
                ax.text(left + 50 * v / total, yi, f"{100 * v / total:.0f}%", ha="center", va="center",
                        color="white", fontsize=8)
            left += 100 * v / total
        q = report.ratios(m)["compression"]
        ax.text(101.5, yi, f"{m.stored_bytes:,} B" + (f"\n{q:.1f}x smaller" if q else ""), va="center",
                fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the file's bytes (%)")
    order = [name for _, name in PARTS.values()]
    handles, names = ax.get_legend_handles_labels()
    pairs = sorted(zip(handles, names), key=lambda hn: order.index(hn[1]) if hn[1] in order else len(order))
    ax.legend([h for h, _ in pairs], [n for _, n in pairs], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=2, fontsize=8, frameon=False)


def draw_tradeoff(fig, report: Report) -> None:
    """Metric against stored bytes (log), every row, the baseline's dense fp32 size and the allowed drop."""
    from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

    _need_rows(report)
    ax = fig.add_subplot(1, 1, 1)
    b = report.baseline
    xs = [r.metrics.stored_bytes for r in report.rows]
    ys = [r.metrics.metric for r in report.rows]
    if min(xs) <= 0:
        raise NoFigure("A row has no stored bytes; a log scale needs them all above zero.")
    ax.plot(xs, ys, color="#BBBBBB", lw=1, zorder=1)
    for i, (r, x, yv) in enumerate(zip(report.rows, xs, ys)):
        c = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        ax.scatter([x], [yv], color=c, s=36, zorder=3)
        ax.annotate(f"{wrap(r.label, 22)}\n{x:,} B, {yv:.4f}", (x, yv), xytext=(0, 8 if i % 2 == 0 else -10),
                    textcoords="offset points", ha="center", va="bottom" if i % 2 == 0 else "top", fontsize=8,
                    color=c)
    ax.scatter([b.dense_bytes], [b.metric], facecolors="none", edgecolors="#444444", s=36, zorder=2)
    ax.annotate(f"dense fp32\n{b.dense_bytes:,} B", (b.dense_bytes, b.metric), xytext=(0, -10),
                textcoords="offset points", ha="center", va="top", fontsize=8, color="#444444")
    drop = report.constraints.get("max_metric_drop")
    if drop is not None:
        ax.axhline(b.metric - drop, color="#D55E00", ls="--", lw=1)
        ax.text(0.01, b.metric - drop, f" max_metric_drop {drop:g}", color="#D55E00", va="bottom", fontsize=8,
                transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    eng = EngFormatter(unit="B", sep=" ")
    ax.xaxis.set_major_formatter(eng)
    lo, hi = min(xs + [b.dense_bytes]), max(xs + [b.dense_bytes])
    if hi / lo < 30:  # less than about two decades shown: label 2x and 5x between the powers of ten
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: eng(v) if f"{v:.0e}"[0] in "25" else ""))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo / 2.5, hi * 2.5)
    span = [*ys] + ([b.metric - drop] if drop is not None else [])
    pad = max(max(span) - min(span), 0.002) * 0.45
    ax.set_ylim(min(span) - pad, max(span) + pad)
    ax.set_xlabel("bytes of the file written (log scale)")
    ax.set_ylabel(b.metric_name)
    ax.grid(alpha=0.3, which="both")


def draw_speed(fig, report: Report) -> None:
    """Measured ONNX Runtime speed-up of each row against the baseline, per batch size."""
    keys = list(report.baseline.latency_ms)
    if not keys:
        raise NoFigure("Latency was not measured for this report (measure: {latency: false}).")
    _need_rows(report)
    ax = fig.add_subplot(1, 1, 1)
    n = len(keys)
    h = 0.8 / n
    y0 = list(range(len(report.rows)))[::-1]
    for j, k in enumerate(keys):
        vals = [report.ratios(r.metrics).get(f"speedup_{k}") or 0.0 for r in report.rows]
        ys = [y - 0.4 + h * (n - j - 0.5) for y in y0]
        ax.barh(ys, vals, height=h * 0.9, color=STAGE_COLOURS[j % len(STAGE_COLOURS)], label=f"batch {k[1:]}")
        for yv, v, r in zip(ys, vals, report.rows):
            ax.text(v, yv, f" {v:.2f}x ({r.metrics.latency_ms.get(k, float('nan')):.3f} ms)", va="center",
                    fontsize=8)
    ax.axvline(1.0, color="#444444", lw=1, ls="--")
    ax.set_yticks(y0, [wrap(r.label) for r in report.rows])
    ax.set_xlim(0, max(1.0, *(report.ratios(r.metrics).get(f"speedup_{k}") or 0 for r in report.rows
                              for k in keys)) * 1.45)
    ax.set_xlabel(f"speed-up against the baseline (measured, {report.baseline.threads} thread(s))")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=n, fontsize=8, frameon=False)


def device_profile(name: str):
    from ...devices import load_device
    from ...errors import RecipeError

    try:
        return load_device(name)
    except RecipeError:
        return None


def draw_device(fig, report: Report) -> None:
    """Flash and RAM of each row against the device's memory and the recipe's constraints."""
    rows = [r for r in report.rows if r.device is not None]
    if not rows:
        raise NoFigure("No device in this report.")
    name = rows[0].device.device
    profile = device_profile(name)
    from matplotlib.ticker import EngFormatter, MaxNLocator

    axes = fig.subplots(1, 2, sharey=True)
    for ax, what, attr, key in ((axes[0], "flash", "flash_bytes", "max_flash"), (axes[1], "RAM", "ram_bytes", "max_ram")):
        vals = [getattr(r.device, attr) for r in rows]
        y = list(range(len(rows)))[::-1]
        cap = getattr(profile, attr) if profile is not None else None
        limit = report.constraints.get(key)
        right = max(vals + [limit or 0]) * 1.35 or 1
        if cap is not None and cap <= right * 1.5:
            right = max(right, cap * 1.08)
        colours = ["#D55E00" if (cap and v > cap) or (limit and v > limit) else "#0072B2" for v in vals]
        ax.barh(y, vals, color=colours, height=0.6)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {100 * v / cap:.0f}% of {what}" if cap else f" {v:,} B", va="center", fontsize=8)
        top = ax.get_xaxis_transform()
        if cap is not None and cap <= right:
            ax.axvline(cap, color="#444444", lw=1.2)
            ax.text(cap, 1.01, f"{name}", va="bottom", ha="right", fontsize=8, transform=top)
        if limit is not None:
            ax.axvline(limit, color="#D55E00", lw=1, ls="--")
            ax.text(limit, 1.01, key, va="bottom", ha="left", fontsize=8, color="#D55E00", transform=top)
        ax.set_xlim(0, right)
        ax.set_xlabel(f"{what} bytes (measured)" + (f"\n{name} has {cap:,}" if cap is not None and cap > right else ""))
        ax.xaxis.set_major_formatter(EngFormatter(unit="B", sep=" "))
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_yticks(list(range(len(rows)))[::-1], [wrap(r.label, 14) for r in rows])


# ---- per layer: what each stage did, from the report's touched/skipped lines -------------------

_SPARSITY = re.compile(r"\bsparsity (\d(?:\.\d+)?)")
_SHARED = re.compile(r"^(\d+) shared values \((\d+) bits\)")
_QUANT = re.compile(r"^(\w+): weight (float16|u?int\d+)")
_RANK = re.compile(r"^(\w+) rank (\S+)")
_SHAPE = re.compile(r"^out (\d+) -> (\d+), in (\d+) -> (\d+)")


def layer_facts(text: str) -> dict[str, Any]:
    """Sparsity, bits, rank or format a stage's line for one layer states (what it holds of them)."""
    facts: dict[str, Any] = {}
    if m := _SPARSITY.search(text):
        facts["sparsity"] = float(m.group(1))
    if m := _SHARED.match(text):
        facts["bits"], facts["format"] = int(m.group(2)), f"{m.group(1)} shared values"
    elif m := _QUANT.match(text):
        facts["format"] = f"{m.group(1)} {m.group(2)}"
        if b := re.search(r"\d+", m.group(2)):
            facts["bits"] = int(b.group(0))
    if m := _RANK.match(text):
        facts["rank"], facts["format"] = m.group(2), m.group(1)
    if m := _SHAPE.match(text):
        facts["format"] = f"out {m.group(1)}\u2192{m.group(2)}, in {m.group(3)}\u2192{m.group(4)}"
    return facts


def _fact_text(facts: dict[str, Any]) -> str:
    out = []
    if "sparsity" in facts:
        out.append(f"{100 * facts['sparsity']:.1f}% zeros")
    if "rank" in facts:
        out.append(f"{facts['format']} rank {facts['rank']}")
    elif "bits" in facts:
        out.append(f"{facts['bits']} bits ({facts['format']})")
    elif "format" in facts:
        out.append(facts["format"])
    return ", ".join(out)


def _layers(report: Report) -> list[str]:
    names: list[str] = []
    for r in report.rows[1:]:
        for n in [*r.touched, *r.skipped]:
            if n not in names:
                names.append(n)
    return names


def layer_table(report: Report) -> str:
    names = _layers(report)
    stages = report.rows[1:]
    if not names:
        return '<p class="nofig">No stage reported per-layer changes.</p>'
    head = "".join(f"<th>{esc(r.label)}</th>" for r in stages)
    body = []
    for n in names:
        cells = []
        for r in stages:
            if n in r.touched:
                facts = _fact_text(layer_facts(r.touched[n]))
                text = f'<b>{esc(facts)}</b><br><span class="small">{esc(r.touched[n])}</span>' if facts \
                    else esc(r.touched[n])
            elif n in r.skipped:
                text = f'<span class="skip">skipped: {esc(r.skipped[n])}</span>'
            else:
                text = '<span class="small">unchanged</span>'
            if r.device is not None and n in r.device.weights_by_layer:
                text += f'<br><span class="small">{r.device.weights_by_layer[n]:,} B of weights on {esc(r.device.device)}</span>'
            if r.device is not None and n in (getattr(r.device, "weight_formats", None) or {}):
                text += f'<br><span class="small">in C: {esc(r.device.weight_formats[n])}</span>'
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><th scope=\"row\">{esc(n)}</th>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="layers"><thead><tr><th>layer</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def draw_layers(fig, report: Report) -> None:
    """Each layer's sparsity (else bits, else rank) after each stage that set it."""
    names = _layers(report)
    facts = {(r.label, n): layer_facts(r.touched[n]) for r in report.rows[1:] for n in r.touched}
    for key, unit in (("sparsity", "zeros (%)"), ("bits", "bits per weight"), ("rank", "rank")):
        stages = [r for r in report.rows[1:] if any(key in facts.get((r.label, n), {}) for n in names)]
        if stages:
            break
    else:
        raise NoFigure("No stage reported a sparsity, bit width or rank per layer.")
    shown = [n for n in names if any(key in facts.get((r.label, n), {}) for r in stages)]
    ax = fig.add_subplot(1, 1, 1)
    k = len(stages)
    h = 0.8 / k
    y0 = list(range(len(shown)))[::-1]
    for j, r in enumerate(stages):
        vals = []
        for n in shown:
            v = facts.get((r.label, n), {}).get(key)
            try:
                vals.append(100 * v if key == "sparsity" else float(v))
            except (TypeError, ValueError):
                vals.append(0.0)
        ys = [y - 0.4 + h * (k - j - 0.5) for y in y0]
        ax.barh(ys, vals, height=h * 0.9, color=STAGE_COLOURS[j % len(STAGE_COLOURS)], label=r.label)
        for yv, v in zip(ys, vals):
            if v:
                ax.text(v, yv, f" {v:.1f}%" if key == "sparsity" else f" {v:g}", va="center", fontsize=8)
    others = {}
    for n in shown:
        texts = (_fact_text({kk: vv for kk, vv in facts[(r.label, n)].items() if kk != key})
                 for r in report.rows[1:] if (r.label, n) in facts)
        others[n] = "; ".join(t for t in dict.fromkeys(texts) if t)
    ax.set_yticks(y0, [n + (f"\n{wrap(others[n], 28)}" if others[n] else "") for n in shown], fontsize=8)
    ax.set_xlabel(unit)
    if key == "sparsity":
        ax.set_xlim(0, 112)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.set_size_inches(5.6, max(1.8, 0.5 * len(shown) * max(1, k / 2) + 1.3))


# ---- sensitivity scans ------------------------------------------------------------------------

_SCAN_NOTE = re.compile(r"sensitivity scan (?:saved to|reused from) (.+?\.json)")
_ALLOC_NOTE = re.compile(r"sensitivity allocation: (.+)$")


def find_scans(report: Report, folder: str | Path | None = None) -> list[tuple[Row, Path]]:
    """The scan JSON files a report's prune stages name in their notes, or that lie in ``folder``
    (``sensitivity-stagesN.json``, as the stage's work folder holds them)."""
    found: list[tuple[Row, Path]] = []
    for i, r in enumerate(report.rows[1:]):
        paths = [Path(m.group(1)) for n in r.notes if (m := _SCAN_NOTE.search(n))]
        local = Path(folder) / f"sensitivity-stages{i}.json" if folder is not None else None
        if local is not None and local.is_file() and not any(p.is_file() for p in paths):
            paths = [local]
        found += [(r, p) for p in paths]
    return found


def draw_scan(fig, row: Row, path: Path) -> None:
    try:
        scan = json.loads(path.read_text())
        ratios, drops = [0.0] + list(scan["ratios"]), scan["drops"]
    except FileNotFoundError:
        raise NoFigure(f"The scan file {path} is not on this machine.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NoFigure(f"The scan file {path} cannot be read: {e}") from None
    chosen: dict[str, float] = {}
    for n in row.notes:
        if m := _ALLOC_NOTE.search(n):
            for part in m.group(1).split(", "):
                name, _, ratio = part.rpartition(" ")
                try:
                    chosen[name] = float(ratio)
                except ValueError:
                    pass
    import numpy as np

    metric = scan.get("metric", "metric")
    scale = 100 if is_fraction(metric) else 1
    ax = fig.add_subplot(1, 1, 1)
    xs = [100 * r for r in ratios]
    for j, (name, d) in enumerate(drops.items()):
        c = STAGE_COLOURS[j % len(STAGE_COLOURS)]
        pts = [0.0] + [scale * v for v in d]
        ax.plot(xs, pts, marker="o", ms=3, color=c, label=name)
        if name in chosen:
            x = 100 * chosen[name]
            ax.scatter([x], [float(np.interp(x, xs, pts))], marker="*", s=120, color=c, edgecolors="black",
                       linewidths=0.5, zorder=3)
    ax.set_xlabel(f"{scan.get('granularity', '')} pruning of that layer alone (%)")
    ax.set_ylabel(f"{metric} drop" + (" (points)" if scale == 100 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, title="\u2605 ratio chosen" if chosen else None, title_fontsize=8)


