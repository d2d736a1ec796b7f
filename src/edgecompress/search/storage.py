"""Where a study lives and how it is opened: SQLite in the output folder unless a database URL (such
as PostgreSQL, for many workers on many machines) is given."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .samplers import make_sampler
from .space import Space

DIRECTIONS = {"metric": "maximize"}  # every other objective is a cost, minimised
SPACE_ATTR = "edgecompress:space"


def storage_url(storage: str | None, out: Path) -> str:
    if storage:
        return storage
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out / 'study.db').resolve()}"


def open_storage(url: str):
    """Optuna's RDB storage with heartbeats (a killed worker's trial is marked failed); an unreachable
    server gives one line naming host and port."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RecipeError(f"--storage must be a database URL (sqlite:///study.db, postgresql://user@host:5432/db); "
                          f"got {url!r}") from None
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 means psycopg 3 by it; psycopg2 is what is installed
        try:
            import psycopg  # noqa: F401
        except ImportError:
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 120}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with quiet_optuna():
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=10, grace_period=40)
    except Exception as e:  # sqlalchemy OperationalError, a missing driver, ...
        where = f"{parsed.host or 'localhost'}:{parsed.port or _default_port(parsed.get_backend_name())}" \
            if parsed.get_backend_name() != "sqlite" else (parsed.database or "memory")
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise RecipeError(f"--storage: cannot reach {where}: {first}") from None


def _default_port(backend: str) -> int | str:
    return {"postgresql": 5432, "mysql": 3306}.get(backend, "?")


@contextlib.contextmanager
def quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials' outcomes are recorded, not logged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(level)



def open_study(space: Space, storage, name: str, worker: int = 0, task=None):
    """Create or load the study; an existing one built from a different space is refused."""
    import optuna

    directions = [DIRECTIONS.get(o, "minimize") for o in space.spec.objectives]
    with quiet_optuna():
        study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    sampler=make_sampler(space, worker, task=task), load_if_exists=True)
        known = study.user_attrs.get(SPACE_ATTR)
        if known is None:
            study.set_user_attr(SPACE_ATTR, space.fingerprint())
        elif known != space.fingerprint():
            raise RecipeError(f"{space.source}: study {name!r} already exists with a different search space "
                              "(ranges, stages or objectives); give another --study or output folder")
        done = len(study.get_trials(deepcopy=False))
        if done:
            study.sampler = make_sampler(space, worker, done, task)
    return study
