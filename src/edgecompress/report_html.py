"""The report as one self-contained HTML page: a headline, the table and plots, nothing fetched.

Every number comes from the :class:`~edgecompress.report.Report` (the one data model; ``report.json``
loads back into it with ``Report.from_dict``) and, for sensitivity curves, from the scan JSON a prune
stage saves. Figures are inline SVG drawn by matplotlib (Agg, text kept as text); a figure that cannot
be drawn for this report (one row, no latency measured, ...) is replaced by a one-line message.

More parts are added with ``to_html(report, sections=[Section(title, html), ...])``; :func:`figure`
turns a drawing function into the same ``<figure>`` markup the built-in plots use, e.g. a search's
Pareto front::

    def draw(fig, trials): ...
    page = to_html(report, sections=[Section("Pareto front", figure("Pareto front", draw, trials))])
"""
from __future__ import annotations

import html
import io
import json
import logging
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import Report, Row
from .task import change_text, is_fraction

log = logging.getLogger(__name__)

# what each part of a packed file holds; colours from Okabe & Ito's colour-blind-safe palette
PARTS = {
    "positions": ("#0072B2", "positions: where the nonzero weights are"),
    "indices": ("#E69F00", "indices: each weight's codebook entry"),
    "codebooks": ("#009E73", "codebooks: the shared values"),
    "dense": ("#CC79A7", "dense: tensors stored whole"),
    "graph": ("#56B4E9", "graph: the ONNX graph without weights"),
    "header": ("#999999", "header"),
}
WHOLE = "#7F7F7F"  # a file with no breakdown (ONNX, TFLite)
STAGE_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]


class NoFigure(Exception):
    """This report holds nothing to draw for a figure; the message says why (one line)."""


@dataclass
class Section:
    """A part of the page after the built-in ones: a title (an ``<h2>``) and trusted HTML."""

    title: str
    html: str
    id: str | None = None


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# ---- figures ---------------------------------------------------------------------------------

def figure(title: str, draw: Callable[..., None], *args: Any, size: tuple[float, float] = (5.6, 3.2)) -> str:
    """``<figure>`` with ``title`` as caption and what ``draw(fig, *args)`` drew as inline SVG; when
    ``draw`` raises :class:`NoFigure` (or fails), its one-line message stands in the figure's place."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    head = f'<figure id="fig-{_slug(title)}"><figcaption>{esc(title)}</figcaption>'
    try:
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": _slug(title), "font.size": 10,
                                    "axes.spines.top": False, "axes.spines.right": False}):
            fig = Figure(figsize=size)
            FigureCanvasSVG(fig)
            draw(fig, *args)
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    except NoFigure as e:
        return head + f'<p class="nofig">{esc(e)}</p></figure>'
    except Exception as e:  # a page with one figure missing beats no page
        log.warning("figure %r could not be drawn: %s", title, e, exc_info=True)
        return head + f'<p class="nofig">This figure could not be drawn: {esc(type(e).__name__)}: {esc(e)}</p></figure>'
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', rf'<svg\1 role="img" aria-label="{esc(title)}"', svg,
                 count=1)
    return head + f'<div class="plot">{svg}</div></figure>'


def _wrap(label: str, width: int = 18) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


def _need_rows(report: Report, n: int = 2) -> None:
    if len(report.rows) < n:
        raise NoFigure(f"Needs at least {n} rows to compare; this report has {len(report.rows)}.")


def draw_bytes(fig, report: Report) -> None:
    """Each row's file as one bar split by what its bytes hold, with the total and the ratio."""
    ax = fig.add_subplot(1, 1, 1)
    labels = [_wrap(r.label) for r in report.rows]
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
        ax.annotate(f"{_wrap(r.label, 22)}\n{x:,} B, {yv:.4f}", (x, yv), xytext=(0, 8 if i % 2 == 0 else -10),
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
    ax.set_yticks(y0, [_wrap(r.label) for r in report.rows])
    ax.set_xlim(0, max(1.0, *(report.ratios(r.metrics).get(f"speedup_{k}") or 0 for r in report.rows
                              for k in keys)) * 1.45)
    ax.set_xlabel(f"speed-up against the baseline (measured, {report.baseline.threads} thread(s))")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=n, fontsize=8, frameon=False)


