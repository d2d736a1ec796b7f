"""The baseline row every report starts with, measured once per study (``Baselines``) and kept in the
study's user attributes, so the trials, their cheaper runs, every worker and a resumed run reuse it."""
from __future__ import annotations

import contextlib

from ..errors import ArtifactError
from ..recipe import Recipe

BASELINE_ATTR = "edgecompress:baseline:"


def _digest(h, value) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().flatten().contiguous()
        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for v in value:
            _digest(h, v)
    else:
        h.update(repr(value).encode())


def weights_digest(task) -> str:
    """sha256 of the task model's state dict and its held-out data."""
    import hashlib

    h = hashlib.sha256()
    for name, t in task.model.state_dict().items():
        h.update(name.encode())
        _digest(h, t)
    for batch in task.eval_data:
        _digest(h, batch)
    return h.hexdigest()


def baseline_key(task, recipe: Recipe, weights: str | None = None) -> str:
    """The study attribute holding the baseline row: a digest of the task's weights and held-out data,
    its metric, and the recipe's device, C weight format and measuring threads and robustness (what
    the baseline row depends on; not the stages, not latency timing, which every run does anew)."""
    import hashlib
    import json

    from ..version import __version__

    weights = weights or weights_digest(task)
    rob = recipe.measure.robustness
    settings = {"edgecompress": __version__, "task": task.name, "metric": task.metric_name, "device": recipe.device,
                "c": recipe.c.model_dump(mode="json"), "threads": recipe.measure.threads,
                "robustness": rob.model_dump(mode="json") if hasattr(rob, "model_dump") else rob}
    text = weights + json.dumps(settings, sort_keys=True, default=str)
    return BASELINE_ATTR + hashlib.sha256(text.encode()).hexdigest()[:32]


class Baselines:
    """The baseline row of a trial's recipe, measured once per study: kept in this process and in the
    study's user attributes, so every worker (on any machine) and a resumed run reuse it."""

    def __init__(self, task):
        self.task, self._weights, self._rows = task, None, {}

    def get(self, study, recipe: Recipe):
        from ..pipeline import measure_baseline
        from ..report import Report

        if self._weights is None:
            self._weights = weights_digest(self.task)
        key = baseline_key(self.task, recipe, self._weights)
        if key in self._rows:
            return self._rows[key]
        row = None
        stored = study.user_attrs.get(key) if study is not None else None
        if stored is not None:
            with contextlib.suppress(ArtifactError):  # another report schema: measured again below
                row = Report.from_dict(stored, where=f"study attribute {key}").rows[0]
        if row is None:
            row = measure_baseline(self.task, recipe)
            if study is not None:
                study.set_user_attr(key, Report(self.task.name, [row]).to_dict())
        self._rows[key] = row
        return row
