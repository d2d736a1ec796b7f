"""How each built-in baseline's training schedule was chosen: on the validation split, never the test.

    python -m bench.baselines                      # every built-in task, the default grid
    python -m bench.baselines --task mnist1d-cnn --lr 1e-3 3e-3 1e-2 --epochs 60 120

For each task, every (lr, epochs) of the grid trains the task's architecture from the task's seed with
the zoo's own loop (Adam, cosine schedule, the zoo's batch size and threads) and is scored on the
validation split. The row with the best validation accuracy is marked; its test accuracy is printed
for the record only. Run it once per kernel setting (see ``make test-portable``) to see the spread a
different CPU gives: the chosen schedule should win on each.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from edgecompress.finetune import finetune
from edgecompress.task import accuracy
from edgecompress.zoo import BUILTINS

from ._models import loader, seeded
from ._table import print_table
from ._timing import threads


def train(name: str, lr: float, epochs: int) -> tuple[float, float, float]:
    """(validation accuracy, test accuracy, seconds) of ``name``'s architecture trained at (lr, epochs)."""
    spec = BUILTINS[name]
    (xtr, ytr), (xv, yv), (xt, yt) = spec.data()
    model = seeded(name, spec.seed)
    data = loader(xtr, ytr)
    start = time.perf_counter()
    with threads(spec.threads):
        finetune(model, data, spec.train.model_copy(update={"lr": lr, "epochs": epochs}),
                 loss=nn.functional.cross_entropy, seed=spec.seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return accuracy(model(xv), yv), accuracy(model(xt), yt), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="*", default=list(BUILTINS))
    ap.add_argument("--lr", nargs="*", type=float, default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--epochs", nargs="*", type=float, default=[1.0, 2.0],
                    help="multiples of the zoo's epochs (1.0 = as shipped)")
    args = ap.parse_args()
    for name in args.task:
        spec = BUILTINS[name]
        rows = []
        for mult in args.epochs:
            epochs = max(1, round(spec.train.epochs * mult))
            for lr in args.lr:
                val, test, s = train(name, lr, epochs)
                print(f"{name}: lr {lr:g}, {epochs} epochs: validation {val:.4f}", flush=True)
                rows.append((val, [f"{lr:g}", str(epochs), f"{val:.4f}", f"{test:.4f}", f"{s:.0f}"]))
        best = max(v for v, _ in rows)
        shipped = f"lr {spec.train.lr:g}, {spec.train.epochs} epochs"
        print(f"\n{name} (shipped: {shipped}; * = best on validation)\n")
        print_table(["lr", "epochs", "validation", "test", "seconds"],
                    [r + ["*"] if v == best else r + [""] for v, r in rows])


if __name__ == "__main__":
    main()