def _device_profile(name: str):
    from .devices import load_device
    from .errors import RecipeError

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
    profile = _device_profile(name)
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
    axes[0].set_yticks(list(range(len(rows)))[::-1], [_wrap(r.label, 14) for r in rows])


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
    ax.set_yticks(y0, [n + (f"\n{_wrap(others[n], 28)}" if others[n] else "") for n in shown], fontsize=8)
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


# ---- the page -----------------------------------------------------------------------------------

def _pct(part: int, total: int) -> str:
    return f"{100 * part / total:.0f}%" if total else "-"


def headline(report: Report) -> str:
    """Three or four cards: how many times smaller, what was lost, where the bytes went, speed or fit."""
    b, f = report.baseline, report.final
    q = report.ratios(f)
    cards = []
    if q["compression"]:
        cards.append(("size", f"{q['compression']:.1f}\u00d7 smaller",
                      f"{f.stored_bytes:,}-byte .{f.artifact} file; the baseline's fp32 weights take "
                      f"{b.dense_bytes:,} bytes"))
    name, change = b.metric_name, q["metric_change"]
    num = change_text(name, change).replace("-", "\u2212")
    amount = num.replace(" pt", f" points of {name}") if is_fraction(name) else f"{name} {num}"
    drop = report.constraints.get("max_metric_drop")
    if drop is None:
        budget = ""
    else:
        budget = f" (allowed drop {drop * 100:g} points)" if is_fraction(name) else f" (allowed drop {drop:g})"
    if len(report.rows) == 1:
        lost = "baseline only"
    elif abs(change) < 5e-5:
        lost = f"no {name} lost"
    elif change > 0:
        lost = f"nothing: {amount}"
    else:
        lost = amount
    cards.append(("loss", lost, f"{b.metric:.4f} \u2192 {f.metric:.4f} on held-out data{budget}"))
    parts = [(k, f.breakdown[k]) for k in PARTS if f.breakdown.get(k)]
    if parts:
        total = sum(v for _, v in parts)
        top = max(parts, key=lambda kv: kv[1])
        bar = "".join(f'<span style="width:{100 * v / total:.2f}%;background:{PARTS[k][0]}" '
                      f'title="{esc(k)} {v:,} B"></span>' for k, v in parts)
        legend = "".join(f'<li><i style="background:{PARTS[k][0]}"></i>{esc(k)} {_pct(v, total)} '
                         f'<span class="small">({v:,} B)</span></li>' for k, v in parts)
        cards.append(("bytes", f"{_pct(top[1], total)} on {top[0]}",
                      f'<span class="stack">{bar}</span><ul class="key">{legend}</ul>{esc(PARTS[top[0]][1])}'))
    else:
        cards.append(("bytes", f"{f.stored_bytes:,} B", f"one .{f.artifact} file; it has no breakdown by part"))
    if f.latency_ms and len(report.rows) > 1:
        k = list(f.latency_ms)[0]
        s = q.get(f"speedup_{k}")
        sub = f"ONNX Runtime, batch {k[1:]}, measured: {b.latency_ms.get(k, float('nan')):.3f} \u2192 " \
              f"{f.latency_ms[k]:.3f} ms"
        if q["mac_reduction"] and abs(q["mac_reduction"] - 1) > 0.005:
            sub += f"; {q['mac_reduction']:.2f}\u00d7 fewer MACs"
        if any("no speed-up is claimed" in n for n in report.rows[-1].notes):
            sub += "; zeros run through dense kernels, so sparsity buys no speed here"
        cards.append(("speed", f"{s:.2f}\u00d7 as fast" if s else "no latency", sub))
    if report.rows[-1].device is not None:
        d = report.rows[-1].device
        p = _device_profile(d.device)
        fits = p is not None and d.flash_bytes <= p.flash_bytes and d.ram_bytes <= p.ram_bytes
        sub = (f"flash {d.flash_bytes:,} B" + (f" ({_pct(d.flash_bytes, p.flash_bytes)} of it)" if p else "")
               + f", RAM {d.ram_bytes:,} B" + (f" ({_pct(d.ram_bytes, p.ram_bytes)})" if p else "")
               + f" (measured); ~{d.latency_ms_est:.2f} ms, ~{d.energy_uj_est:.1f} \u00b5J (estimates)")
        cards.append(("device", f"fits {d.device}" if fits else f"does not fit {d.device}" if p else d.device, sub))
    out = []
    for cls, big, sub in cards:
        sub_html = sub if cls == "bytes" and parts else esc(sub)
        title = {"size": "Size", "loss": "What was lost", "bytes": "Where the bytes went", "speed": "Speed",
                 "device": "Device"}[cls]
        out.append(f'<div class="card {cls}"><div class="label">{title}</div><div class="big">{esc(big)}</div>'
                   f'<div class="sub">{sub_html}</div></div>')
    return f'<section class="headline" aria-label="summary">{"".join(out)}</section>'


