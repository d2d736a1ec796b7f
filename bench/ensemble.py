"""An ensemble of compressed models against one compressed model of the same bytes, one table.

    python -m bench.ensemble [--seeds 3] [--member-sparsity 0.6] [--criteria magnitude,taylor,random]
                             [--epochs 15] [--noise 0.3] [--device cortex-m4]

mnist1d-cnn. Per seed:
- the ensemble: three compressed copies of the trained mnist1d-cnn baseline, each with
  ``--member-sparsity`` of every layer's channels pruned (a different criterion per member, so they
  keep different channels) then 4-bit weight sharing, each step fine-tuned with distillation from the
  baseline, each member with its own seed; combined by averaging probabilities (and, on the same
  members, by vote, fitted weights and stacking, fitted on the validation split);
- the single models: the same baseline pruned (unstructured, global magnitude; and channel,
  magnitude) then 4-bit shared with the same fine-tuning, each at the lowest sparsity whose .ecz does
  not exceed the ensemble's (found per seed, before fine-tuning, over a grid of sparsities); the
  better of the two on each seed is the "best single" the other rows are compared with;
- a student distilled from the ensemble: the channel single model's recipe (same sparsity, same
  bytes) with the ensemble's members as teachers (the mean of their probabilities);
- the plain member: the ensemble's first member alone (a third of the bytes);
- the first seed's ensemble as a C library for ``--device`` (Cortex-M4): flash, RAM and instructions
  per inference under QEMU, against each member's own library.
Every number is the pipeline's own measurement: bytes of the .ecz written, accuracy on the test split,
robustness on that split under Gaussian noise and MNIST-1D's sheared variant (``measure.robustness``).
Mean and sample standard deviation over the seeds. One torch thread (``--threads``): the fastest on a
shared machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import edgecompress as ec
from edgecompress.devices import evaluate, load_device
from edgecompress.export.c import have_toolchain
from edgecompress.task import predict
from edgecompress.techniques.ensemble import Ensemble, fit_stack, fit_weights
from edgecompress.zoo import builtin_task

from ._table import print_table

GRIDS = {"unstructured": (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.94, 0.97),
         "channel": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8)}


def robust(noise: float) -> dict:
    return {"gaussian_noise": [noise], "mnist1d": {"shear_scale": [1.5]}}


def row(m: ec.Metrics) -> dict:
    return {"bytes": m.stored_bytes, "clean": m.metric, **m.robustness}


def measured(model, task, noise: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return row(ec.measure(model, task, artifact=Path(tmp) / "m.ecz", latency=False, robustness=robust(noise)))


def compress(task, stages: list, seed: int, noise: float) -> ec.Result:
    return ec.compress(task, ec.Recipe.from_dict({"stages": stages, "seed": seed, "measure": {
        "latency": False, "robustness": robust(noise)}}))


CHOSEN: dict[str, list[float]] = {"unstructured": [], "channel": []}  # per seed, for the table's caption


def stages(kind: str, sparsity: float, epochs: int, teacher: str | None = "baseline",
           criterion: str = "magnitude") -> list:
    """Prune (``unstructured``: global magnitude over every layer, the classifier too; ``channel``: that
    fraction of each layer's channels, by ``criterion``), then 4-bit weight sharing; each fine-tuned
    with distillation from ``teacher`` (None: on the labels alone; no fine-tuning when ``epochs`` is 0)."""
    tune = {"distill": {"teacher": teacher}} if teacher else {}
    prune = ({"sparsity": sparsity, "keep_output": False, "lr": 1e-3} if kind == "unstructured" else
             {"granularity": "channel", "criterion": criterion, "sparsity": sparsity, "lr": 3e-3})
    lr = prune.pop("lr")
    return [{"stage": "prune", **prune, **({"finetune": {"epochs": epochs, "lr": lr, **tune}} if epochs else {})},
            {"stage": "cluster", "bits": 4, "bias_bits": 5,
             **({"finetune": {"epochs": 2, "lr": 3e-4, **tune}} if epochs else {})}]


def calibrate(task, kind: str, budget: int) -> tuple[float, int]:
    """The lowest sparsity (most weights) of ``kind`` whose 4-bit shared .ecz fits in ``budget`` bytes
    (before fine-tuning, which does not change the structure)."""
    for s in GRIDS[kind]:
        size = ec.compress(task, ec.Recipe.from_dict({"stages": stages(kind, s, 0), "measure": {"latency": False}})
                           ).report.final.stored_bytes
        if size <= budget:
            return s, size
    return GRIDS[kind][-1], size


def print_c(model: Ensemble, task, device: str) -> None:
    """The ensemble's C library on ``device``: flash, RAM and instructions against each member alone."""
    with tempfile.TemporaryDirectory() as tmp:
        d = evaluate(model, task, load_device(device), Path(tmp))
    print(f"C library on {device}: flash {d.flash_bytes:,} B, RAM {d.ram_bytes:,} B, "
          f"{d.instructions:,} instructions per inference", flush=True)
    for m in d.members:
        print(f"  member {m['member']} alone: flash {m['flash_bytes']:,} B, RAM {m['ram_bytes']:,} B, "
              f"{m['instructions']:,} instructions", flush=True)
    print("  " + next(n for n in d.notes if n.startswith("the ")), flush=True)


def run_seed(seed: int, args) -> dict[str, dict]:
    task = builtin_task("mnist1d-cnn")
    t0 = time.perf_counter()
    members = [stages("channel", args.member_sparsity, args.epochs, criterion=c) for c in args.criteria.split(",")]
    if args.scratch_epochs:  # each member trained from its own initialisation first, on the labels alone
        members = [{"model": "mnist1d-cnn", "train": {"epochs": args.scratch_epochs, "lr": 3e-3, "batch_size": 64,
                                                      "distill": {"alpha": 0}},
                    "stages": stages("channel", args.member_sparsity, args.epochs, None, c)}
                   for c in args.criteria.split(",")]
    ens = compress(task, [{"stage": "ensemble", "members": members, "seeds": [100 * seed + i for i in range(3)]}],
                   seed, args.noise)
    out = {"ensemble of 3 (average)": row(ens.report.final)}
    members = list(ens.model.members)
    val = [predict(m, task.val_data)[0] for m in members]
    y = torch.cat([y for _, y in task.val_data])
    out["same members, vote"] = measured(Ensemble(members, "vote"), task, args.noise)
    out["same members, weighted"] = measured(Ensemble(members, "weighted", fit_weights(val, y, F.cross_entropy)),
                                             task, args.noise)
    out["same members, stack"] = measured(Ensemble(members, "stack", combiner=fit_stack(val, y, F.cross_entropy, 0.01)),
                                          task, args.noise)
    out["plain member (the first)"] = measured(members[0], task, args.noise)
    print(f"seed {seed}: ensemble {time.perf_counter() - t0:.0f}s", flush=True)
    if seed == args.first_seed and args.device and have_toolchain():
        print_c(ens.model, task, args.device)
    budget = ens.report.final.stored_bytes
    for kind in ("unstructured", "channel"):
        sparsity, size = calibrate(task, kind, budget)
        CHOSEN[kind].append(sparsity)
        print(f"seed {seed}: single model, {kind} {sparsity}: {size:,} <= {budget:,} bytes before fine-tuning",
              flush=True)
        single = compress(task, stages(kind, sparsity, args.epochs), seed, args.noise)
        out[f"single mnist1d-cnn, {kind} pruning + 4-bit"] = row(single.report.final)
    student = compress(dataclasses.replace(task, teachers=members),
                       stages("channel", CHOSEN["channel"][-1], args.epochs, "task"), seed, args.noise)
    out["student distilled from the ensemble (single channel recipe)"] = row(student.report.final)
    out["baseline mnist1d-cnn (fp32)"] = row(single.report.baseline)
    print(f"seed {seed}: done {time.perf_counter() - t0:.0f}s", flush=True)
    for k, v in out.items():  # each seed as it finishes, so a long run shows its progress
        print(f"  seed {seed} | {k} | " + " | ".join(f"{c} {x:,}" if c == "bytes" else f"{c} {x:.4f}"
                                                      for c, x in v.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--member-sparsity", type=float, default=0.6, help="fraction of each layer's channels a "
                                                                        "member prunes")
    ap.add_argument("--criteria", default="magnitude,taylor,random", help="the three members' channel criteria")
    ap.add_argument("--scratch-epochs", type=int, default=0, help="train each member from scratch (its own "
                                                                  "initialisation, no teacher) for this many epochs "
                                                                  "before compressing it; 0: copies of the baseline")
    ap.add_argument("--epochs", type=int, default=15, help="fine-tune epochs after pruning (every model; 2 more "
                                                           "after weight sharing)")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--device", default="cortex-m4", help="the first seed's ensemble as a C library for this "
                                                          "device (its flash, RAM, instructions); '' skips it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [run_seed(seed, args) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    keys = [k for k in runs[0] if k != "bytes"]
    cols = list(runs[0][keys[0]])
    singles = [k for k in keys if k.startswith("single")]

    def best_single(run: dict) -> dict:  # the better single model of each seed (on clean test accuracy)
        return max((run[k] for k in singles), key=lambda r: r["clean"])

    def stat(values: list[float], scale: float = 1.0, fmt: str = ".4f") -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values) * scale:{fmt}} ± {sd * scale:{fmt.lstrip('+')}}"

    head = ["model", ".ecz bytes", "accuracy"] + [c for c in cols if c not in ("bytes", "clean")] + \
        ["vs best single, clean", f"vs best single, noise {args.noise:g}"]
    noise_key = f"gaussian_noise={args.noise:g}"
    table = []
    for k in keys:
        r = [k, f"{statistics.mean(run[k]['bytes'] for run in runs):,.0f}", stat([run[k]["clean"] for run in runs])]
        r += [stat([run[k][c] for run in runs]) for c in cols if c not in ("bytes", "clean")]
        r += [stat([run[k][c] - best_single(run)[c] for run in runs], 100, "+.2f") + " pt" for c in ("clean", noise_key)]
        table.append(r)
    origin = (f"trained from scratch {args.scratch_epochs} epochs each, no teacher, then" if args.scratch_epochs
              else "copies of the baseline with")
    print(f"\nmnist1d-cnn, {args.seeds} seed(s); members: {origin} {args.member_sparsity:.0%} of each layer's channels "
          f"pruned ({args.criteria}), 4-bit; single models pruned to the same bytes: unstructured "
          f"{', '.join(f'{v:.0%}' for v in CHOSEN['unstructured'])}, channel "
          f"{', '.join(f'{v:.0%}' for v in CHOSEN['channel'])} (per seed), 4-bit; fine-tuned {args.epochs} + 2 "
          f"epochs{'' if args.scratch_epochs else ' with distillation'} (the single models with distillation); "
          "test split (1,000), mean ± sd")
    print_table(head, table)


if __name__ == "__main__":
    main()
