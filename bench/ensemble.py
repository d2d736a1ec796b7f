"""An ensemble of compressed models against single compressed models of the same bytes, one table.

    python -m bench.ensemble [--seeds 3] [--scratch-epochs 60] [--scratch-lr 1e-2]
                             [--member-pruning unstructured|channel] [--member-sparsity 0.6] [--member-bits 4]
                             [--criteria magnitude,magnitude,magnitude] [--epochs 15] [--noise 0.3]
                             [--device cortex-m4]

mnist1d-cnn. Per seed:
- the ensemble: one member per ``--criteria`` entry, each a fresh mnist1d-cnn trained from its own
  initialisation ``--scratch-epochs`` epochs on the labels alone (Adam at ``--scratch-lr``, cosine,
  batches of 64; ``--scratch-epochs 0``: copies of the trained baseline, fine-tuned with distillation
  from it), then pruned (``--member-pruning`` at ``--member-sparsity``; none at 0) and weight-shared
  at ``--member-bits``, each with its own seed; combined by averaging probabilities (and, on the same
  members, by vote, fitted weights and stacking, fitted on the validation split);
- the single models: the trained baseline compressed to at most the ensemble's .ecz bytes by weight
  sharing alone (the most bits, up to 8, that fit), by unstructured pruning (global magnitude) + 4-bit
  and by channel pruning + 4-bit (the lowest sparsity that fits), found per seed before fine-tuning,
  fine-tuned as the members are with distillation from the baseline;
- with members trained from scratch: a single mnist1d-cnn trained exactly as a member is (its own
  seed), then compressed by the first single recipe that fits (weight sharing alone where it does), so
  that training is not what the ensemble wins by;
- a student distilled from the ensemble: a fresh mnist1d-cnn trained the members' epochs with the
  members as teachers (the mean of their probabilities), then that same single recipe;
- the plain member: the ensemble's first member alone (a third of the bytes);
- the first seed's ensemble as a C library for ``--device`` (Cortex-M4): flash, RAM and instructions
  per inference under QEMU, against each member's own library.
"Best single" is the most accurate single row of each seed (clean), the from-scratch one included.
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
from edgecompress.deploy import evaluate
from edgecompress.devices import load_device
from edgecompress.export.c import have_toolchain
from edgecompress.task import predict
from edgecompress.primitives.ensemble import Ensemble
from edgecompress.techniques.ensemble import fit_stack, fit_weights
from edgecompress.zoo import BUILTINS, builtin_task

from ._table import mean_sd, print_table

# the single model's recipes, largest first: weight sharing alone (bits), or pruning (sparsity) + 4-bit
GRIDS = {"sharing": (8, 7, 6, 5, 4, 3),
         "unstructured": (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.94, 0.97),
         "channel": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8)}
KINDS = {"sharing": "weight sharing only", "unstructured": "unstructured pruning + 4-bit",
         "channel": "channel pruning + 4-bit"}


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


CHOSEN: dict[str, list[str]] = {}  # each single recipe's setting per seed, for the table's caption


def stages(kind: str, sparsity: float, epochs: int, teacher: str | None = "baseline",
           criterion: str = "magnitude", bits: int = 4) -> list:
    """Prune (``unstructured``: global magnitude over every layer, the classifier too; ``channel``: that
    fraction of each layer's channels, by ``criterion``; nothing at sparsity 0), then ``bits``-bit weight
    sharing; the pruning fine-tuned ``epochs`` epochs and the sharing 2, each with distillation from
    ``teacher`` (None: on the labels alone; no fine-tuning when ``epochs`` is 0)."""
    tune = {"distill": {"teacher": teacher}} if teacher else {}
    share = {"stage": "cluster", "bits": bits, "bias_bits": 5,
             **({"finetune": {"epochs": 2, "lr": 3e-4, **tune}} if epochs else {})}
    if not sparsity:
        return [share]
    prune = ({"sparsity": sparsity, "keep_output": False, "lr": 1e-3} if kind == "unstructured" else
             {"granularity": "channel", "criterion": criterion, "sparsity": sparsity, "lr": 3e-3})
    lr = prune.pop("lr")
    return [{"stage": "prune", **prune, **({"finetune": {"epochs": epochs, "lr": lr, **tune}} if epochs else {})},
            share]


def single_stages(kind: str, setting: float, epochs: int, teacher: str | None = "baseline") -> list:
    """A single model's recipe: ``sharing`` (``setting`` bits, no pruning), or ``unstructured`` /
    ``channel`` pruning at sparsity ``setting`` then 4-bit sharing."""
    if kind == "sharing":
        return stages("unstructured", 0.0, epochs, teacher, bits=int(setting))
    return stages(kind, setting, epochs, teacher)


def label(kind: str, setting: float) -> str:
    return f"{int(setting)}-bit" if kind == "sharing" else f"{setting:.0%}"


def calibrate(task, kind: str, budget: int) -> tuple[float, int]:
    """The largest single model of ``kind`` (most bits; lowest sparsity) whose .ecz fits in ``budget``
    bytes (measured before fine-tuning, which does not change the structure)."""
    for s in GRIDS[kind]:
        size = ec.compress(task, ec.Recipe.from_dict({"stages": single_stages(kind, s, 0),
                                                      "measure": {"latency": False}})).report.final.stored_bytes
        if size <= budget:
            return s, size
    return GRIDS[kind][-1], size


def trained(model: str, epochs: int, lr: float, teacher: str | None = None) -> dict:
    """A distill stage training ``model`` from its own initialisation for ``epochs`` epochs at ``lr`` (Adam,
    cosine, batches of 64) as the members are trained: on the labels alone, or distilled from ``teacher``."""
    return {"stage": "distill", "student": model, "train": {
        "epochs": epochs, "lr": lr, "batch_size": 64, "distill": {"teacher": teacher} if teacher else {"alpha": 0}}}


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
    teacher = None if args.scratch_epochs else "baseline"
    members = [stages(args.member_pruning, args.member_sparsity, args.epochs, teacher, c, args.member_bits)
               for c in args.criteria.split(",")]
    if args.scratch_epochs:  # each member trained from its own initialisation first, on the labels alone
        members = [{"model": "mnist1d-cnn", "stages": m,
                    "train": trained("mnist1d-cnn", args.scratch_epochs, args.scratch_lr)["train"]} for m in members]
    ens = compress(task, [{"stage": "ensemble", "members": members,
                           "seeds": [100 * seed + i for i in range(len(members))]}], seed, args.noise)
    out = {f"ensemble of {len(members)} (average)": row(ens.report.final)}
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
    fits = {}
    for kind in KINDS:
        setting, size = calibrate(task, kind, budget)
        if size > budget:
            print(f"seed {seed}: no single model of {kind} fits in {budget:,} bytes", flush=True)
            continue
        fits[kind] = setting
        CHOSEN.setdefault(kind, []).append(label(kind, setting))
        print(f"seed {seed}: single model, {kind} {label(kind, setting)}: {size:,} <= {budget:,} bytes before "
              "fine-tuning", flush=True)
        single = compress(task, single_stages(kind, setting, args.epochs), seed, args.noise)
        out[f"single mnist1d-cnn, {KINDS[kind]}"] = row(single.report.final)
    # the same recipe on a model trained from scratch as a member is, and on a student distilled from
    # the ensemble with that training: the largest single recipe that fits (sharing alone where it does)
    kind = next(iter(fits))
    epochs = args.scratch_epochs or BUILTINS["mnist1d-cnn"].train.epochs
    lr = args.scratch_lr if args.scratch_epochs else BUILTINS["mnist1d-cnn"].train.lr
    if args.scratch_epochs:
        scratch = compress(task, [trained("mnist1d-cnn", epochs, lr)]
                           + single_stages(kind, fits[kind], args.epochs, None), 100 * seed + len(members), args.noise)
        out["single mnist1d-cnn trained from scratch as a member is, same recipe"] = row(scratch.report.final)
    student = compress(dataclasses.replace(task, teachers=members),
                       [trained("mnist1d-cnn", epochs, lr, "task")]
                       + single_stages(kind, fits[kind], args.epochs, "task"), seed, args.noise)
    out["student distilled from the ensemble, same recipe"] = row(student.report.final)
    out["baseline mnist1d-cnn (fp32)"] = row(single.report.baseline)
    print(f"seed {seed}: done {time.perf_counter() - t0:.0f}s", flush=True)
    for k, v in out.items():  # each seed as it finishes, so a long run shows its progress
        print(f"  seed {seed} | {k} | " + " | ".join(f"{c} {x:,}" if c == "bytes" else f"{c} {x:.4f}"
                                                      for c, x in v.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scratch-epochs", type=int, default=60, help="train each member from scratch (its own "
                                                                   "initialisation, no teacher) for this many epochs "
                                                                   "before compressing it; 0: copies of the baseline "
                                                                   "distilled from it")
    ap.add_argument("--scratch-lr", type=float, default=1e-2, help="the members' training learning rate (Adam, "
                                                                   "cosine, batches of 64); 1e-2 gives 0.954 on the "
                                                                   "validation split, the baseline's 3e-3 0.913")
    ap.add_argument("--member-pruning", choices=("channel", "unstructured"), default="unstructured",
                    help="how a member is pruned (channel: by its criterion; unstructured: global magnitude)")
    ap.add_argument("--member-sparsity", type=float, default=0.6, help="the fraction a member prunes (of each "
                                                                       "layer's channels, or of its weights); 0: none")
    ap.add_argument("--member-bits", type=int, default=4, help="a member's weight-sharing bits")
    ap.add_argument("--criteria", default="magnitude,magnitude,magnitude",
                    help="one channel criterion per member (their number is the ensemble's size)")
    ap.add_argument("--epochs", type=int, default=15, help="fine-tune epochs after pruning (every model; 2 more "
                                                           "after weight sharing)")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--device", default="cortex-m4", help="the first seed's ensemble as a C library for this "
                                                          "device (its flash, RAM, instructions); '' skips it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = [run_seed(seed, args) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    keys = [k for k in runs[0] if all(k in run for run in runs)]
    cols = list(runs[0][keys[0]])
    singles = [k for k in keys if k.startswith("single")]

    def best_single(run: dict) -> dict:  # the best single model of each seed (on clean test accuracy)
        return max((run[k] for k in singles), key=lambda r: r["clean"])

    head = ["model", ".ecz bytes", "accuracy"] + [c for c in cols if c not in ("bytes", "clean")] + \
        ["vs best single, clean", f"vs best single, noise {args.noise:g}"]
    noise_key = f"gaussian_noise={args.noise:g}"
    table = []
    for k in keys:
        r = [k, f"{statistics.mean(run[k]['bytes'] for run in runs):,.0f}", mean_sd([run[k]["clean"] for run in runs])]
        r += [mean_sd([run[k][c] for run in runs]) for c in cols if c not in ("bytes", "clean")]
        r += [mean_sd([run[k][c] - best_single(run)[c] for run in runs], 100, "+.2f") + " pt" for c in ("clean", noise_key)]
        table.append(r)
    origin = (f"mnist1d-cnn trained from scratch {args.scratch_epochs} epochs at lr {args.scratch_lr:g} each on the "
              "labels, then"
              if args.scratch_epochs else "copies of the baseline with")
    pruned = (f"{args.member_sparsity:.0%} {args.member_pruning} pruning ({args.criteria}), "
              if args.member_sparsity else "no pruning, ")
    chosen = "; ".join(f"{KINDS[k]} {', '.join(v)}" for k, v in CHOSEN.items())
    print(f"\nmnist1d-cnn, {args.seeds} seed(s), {(time.perf_counter() - t0) / 60:.0f} minutes; members: {origin} "
          f"{pruned}{args.member_bits}-bit weight sharing; single models of the same bytes: {chosen} (per seed); "
          f"fine-tuned {args.epochs} epochs after pruning + 2 after sharing, "
          f"{'on the labels' if args.scratch_epochs else 'with distillation'} (the baseline's single models with "
          "distillation from it); best single: the best single row of each seed (clean); "
          "test split (1,000), mean ± sd")
    print_table(head, table)


if __name__ == "__main__":
    main()