def _table(report: Report) -> str:
    head, rows = report.table()
    th = "".join(f'<th scope="col">{esc(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return (f'<div class="scroll"><table class="report"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'
            f'<p class="small">Bytes are of the file written; the ratio is the baseline\'s dense fp32 bytes over '
            f"them. MACs are counted on the exported ONNX graph at batch 1. Latency is ONNX Runtime on the machine "
            f"that ran the recipe, median after warm-up, {report.baseline.threads} thread(s), all rows timed in one "
            f"loop (measured).</p>")


def _device_section(report: Report) -> str:
    rows = [r for r in report.rows if r.device is not None]
    if not rows:
        return ""
    name = rows[0].device.device
    p = _device_profile(name)
    keys = list(report.baseline.latency_ms)
    head = ["stage", "flash B (measured)", "RAM B (measured)", "latency ms (estimate)", "energy \u00b5J (estimate)"]
    head += [f"ONNX Runtime ms {k} (measured, this machine)" for k in keys[:1]]
    counted = any(getattr(r.device, "instructions", None) is not None for r in rows)
    if counted:
        head += ["instructions (measured, QEMU)", "ms from instructions (estimate)"]
    body = []
    for r in rows:
        d = r.device
        cells = [r.label, f"{d.flash_bytes:,}" + (f" ({_pct(d.flash_bytes, p.flash_bytes)} of {name})" if p else ""),
                 f"{d.ram_bytes:,}" + (f" ({_pct(d.ram_bytes, p.ram_bytes)})" if p else ""),
                 f"~{d.latency_ms_est:.3f}", f"~{d.energy_uj_est:.2f}"]
        cells += [f"{r.metrics.latency_ms.get(k, float('nan')):.3f}" for k in keys[:1]]
        if counted:
            n, ms = getattr(d, "instructions", None), getattr(d, "instr_latency_ms_est", None)
            cells += [f"{n:,}" if n is not None else "-", f"~{ms:.3f}" if ms is not None else "-"]
        body.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    d = rows[-1].device
    limits = ", ".join(f"{k} {v:,}" for k, v in report.constraints.items() if k in ("max_flash", "max_ram",
                                                                                     "max_latency_ms"))
    facts = [f"Flash: bytes of the {d.artifact} ({d.precision}). RAM: {d.ram_source}.",
             f"Latency and energy are estimates: {d.estimate_model}."]
    if getattr(d, "instructions_source", ""):
        facts.append(f"Instructions: {d.instructions_source}.")
    if p is not None:
        facts.append(f"{name}: {p.description or p.core}; flash {p.flash_bytes:,} B, RAM {p.ram_bytes:,} B, "
                     f"clock {p.clock_hz / 1e6:g} MHz.")
    else:
        facts.append(f"The profile {name} is not shipped with this edgecompress; its memory sizes are not shown.")
    if limits:
        facts.append(f"Constraints: {limits}.")
    return (f'<h2 id="device">Device: {esc(name)}</h2>'
            + figure(f"Flash and RAM on {name}", draw_device, report, size=(5.6, 0.5 * len(rows) + 2.2))
            + f'<div class="scroll"><table class="report"><thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in head)}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
            + "<ul class=\"small\">" + "".join(f"<li>{esc(x)}</li>" for x in facts) + "</ul>")


