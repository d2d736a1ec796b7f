"""The recipe's sampler: TPE, NSGA-II, GP, random (``numbered.py``) or the RL agent (``rl.py``)."""
from __future__ import annotations

from .space import Space

FLAT = ("nsga2", "gp")  # samplers that evolve or model only the parameters every trial has (Space.sample)


def make_sampler(space: Space, worker: int = 0, done: int = 0, task=None):
    """The recipe's sampler; ``rl`` describes the layers of ``task``'s model to its agent (``rl.py``)."""
    import optuna

    spec = space.spec
    # workers of one study, and a resumed study, must not replay the sequence already proposed
    seed = spec.seed + 1009 * worker + 7919 * done
    if spec.sampler == "rl":
        from .rl import RLSampler, layer_features

        layers = layer_features(task.model, task.example_input) if task is not None else None
        return RLSampler(layers, spec.objectives, seed=seed, n_startup_trials=max(4, min(10, spec.trials // 4)),
                         horizon=spec.trials)
    if spec.sampler == "random":
        from .numbered import NumberedRandomSampler

        return NumberedRandomSampler(spec.seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, spec.trials // 5)))
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      n_startup_trials=max(4, min(10, spec.trials // 4)))
