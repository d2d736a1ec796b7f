"""Mixed precision against uniform 5 bits on mnist1d-cnn, over training seeds and calibration sets.

    python -m bench.mixed_precision [--seeds 0,1,2,3,4,5] [--calib val,val[:256],train[0:400],train[1000:1400]]
                                    [--no-bias-correction]

Seed 0 is the built-in baseline; other seeds train the same network with the built-in recipe and that
seed (cached beside the baselines). For each seed and calibration set, ``quantize`` runs in static
mode twice with the same options: ``bits: 5`` and ``bits: auto, budget_bits: 5.0``. Accuracy and the
KL divergence from the float model's softmax are measured on the held-out test split (1,000 samples:
0.1 point is one sample); the calibration set is what both runs calibrate on and what ``bits: auto``
chooses on.
"""
from __future__ import annotations

import argparse
import copy
import re

import torch
from torch.nn import functional as F

from edgecompress.context import Context
from edgecompress.task import Task, evaluate
from edgecompress.techniques.quantize import QuantizeSpec, apply
from edgecompress.zoo import BUILTINS, cache_dir, load_task

from ._models import cached, loader, tensors
from ._table import print_table

NAME = "mnist1d-cnn"


def _model(seed: int, base: Task) -> torch.nn.Module:
    if seed == 0:
        return base.model
    path = cache_dir() / "bench" / f"{NAME}-seed{seed}.safetensors"
    return cached(NAME, seed, path, lambda: loader(*BUILTINS[NAME].data()[0]), F.cross_entropy)


def _calib(name: str, base: Task) -> tuple[torch.Tensor, torch.Tensor]:
    m = re.fullmatch(r"(val|train)(?:\[(\d*):(\d*)\])?", name)
    if m is None:
        raise SystemExit(f"--calib must name val or train with an optional [a:b] slice; got {name}")
    x, y = tensors(base.val_data if m[1] == "val" else base.train_data)
    a = int(m[2]) if m[2] else 0
    b = int(m[3]) if m[3] else len(x)
    return x[a:b], y[a:b]


def _kl(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--calib", default="val,val[:256],train[0:400],train[1000:1400]")
    ap.add_argument("--no-bias-correction", action="store_true")
    args = ap.parse_args()
    base = load_task(NAME)
    tx, _ = tensors(base.eval_data)
    bc = not args.no_bias_correction
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        model = _model(seed, base)
        ref = model(tx).detach()
        for cname in args.calib.split(","):
            task = Task(model=model, train_data=base.train_data, val_data=_calib(cname, base),
                        eval_data=base.eval_data, metric="accuracy", name=NAME)
            got = {}
            for label, kw in (("uniform", {"bits": 5}), ("mixed", {"bits": "auto", "budget_bits": 5.0})):
                ctx = Context(task=task, seed=0, where="bench")
                q = apply(copy.deepcopy(model), QuantizeSpec(mode="static", bias_correction=bc, **kw), ctx)
                note = next((n for n in ctx.log.notes if n.startswith("bits: auto chose")), "")
                chose = note[len("bits: auto chose "):].split(";")[0]
                avg = re.search(r"average ([\d.]+)", note)
                got[label] = (evaluate(q, task), _kl(q(tx).detach(), ref), chose, avg[1] if avg else "5.000")
            (ua, uk, _, _), (ma, mk, chose, avg) = got["uniform"], got["mixed"]
            rows.append([str(seed), cname, f"{evaluate(model, task):.3f}", f"{ua:.3f}", f"{ma:.3f}",
                         f"{(ma - ua) * 100:+.1f}", f"{uk:.4f}", f"{mk:.4f}", avg, chose])
            print(" | ".join(rows[-1]), flush=True)
    head = ["seed", "calibration", "fp32", "uniform W5A8", "mixed <=5", "diff (points)", "KL uniform",
            "KL mixed", "avg bits", "mixed chose"]
    print(f"\nmnist1d-cnn, static, act 8 bits, bias_correction {bc}; test split (1,000 samples)\n")
    print_table(head, rows)
    chosen = [r for r in rows if r[8] != "5.000"]
    wins = sum(float(r[5]) > 0 for r in rows)
    losses = sum(float(r[5]) < 0 for r in rows)
    print(f"\nmixed left uniform in {len(chosen)} of {len(rows)} runs; accuracy: {wins} better, {losses} worse, "
          f"{len(rows) - wins - losses} equal; KL lower in {sum(float(r[7]) < float(r[6]) for r in rows)}")


if __name__ == "__main__":
    main()