def _notes(report: Report) -> str:
    parts = []
    for r in report.rows[1:]:
        items = [f"<li><b>{esc(n)}</b>: {esc(w)}</li>" for n, w in r.touched.items()]
        items += [f'<li class="skip"><b>{esc(n)}</b>: skipped: {esc(w)}</li>' for n, w in r.skipped.items()]
        items += [f"<li>{esc(n)}</li>" for n in r.notes]
        items += [f"<li>{esc(n)}</li>" for n in (r.device.notes if r.device else [])]
        parts.append(f"<h3>{esc(r.label)} <span class=\"small\">({esc(r.stage)}: {len(r.touched)} layers "
                     f"touched, {len(r.skipped)} skipped)</span></h3><ul>{''.join(items) or '<li>nothing</li>'}</ul>")
    return "".join(parts) or "<p>Only the baseline was measured.</p>"


CSS = """
:root{--ink:#1b1f24;--mute:#5b6570;--line:#d8dde3;--bad:#b3261e}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--ink);
 margin:0 auto;max-width:980px;padding:16px}
h1{font-size:1.45em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid var(--line)}
h3{font-size:1em;margin:1em 0 .3em}
.lede{color:var(--mute);margin:.2em 0 1em}
.headline{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:10px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .label{font-size:.8em;text-transform:uppercase;letter-spacing:.05em;color:var(--mute)}
.card .big{font-size:1.7em;font-weight:650;line-height:1.2;margin:.1em 0}
.card .sub{font-size:.85em;color:var(--mute)}
.stack{display:flex;height:14px;border-radius:3px;overflow:hidden;margin:4px 0}
.stack span{display:block;height:100%}
ul.key{list-style:none;padding:0;margin:4px 0;display:flex;flex-wrap:wrap;gap:0 .9em}ul.key li{white-space:nowrap}
ul.key i{display:inline-block;width:.8em;height:.8em;margin-right:.3em;border-radius:2px;vertical-align:-1px}
.violations{border:2px solid var(--bad);border-radius:8px;padding:8px 12px;margin:12px 0;color:var(--bad)}
.ok{color:#1e6b35}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:.82em;margin:.4em 0}
th,td{border-bottom:1px solid var(--line);padding:4px 6px;text-align:right;vertical-align:top}
th{background:#f3f5f7}th:first-child,td:first-child,.layers td,.layers th{text-align:left}
table.report td{white-space:nowrap}table.report td:first-child{white-space:normal;min-width:8em}
figure{margin:1em 0;break-inside:avoid;page-break-inside:avoid}
figcaption{font-weight:600;margin-bottom:.3em}
.plot{overflow-x:auto}figure svg{width:100%;height:auto;max-width:680px;display:block}
.nofig{color:var(--mute);font-style:italic;border:1px dashed var(--line);padding:10px;border-radius:6px}
.small{font-size:.85em;color:var(--mute)}.skip{color:#8a4b00}
nav{font-size:.85em}nav a{margin-right:.8em;color:inherit}
@media (max-width:600px){body{font-size:14px;padding:10px}.card .big{font-size:1.4em}figure svg{min-width:420px}}
@media print{body{max-width:none;font-size:10pt;padding:0}nav{display:none}.scroll{overflow:visible}
 table.report td{white-space:normal}h2{break-after:avoid}.card{break-inside:avoid}
 figure svg{max-width:16cm}a{color:inherit;text-decoration:none}}
"""


