"""Deprecated: the HTML report is ``edgecompress.report.html``; this name still works, with a warning."""
import warnings

from .report.html import CSS, NoFigure, Section, esc, figure, headline, layer_facts, to_html, write_html

warnings.warn("edgecompress.report_html is deprecated; import from edgecompress.report.html",
              DeprecationWarning, stacklevel=2)

__all__ = ["CSS", "NoFigure", "Section", "esc", "figure", "headline", "layer_facts", "to_html", "write_html"]
