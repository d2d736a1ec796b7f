"""Running a study's trials: the loop in this process (with ``on_trial`` callbacks) and local worker
processes joining one study."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .objective import Objective
from .space import Space
from .storage import open_storage, open_study, quiet_optuna
from .trial import TrialRecord, record

log = logging.getLogger(__name__)

OnTrial = Callable[[TrialRecord, "TrialRecord | None"], None]


def counted(study, trials: int) -> int:
    """Trials that count towards ``trials``: finished (complete, cut, or failed with a reason) or running.
    A duplicate (a recipe already run, not run again) counts only past ``trials`` of them, so that a
    sampler that proposes a recipe twice still gets its trials, and one that proposes nothing new stops."""
    import optuna

    S = optuna.trial.TrialState
    alive = [t for t in study.get_trials(deepcopy=False) if t.state in (S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING)
             or (t.state == S.FAIL and "error" in t.user_attrs)]
    dup = sum(t.user_attrs.get("rule") == "duplicate" for t in alive)
    return len(alive) - dup + max(0, dup - trials)


def run_trials(space: Space, task, storage_url_: str, name: str, *, trials: int, timeout: float | None,
               worker: int = 0, progress=None, on_trial: OnTrial | None = None, workdir: Path | None = None) -> None:
    """Run trials of the study until it holds ``trials`` counted trials or ``timeout`` seconds pass."""
    storage = open_storage(storage_url_)
    study = open_study(space, storage, name, worker, task)
    objective = Objective(space, task, progress, workdir)
    start = time.monotonic()
    with quiet_optuna():
        while counted(study, trials) < trials and (timeout is None or time.monotonic() - start < timeout):
            study.optimize(objective, n_trials=1, catch=(Exception,))
            if on_trial is not None:
                last = max((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                           key=lambda t: t.datetime_complete or t.datetime_start, default=None)
                if last is not None:
                    on_trial(record(last), None)


def _worker_main(source: dict, space_source: str, url: str, name: str, trials: int, timeout: float | None,
                 worker: int, task_ref: str | None) -> None:
    """A worker process: one torch thread, its own task, the shared study."""
    import torch

    torch.set_num_threads(1)
    from ..pipeline import resolve

    space = Space.from_dict(source, source=space_source)
    task = resolve(task_ref, space.plain({p.name: p.extremes()[0] for p in space.params}))
    run_trials(space, task, url, name, trials=trials, timeout=timeout, worker=worker)


def run_workers(space: Space, raw: dict, task_ref: str | None, url: str, name: str, *, trials: int,
                timeout: float | None, workers: int, on_poll: Callable[[], None] | None = None) -> None:
    """``workers`` local processes (spawned, one torch thread each) joining one study."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(raw, space.source, url, name, trials, timeout, w, task_ref),
                         daemon=False) for w in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=2.0)
            if on_poll is not None:
                on_poll()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        raise
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        log.warning("%d worker(s) exited with a non-zero code: %s", len(bad), bad)
