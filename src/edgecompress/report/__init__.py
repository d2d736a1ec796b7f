"""The report: a baseline row and one row per stage, every number measured in the same run; as a
terminal table, JSON and Markdown (``base``) and as one HTML page (``html``)."""
from .base import SCHEMA_VERSION, Report, Row

__all__ = ["SCHEMA_VERSION", "Report", "Row"]
