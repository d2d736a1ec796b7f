"""Pruning: zero the least important weights, or remove channels and blocks outright.

One stage, every variant a parameter:

- ``criterion``: magnitude (``norm`` 1 or 2), taylor (|gradient x weight| over calibration batches),
  activation (mean activation or APoZ of channels; structured only), random (a baseline);
- ``granularity``: unstructured, balanced (every output row keeps the same count), nm (``pattern:
  "2:4"``), channel (Torch-Pruning's dependency graph; modules physically shrink), block (shape-
  preserving blocks replaced by identity);
- allocation: ``scope: global`` (one threshold), ``layer`` (uniform), ``sensitivity`` (a scan, then
  per-layer ratios reaching ``target`` with the least predicted loss), plus ``per_layer`` overrides;
- ``schedule``: oneshot, iterative (``steps`` prunes, fine-tune between), gradual (Zhu & Gupta
  polynomial during fine-tune), lottery (rewind survivors to initialisation, retrain).

The package, bottom to top: ``spec`` (PruneSpec and its rules), ``importance`` (one callable per
criterion, asked for scores by every path), ``depgraph`` (Torch-Pruning's dependency graph),
``scan`` (sensitivity scans), ``unstructured``, ``channels`` and ``blocks`` (the three paths), and
``stage`` (``apply``, which picks one).
"""
from __future__ import annotations

from .importance import Importance
from .spec import PruneSpec
from .stage import apply

__all__ = ["Importance", "PruneSpec", "apply"]
