"""An ensemble of compressed models against one compressed model of the same bytes, one table.

    python -m bench.ensemble [--seeds 3] [--epochs 20] [--single-epochs 10] [--noise 0.3]

mnist1d-cnn. Per seed:
- the ensemble: three ``mnist1d-cnn-tiny`` members (2,842 parameters each), each trained from scratch
  with its own seed (no teacher), then 5-bit weight sharing; combined by averaging probabilities
  (and, on the same members, by vote, fitted weights and stacking, fitted on the validation split);
- the single model: the mnist1d-cnn baseline pruned (global magnitude, one shot, fine-tuned) then
  4-bit weight sharing, at the sparsity whose .ecz is the largest that does not exceed the ensemble's
  (found per seed, without fine-tuning, over a grid of sparsities);
- a student distilled from the ensemble (the distill stage with the members as teachers, the mean of
  their probabilities), then 5-bit weight sharing: the size of one member;
- the plain member: the ensemble's first member alone.
Every number is the pipeline's own measurement: bytes of the .ecz written, accuracy on the test split,
robustness on that split under Gaussian noise and MNIST-1D's sheared variant (``measure.robustness``).
Mean and sample standard deviation over the seeds.
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
from edgecompress.task import predict
from edgecompress.techniques.ensemble import Ensemble, fit_stack, fit_weights
from edgecompress.zoo import builtin_task

from ._table import print_table

SPARSITIES = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.94, 0.97)


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


def single_stages(sparsity: float, epochs: int) -> list:
    return [{"stage": "prune", "sparsity": sparsity, "keep_output": False,
             **({"finetune": {"epochs": epochs, "lr": 1e-3}} if epochs else {})},
            {"stage": "cluster", "bits": 4, "bias_bits": 5, **({"finetune": {"epochs": 2, "lr": 3e-4}} if epochs else {})}]


def calibrate(task, budget: int) -> tuple[float, int]:
    """The lowest sparsity (most weights) whose pruned and 4-bit shared .ecz fits in ``budget`` bytes."""
    for s in SPARSITIES:
        size = ec.compress(task, ec.Recipe.from_dict({"stages": single_stages(s, 0), "measure": {"latency": False}})
                           ).report.final.stored_bytes
        if size <= budget:
            return s, size
    return SPARSITIES[-1], size


def run_seed(seed: int, args) -> dict[str, dict]:
    task = builtin_task("mnist1d-cnn")
    member = {"model": "mnist1d-cnn-tiny", "train": {"epochs": args.epochs, "lr": 3e-3, "distill": {"alpha": 0}},
              "stages": [{"stage": "cluster", "bits": 5, "bias_bits": 5}]}
    t0 = time.perf_counter()
    ens = compress(task, [{"stage": "ensemble", "members": [member] * 3, "seeds": [100 * seed + i for i in range(3)]}],
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
    out["plain member (one of the 3)"] = measured(members[0], task, args.noise)
    print(f"seed {seed}: ensemble {time.perf_counter() - t0:.0f}s", flush=True)
    sparsity, size = calibrate(task, ens.report.final.stored_bytes)
    print(f"seed {seed}: single model at sparsity {sparsity}: {size:,} <= {ens.report.final.stored_bytes:,} bytes "
          "before fine-tuning", flush=True)
    student = compress(dataclasses.replace(task, teachers=members), [
        {"stage": "distill", "student": "mnist1d-cnn-tiny",
         "train": {"epochs": args.epochs, "lr": 3e-3, "distill": {"teacher": "task"}}},
        {"stage": "cluster", "bits": 5, "bias_bits": 5}], seed, args.noise)
    out["student distilled from the ensemble"] = row(student.report.final)
    single = compress(task, single_stages(sparsity, args.single_epochs), seed, args.noise)
    out["single mnist1d-cnn, pruned + 4-bit"] = row(single.report.final)
    out["baseline mnist1d-cnn (fp32)"] = row(single.report.baseline)
    print(f"seed {seed}: done {time.perf_counter() - t0:.0f}s", flush=True)
    for k, v in out.items():  # each seed as it finishes, so a long run shows its progress
        print(f"  seed {seed} | {k} | " + " | ".join(f"{c} {x:,}" if c == "bytes" else f"{c} {x:.4f}"
                                                      for c, x in v.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of each member and of the student")
    ap.add_argument("--single-epochs", type=int, default=10, help="fine-tune epochs of the single model's pruning")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    args = ap.parse_args()
    runs = [run_seed(seed, args) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    keys = [k for k in runs[0] if k != "bytes"]
    cols = list(runs[0][keys[0]])
    single = next(k for k in keys if k.startswith("single"))

    def stat(values: list[float], scale: float = 1.0, fmt: str = ".4f") -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values) * scale:{fmt}} ± {sd * scale:{fmt.lstrip('+')}}"

    head = ["model", ".ecz bytes", "accuracy"] + [c for c in cols if c not in ("bytes", "clean")] + \
        ["vs single, clean", f"vs single, noise {args.noise:g}"]
    noise_key = f"gaussian_noise={args.noise:g}"
    table = []
    for k in keys:
        r = [k, f"{statistics.mean(run[k]['bytes'] for run in runs):,.0f}", stat([run[k]["clean"] for run in runs])]
        r += [stat([run[k][c] for run in runs]) for c in cols if c not in ("bytes", "clean")]
        r += [stat([run[k][c] - run[single][c] for run in runs], 100, "+.2f") + " pt" for c in ("clean", noise_key)]
        table.append(r)
    print(f"\nmnist1d-cnn, {args.seeds} seeds, members and student {args.epochs} epochs, single fine-tune "
          f"{args.single_epochs} + 2 epochs; test split (1,000), mean ± sd")
    print_table(head, table)


if __name__ == "__main__":
    main()
