"""Shared fixtures. Built-in baselines come from the user cache (trained on first use)."""
from __future__ import annotations

import functools

import pytest

from edgecompress.zoo import builtin_task


@functools.lru_cache(maxsize=None)
def _task(name: str):
    return builtin_task(name)


@pytest.fixture(scope="session")
def task():
    """task(name) -> the built-in Task, built once per session."""
    return _task
