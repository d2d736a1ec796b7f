"""The pieces every edgecompress HTML page is built from: the palette, ``Section``, ``NoFigure``,
escaping, the stylesheet, and ``figure``, which turns a matplotlib drawing function into inline SVG."""
from __future__ import annotations

import html
import io
import logging
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def figure(title: str, draw: Callable[..., None], *args: Any, size: tuple[float, float] = (5.6, 3.2)) -> str:
    """``<figure>`` with ``title`` as caption and what ``draw(fig, *args)`` drew as inline SVG; when
    ``draw`` raises :class:`NoFigure` (or fails), its one-line message stands in the figure's place."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    head = f'<figure id="fig-{slug(title)}"><figcaption>{esc(title)}</figcaption>'
    try:
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": slug(title), "font.size": 10,
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


def wrap(label: str, width: int = 18) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


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


