"""Random sampling that does not depend on who samples: a trial's values follow from the seed and the
trial's number alone, so one worker, many workers on one study, and a resumed study hold the same trials
(and, since each trial's run is seeded, reach the same front)."""
from __future__ import annotations

import zlib

import optuna


class NumberedRandomSampler(optuna.samplers.RandomSampler):
    """``optuna.samplers.RandomSampler`` seeded per trial number and parameter name."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed = seed

    def sample_independent(self, study, trial, param_name, param_distribution):
        rng = optuna.samplers.RandomSampler(zlib.crc32(f"{self.seed}:{trial.number}:{param_name}".encode()))
        return rng.sample_independent(study, trial, param_name, param_distribution)
