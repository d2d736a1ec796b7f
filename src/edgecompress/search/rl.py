"""``sampler: rl``: an AMC-style agent that picks one value per layer (AMC's per-layer pruning ratios,
HAQ's per-layer bits), as an Optuna sampler, so it uses the study's storage, constraints and trial
code like every other sampler.

The agent is DDPG as AMC uses it, in its simplest form: an actor (layer state -> action in [0, 1])
and a critic (layer state, action -> reward), two small torch MLPs. An episode is one trial; its
steps are the per-layer parameters (``stages[i].per_layer.NAME`` and ``stages[i].layer_bits.NAME``)
in layer order. A step's state is AMC's layer embedding: which field (sparsity or bits), the layer's
index, kind (conv or linear), input and output channels, kernel size, its share of the model's MACs
and of its parameters, the previous layer's action, the parameter share already acted on in this
episode (sum of action x params share) and the share still to come. Every step of an episode gets
the episode's reward, as in AMC, without bootstrapping (discount 0: the critic estimates a trial's
reward from one layer's state and action). Rewards are normalised over the memory (minus their mean,
AMC's baseline, over their spread).

Reward: the trial's metric when it is an objective (else its first objective, a cost, negated); a
trial cut by the pruner scores its short run's metric. An infeasible trial (a constraint above 0, including
a trial cut on structure before training) is penalised below every feasible one: the lowest feasible
reward in the memory minus its total constraint excess. AMC keeps every episode inside the budget by
clipping its actions; here the budget is learned from these penalties, since the flash and RAM of a
trial are only known once it is built.

The memory is rebuilt from the study's finished trials each time the set of finished trials changes,
and the two networks retrained from a fixed seed on it, so a resumed study or another worker's
process continues from everything the study holds, and the same seed and the same study give the same
proposals. The first ``n_startup_trials`` episodes act uniformly at random (AMC's warm-up); after
that the actor's action plus truncated Gaussian noise whose spread shrinks with each episode, from
0.3 to 0.03 at the study's last trial.
Parameters that are not per-layer (fine-tune epochs, optional stages, ...) are delegated to a
univariate TPE sampler.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState
from torch import nn

PARAM = re.compile(r"stages\[(\d+)\]\.(per_layer|layer_bits)\.(.+)")
FEATURES = 11


def layer_features(model: nn.Module, example: torch.Tensor) -> dict[str, list[float]]:
    """AMC's static layer embedding, raw: kind (1 conv, 0 linear), input and output channels, kernel
    size, MACs (one forward pass of ``example``) and parameters, for each weighted layer in model order."""
    import copy

    from ..layers import layer_macs, weighted_layers

    model = copy.deepcopy(model).eval()
    layers = weighted_layers(model)
    macs = layer_macs(model, list(layers), example)
    out = {}
    for n, m in layers.items():
        conv = not isinstance(m, nn.Linear)
        cin, cout = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
        kernel = math.prod(m.kernel_size) if conv else 1
        out[n] = [float(conv), float(cin), float(cout), float(kernel), float(macs.get(n, 0)), float(m.weight.numel())]
    return out


def _grid(dist: BaseDistribution) -> list | None:
    """The values of a discrete distribution in increasing order (choices in their order when not all
    numbers), or None for a continuous one."""
    if isinstance(dist, CategoricalDistribution):
        c = list(dist.choices)
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in c)
        return sorted(c) if numeric else c
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        k = int(round((dist.high - dist.low) / dist.step))
        return [dist.low + i * dist.step for i in range(k + 1)]
    return None


def to_value(a: float, dist: BaseDistribution) -> Any:
    """The value of action ``a`` in [0, 1] in ``dist`` (a grid of k values: the (floor(a k))-th)."""
    a = min(1.0, max(0.0, float(a)))
    grid = _grid(dist)
    if grid is not None:
        return grid[min(len(grid) - 1, int(a * len(grid)))]
    lo, hi = float(dist.low), float(dist.high)
    v = math.exp(math.log(lo) + a * (math.log(hi) - math.log(lo))) if dist.log else lo + a * (hi - lo)
    v = min(hi, max(lo, v))
    return int(round(v)) if isinstance(dist, IntDistribution) else v


def to_action(value: Any, dist: BaseDistribution) -> float:
    """The inverse of ``to_value``: a grid value's cell centre, a continuous value's position."""
    grid = _grid(dist)
    if grid is not None:
        i = min(range(len(grid)), key=lambda j: abs(grid[j] - value)) if value not in grid else grid.index(value)
        return (i + 0.5) / len(grid)
    lo, hi = float(dist.low), float(dist.high)
    if hi == lo:
        return 0.5
    if dist.log:
        return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (float(value) - lo) / (hi - lo)


def _mlp(inputs: int, outputs: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


class RLSampler(BaseSampler):
    """AMC-style DDPG over per-layer actions (see the module's docstring).

    ``layers`` maps each weighted layer of the model to its raw features (``layer_features``);
    ``objectives`` names the study's objectives (the reward is the metric, else the first one).
    The noise's spread starts at ``sigma`` after the warm-up and is multiplied by ``decay`` per
    episode, or, given ``horizon`` (the study's trials), shrinks to ``min_sigma`` at its last trial."""

    def __init__(self, layers: dict[str, list[float]] | None, objectives: Sequence[str] = ("metric",), *,
                 seed: int = 0, n_startup_trials: int = 4, sigma: float = 0.3, decay: float = 0.85,
                 min_sigma: float = 0.03, steps: int = 300, horizon: int | None = None) -> None:
        self._layers = layers
        self._objectives = list(objectives)
        self._seed, self._startup, self._steps = seed, n_startup_trials, steps
        if horizon is not None:  # the noise reaches min_sigma at the last of ``horizon`` trials
            decay = (min_sigma / sigma) ** (1 / max(1, horizon - 1 - n_startup_trials))
        self._sigma, self._decay, self._min_sigma = sigma, decay, min_sigma
        self._independent = TPESampler(seed=seed, n_startup_trials=n_startup_trials)
        self._cache: tuple[tuple[int, ...], nn.Module | None, int] | None = None
        self._norm: dict[str, list[float]] = {}
        if layers:
            names = list(layers)
            top = [max(max(v[k] for v in layers.values()), 1.0) for k in range(4)]
            macs, params = (sum(v[k] for v in layers.values()) or 1.0 for k in (4, 5))
            for i, n in enumerate(names):
                v = layers[n]
                self._norm[n] = [i / max(1, len(names) - 1), v[0], v[1] / top[1], v[2] / top[2], v[3] / top[3],
                                 v[4] / macs, v[5] / params]

    # ---- Optuna's sampler interface -----------------------------------------------------------
    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def before_trial(self, study, trial) -> None:
        self._independent.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._independent.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._independent.reseed_rng()

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution):
        m = PARAM.fullmatch(param_name)
        if m is None or (_grid(param_distribution) is None and not isinstance(
                param_distribution, (FloatDistribution, IntDistribution))):
            return self._independent.sample_independent(study, trial, param_name, param_distribution)
        state = self.state(param_name, trial.params, trial.distributions)
        actor, episodes = self.policy(study)
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + trial.number * 1009 + len(trial.params))
        if actor is None:
            a = float(torch.rand(1, generator=g))
        else:
            with torch.no_grad():
                mean = float(torch.sigmoid(actor(torch.tensor([state]))))
            sigma = max(self._min_sigma, self._sigma * self._decay ** max(0, episodes - self._startup))
            a = _truncated(mean, sigma, g)
        return to_value(a, param_distribution)

    # ---- the agent ---------------------------------------------------------------------------
    def state(self, name: str, params: dict[str, Any], dists: dict[str, BaseDistribution]) -> list[float]:
        """AMC's state of the step that sets ``name``, from the per-layer values set before it in the
        same trial (the steps are taken in stage order, layers in model order)."""
        m = PARAM.fullmatch(name)
        assert m is not None
        stage, field, layer = int(m[1]), m[2], m[3]
        if self._layers is None:
            raise RuntimeError("sampler rl needs the task's model to describe its layers")
        order = list(self._layers)
        static = self._norm.get(layer, [0.0] * 7)
        key = (stage, order.index(layer) if layer in order else len(order))
        prev, done = 0.0, 0.0
        earlier = []
        for other, value in params.items():
            o = PARAM.fullmatch(other)
            if o is None or other not in dists:
                continue
            okey = (int(o[1]), order.index(o[3]) if o[3] in order else len(order))
            if okey < key:
                earlier.append((okey, o[3], to_action(value, dists[other])))
        earlier.sort()
        if earlier:
            prev = earlier[-1][2]
            done = sum(a * self._norm.get(n, [0.0] * 7)[6] for _, n, a in earlier)
        rest = sum(self._norm[n][6] for n in order[key[1] + 1:]) if layer in order else 0.0
        return [float(field == "layer_bits")] + static + [prev, done, rest]

    def episodes(self, study) -> list[tuple[list[list[float]], list[float], float]]:
        """The memory: (states, actions, reward) of each finished trial with per-layer values."""
        rows = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            names = [n for n in t.params if PARAM.fullmatch(n)]
            if not names:
                continue
            r = self.reward(t)
            if r is None:
                continue
            states = [self.state(n, t.params, t.distributions) for n in names]
            actions = [to_action(t.params[n], t.distributions[n]) for n in names]
            rows.append((t.number, states, actions, r))
        rows.sort(key=lambda x: x[0])
        feasible = [r for *_, (r, excess) in rows if excess <= 0]
        floor = min(feasible) if feasible else 0.0
        return [(s, a, r if excess <= 0 else floor - excess) for _, s, a, (r, excess) in rows]

    def reward(self, t: FrozenTrial) -> tuple[float, float] | None:
        """(the trial's reward before the penalty, its total constraint excess), or None without one."""
        excess = sum(max(0.0, float(c)) for c in t.constraints.values()) if t.constraints else 0.0
        on = "metric" in self._objectives
        at = self._objectives.index("metric") if on else 0
        if t.state == TrialState.COMPLETE and t.values:
            return (1.0 if on else -1.0) * float(t.values[at]), excess
        if excess > 0:  # cut on structure: no value, but the excess says how far out
            return 0.0, excess
        short = t.user_attrs.get("short_metric")
        if short is not None and on:
            return float(short), 0.0
        return None

    def policy(self, study) -> tuple[nn.Module | None, int]:
        """The actor trained on the study's finished trials (None during the warm-up) and their count."""
        done = tuple(sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                          TrialState.PRUNED))))
        if self._cache is not None and self._cache[0] == done:
            return self._cache[1], self._cache[2]
        memory = self.episodes(study)
        actor = self.train(memory) if len(memory) >= self._startup else None
        self._cache = (done, actor, len(memory))
        return actor, len(memory)

    def train(self, memory) -> nn.Module:
        """Fit the critic to the normalised rewards of every step, then the actor to the critic's best
        action (both from the same seed, full batches, Adam)."""
        S = torch.tensor([s for states, _, _ in memory for s in states])
        A = torch.tensor([[a] for _, actions, _ in memory for a in actions])
        R = torch.tensor([[r] for states, _, r in memory for _ in states])
        R = (R - R.mean()) / (R.std() + 1e-6) if len(memory) > 1 else R - R.mean()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed)
            critic, actor = _mlp(FEATURES + 1, 1), _mlp(FEATURES, 1)
        copt = torch.optim.Adam(critic.parameters(), lr=3e-3, weight_decay=1e-4)
        aopt = torch.optim.Adam(actor.parameters(), lr=3e-3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other on a busy machine
        try:
            for _ in range(self._steps):
                copt.zero_grad()
                nn.functional.mse_loss(critic(torch.cat([S, A], 1)), R).backward()
                copt.step()
                aopt.zero_grad()
                (-critic(torch.cat([S, torch.sigmoid(actor(S))], 1)).mean()).backward()
                aopt.step()
        finally:
            torch.set_num_threads(threads)
        return actor.eval()


def _truncated(mean: float, sigma: float, g: torch.Generator) -> float:
    """A draw of N(mean, sigma) truncated to [0, 1] (redrawn until inside, at most 100 times)."""
    for _ in range(100):
        x = mean + sigma * float(torch.randn(1, generator=g))
        if 0.0 <= x <= 1.0:
            return x
    return min(1.0, max(0.0, mean))
