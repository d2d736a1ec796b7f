"""The report as one self-contained HTML page (``page``), from the figures (``figures``) and the pieces
every page shares (``kit``); a search's page (``search.front``) is built from the same kit."""
from .figures import layer_facts
from .kit import CSS, NoFigure, Section, esc, figure
from .page import headline, to_html, write_html

__all__ = ["CSS", "NoFigure", "Section", "esc", "figure", "headline", "layer_facts", "to_html", "write_html"]
