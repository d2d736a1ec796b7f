"""Low-rank decomposition and knowledge distillation, measured in one run, one table.

    python -m bench.lowrank_distill [--epochs 60] [--seeds 3]

Low rank (through ``ec.compress``, so every number is the pipeline's own measurement): SVD on
digits-lenet300 under a 0.3 parameter budget; Tucker-2 and CP on the conv layers of digits-lenet5 and
mnist1d-cnn under a MAC budget, with ONNX Runtime latency (1 thread, median, round-robin against
the original in the same loop); the fixed-rank manifold fine-tune against plain factor fine-tune at
the same rank and epochs.

Distillation on mnist1d-cnn: the zoo student ``mnist1d-cnn-tiny`` (2,842 parameters, 0.09 of the
teacher) trained from scratch by the ``distill`` stage with the same epochs and seeds, without a
teacher (alpha 0), from the baseline teacher, from an ensemble of three teachers (the baseline and two
more trained with other seeds, cached as safetensors), with feature hints on top of the logits, and
with the logits term on teacher-labelled mixup batches.
Accuracy is on the held-out test split; mean and sample standard deviation over the seeds.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

import edgecompress as ec
from edgecompress.task import evaluate
from edgecompress.zoo import builtin_task, cache_dir

from ._models import cached
from ._table import mean_sd, print_table


def linear_macs(model: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def factored_weights(model: nn.Module, names) -> int:
    return sum(p.numel() for n in names for k, p in model.get_submodule(n).named_parameters() if k.endswith("weight"))


def lowrank_row(task, stage: dict, label: str, check) -> dict:
    recipe = ec.Recipe.from_dict({"stages": [stage], "measure": {"repeats": 200}})
    t0 = time.perf_counter()
    r = ec.compress(task, recipe)
    base, final = r.report.baseline, r.report.final
    touched = list(r.report.rows[-1].touched)
    w_before = factored_weights(task.model, touched)
    w_after = factored_weights(r.model, touched)
    conv_before, conv_after = base.macs - linear_macs(task.model), final.macs - linear_macs(task.model)
    drop = 100 * (base.metric - final.metric)
    row = {"experiment": label, "task": task.name, "metric": f"{base.metric:.4f} -> {final.metric:.4f}",
           "change": f"{-drop:+.2f} pt", "weights": f"{w_before:,} -> {w_after:,} ({w_before / max(w_after, 1):.2f}x)",
           "macs": (f"conv {conv_before:,} -> {conv_after:,} ({conv_before / max(conv_after, 1):.2f}x)"
                    if stage["method"] != "svd" else f"{base.macs:,} -> {final.macs:,} ({base.macs / final.macs:.2f}x)"),
           "latency": " / ".join(f"{base.latency_ms[k]:.3f}->{final.latency_ms[k]:.3f}" for k in sorted(base.latency_ms)),
           "time": f"{time.perf_counter() - t0:.0f}s"}
    row["check"] = check(w_before / max(w_after, 1), conv_before / max(conv_after, 1), drop)
    return row


def extra_teacher(task, seed: int) -> Path:
    """An mnist1d-cnn teacher trained like the baseline but from another seed (cached)."""
    path = cache_dir() / "bench" / f"{task.name}-teacher-seed{seed}.safetensors"
    cached(task.name, seed, path, lambda: task.train_data, task.loss)
    return path


def student_run(job: tuple[str, dict, int]) -> tuple[str, int, float]:
    """One student trained by the distill stage (run in a worker process)."""
    label, train, seed = job
    torch.set_num_threads(1)
    task = builtin_task("mnist1d-cnn")
    stage = {"stage": "distill", "student": "mnist1d-cnn-tiny", "train": train}
    r = ec.compress(task, ec.Recipe.from_dict({"stages": [stage], "seed": seed, "measure": {"latency": False}}))
    return label, seed, r.report.final.metric


def table(rows: list[dict], cols: list[str]) -> None:
    """Print ``rows`` (one dict a row) as a table of the columns ``cols``."""
    print_table(cols, [[r.get(c, "") for c in cols] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=80, help="student training epochs (distillation)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2, help="student learning rate")
    ap.add_argument("--workers", type=int, default=2, help="student trainings run in parallel processes")
    ap.add_argument("--skip-distill", action="store_true")
    ap.add_argument("--skip-lowrank", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []
    lenet300, lenet5, m1d = (builtin_task(n) for n in ("digits-lenet300", "digits-lenet5", "mnist1d-cnn"))
    if not args.skip_lowrank:
        ok3 = lambda w, c, d: "ok" if w >= 3 and d <= 0.5 else "MISSED (>=3x weights, <=0.5 pt)"  # noqa: E731
        ok2 = lambda w, c, d: "ok" if c >= 2 and d <= 1.0 else "MISSED (>=2x conv MACs, <=1 pt)"  # noqa: E731
        info = lambda w, c, d: ""  # noqa: E731
        ft = {"epochs": 5, "lr": 1e-3}
        rows.append(lowrank_row(lenet300, {"stage": "lowrank", "method": "svd", "param_budget": 0.3, "finetune": ft},
                                "svd, param budget 0.3", ok3))
        for method in ("tucker2", "cp"):
            rows.append(lowrank_row(lenet5, {"stage": "lowrank", "method": method, "mac_budget": 0.4,
                                             "finetune": ft}, f"{method}, MAC budget 0.4", ok2))
        ft10 = {"epochs": 10, "lr": 1e-3}
        rows.append(lowrank_row(m1d, {"stage": "lowrank", "method": "tucker2", "mac_budget": 0.45, "finetune": ft10},
                                "tucker2, MAC budget 0.45", ok2))
        rows.append(lowrank_row(m1d, {"stage": "lowrank", "method": "cp", "mac_budget": 0.45, "exclude": ["conv1"],
                                      "finetune": ft10}, "cp, MAC budget 0.45 (conv2, conv3)", ok2))
        for on in ("factors", "manifold"):
            rows.append(lowrank_row(lenet300, {"stage": "lowrank", "method": "svd", "param_budget": 0.05,
                                               "finetune_on": on, "finetune": {"epochs": 3, "lr": 1e-3}},
                                    f"svd, param budget 0.05, fine-tune on {on}", info))
        for on in ("factors", "manifold"):
            rows.append(lowrank_row(m1d, {"stage": "lowrank", "method": "tucker2", "mac_budget": 0.25,
                                          "finetune_on": on, "finetune": {"epochs": 5, "lr": 1e-3}},
                                    f"tucker2, MAC budget 0.25, fine-tune on {on}", info))
        table(rows, ["experiment", "task", "metric", "change", "weights", "macs", "latency", "check", "time"])
        print("latency: ONNX Runtime ms at batch 1 / batch 64, baseline -> factored, 1 thread, median of 200")
        print(flush=True)
    if args.skip_distill:
        return
    drows: list[dict] = []
    t0 = time.perf_counter()
    teachers = ["baseline", str(extra_teacher(m1d, 1)), str(extra_teacher(m1d, 2))]
    from edgecompress.spec import Distill
    from edgecompress.techniques.distill import load_teachers

    for i, t in enumerate(load_teachers(Distill(teacher=teachers), m1d, "bench")):
        drows.append({"experiment": f"teacher {i} ({Path(t.label).name})", "params": "31,498",
                      "accuracy": f"{evaluate(t.module, m1d):.4f}"})
    train = {"epochs": args.epochs, "lr": args.lr, "batch_size": 64}
    configs = [
        ("student alone (alpha 0)", {"alpha": 0}),
        ("student + KD from the baseline", {}),
        ("student + KD from 3 teachers (ensemble)", {"teacher": teachers}),
        ("student + KD + feature hints conv2, conv3", {"features": ["conv2", "conv3"]}),
        ("student alone on mixup batches (alpha 0)", {"alpha": 0, "mixup": 1.0}),
        ("student + KD on mixup batches", {"mixup": 1.0}),
    ]
    jobs = [(label, {**train, "distill": d}, seed) for label, d in configs for seed in range(args.seeds)]
    results: dict[str, list[float]] = {label: [0.0] * args.seeds for label, _ in configs}
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for label, seed, acc in pool.map(student_run, jobs):
            results[label][seed] = acc
    for label, _ in configs:
        accs = results[label]
        drows.append({"experiment": label, "params": "2,842", "accuracy": mean_sd(accs),
                      "seeds": ", ".join(f"{a:.3f}" for a in accs)})
    plain = statistics.mean(results[configs[0][0]])
    for r in drows[3:]:
        mean = float(r["accuracy"].split(" ")[0])
        r["vs alone"] = f"{100 * (mean - plain):+.2f} pt"
    table(drows, ["experiment", "params", "accuracy", "vs alone", "seeds"])
    print(f"mnist1d-cnn, {args.epochs} epochs per student at lr {args.lr:g}, seeds 0..{args.seeds - 1}, "
          f"accuracy mean ± sample std on the 1,000 test examples ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