def to_html(report: Report, *, sections: Iterable[Section] = (), folder: str | Path | None = None) -> str:
    """The whole page as one string: headline, table, figures, per-layer detail, sensitivity scans,
    the device, ``sections`` (e.g. a search's Pareto front), then every layer touched or skipped."""
    f = report.final
    stages = ", ".join(r.label for r in report.rows[1:]) or "no stages"
    parts = [f"<h1>edgecompress report: {esc(report.task)}</h1>",
             f'<p class="lede">{len(report.rows) - 1} stage(s): {esc(stages)}. Every number is measured in this '
             f"run on held-out data and files actually written, unless labelled an estimate.</p>",
             headline(report)]
    if report.violations:
        parts.append('<div class="violations"><b>Constraints missed</b><ul>'
                     + "".join(f"<li>{esc(v)}</li>" for v in report.violations) + "</ul></div>")
    elif report.constraints:
        parts.append('<p class="ok">Every constraint met: '
                     + esc(", ".join(f"{k} {v}" for k, v in report.constraints.items())) + ".</p>")
    body = [("table", "The report table", _table(report)),
            ("bytes", "Where the bytes go",
             figure("Bytes of each row's file, by what they hold", draw_bytes, report,
                    size=(5.6, 0.55 * len(report.rows) + 1.9))),
            ("tradeoff", f"{f.metric_name.capitalize()} against size",
             figure(f"{f.metric_name} against bytes (log scale), every row", draw_tradeoff, report,
                    size=(5.6, 3.4))),
            ("speed", "Speed",
             figure("Speed-up against the baseline (ONNX Runtime, measured)", draw_speed, report,
                    size=(5.6, 0.3 * len(report.rows) * max(1, len(f.latency_ms)) + 1.0))),
            ("layers", "Per layer", layer_table(report) + figure("Per layer: what each stage set", draw_layers, report))]
    scans = find_scans(report, folder)
    if scans:
        body.append(("sensitivity", "Sensitivity", "".join(
            figure(f"Sensitivity scan of {row.label} (validation data)", draw_scan, row, path) for row, path in scans)))
    nav = []
    html_body = []
    for sid, title, content in body:
        nav.append(f'<a href="#{sid}">{esc(title)}</a>')
        html_body.append(f'<h2 id="{sid}">{esc(title)}</h2>{content}')
    device = _device_section(report)
    if device:
        nav.append('<a href="#device">Device</a>')
        html_body.append(device)
    for s in sections:
        sid = s.id or _slug(s.title)
        nav.append(f'<a href="#{sid}">{esc(s.title)}</a>')
        html_body.append(f'<h2 id="{sid}">{esc(s.title)}</h2>{s.html}')
    nav.append('<a href="#notes">Layers touched and skipped</a>')
    html_body.append(f'<h2 id="notes">Layers touched and skipped</h2>{_notes(report)}')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>edgecompress report: {esc(report.task)}</title><style>{CSS}</style></head><body>"
            + "".join(parts) + f"<nav>{''.join(nav)}</nav>" + "".join(html_body)
            + '<p class="small">Written by edgecompress; one self-contained file (no scripts, nothing fetched).</p>'
            + "</body></html>\n")


def write_html(report: Report, path: str | Path, *, sections: Sequence[Section] = (),
               folder: str | Path | None = None) -> Path:
    """Write :func:`to_html` to ``path`` atomically; returns the path."""
    from .files import write_atomic

    page = to_html(report, sections=sections, folder=folder)
    return write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
