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

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...files import write_atomic
from ...task import change_text, is_fraction
from .figures import (device_profile, draw_bytes, draw_device, draw_layers, draw_scan, draw_speed, draw_tradeoff,
                      find_scans, layer_table)
from .kit import CSS, PARTS, Section, slug, esc, figure

if TYPE_CHECKING:
    from ..base import Report

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
        p = device_profile(d.device)
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
    p = device_profile(name)
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
        sid = s.id or slug(s.title)
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

    page = to_html(report, sections=sections, folder=folder)
    return write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
