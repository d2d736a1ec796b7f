"""The technique table: stage name -> (spec model, apply function).

A technique is ``apply(model, spec, ctx) -> model``. It receives a copy it may edit, records every
layer it touched or skipped in ``ctx.log``, and takes randomness from ``ctx.seed`` only. Adding a
technique means adding its spec and function here; the recipe schema, the CLI and the contract test
pick it up from this table.
"""
from __future__ import annotations

from . import cluster, distill, ensemble, lowrank, prune, quantize

TECHNIQUES = {
    "prune": (prune.PruneSpec, prune.apply),
    "quantize": (quantize.QuantizeSpec, quantize.apply),
    "cluster": (cluster.ClusterSpec, cluster.apply),
    "lowrank": (lowrank.LowRankSpec, lowrank.apply),
    "distill": (distill.DistillSpec, distill.apply),
    "ensemble": (ensemble.EnsembleSpec, ensemble.apply),
}
