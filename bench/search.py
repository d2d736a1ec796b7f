"""Automated search against the hand recipes, samplers against random sampling, two workers against one.

    python -m bench.search [--trials 60] [--seeds 3] [--parts budgets,samplers,scale,rl] [--out bench-search]
                           [--samplers random,tpe,nsga2,gp] [--epochs N] [--timeout S] [--start] [--replay 3]
                           [--max-bytes 5120]

budgets   mnist1d-cnn on cortex-m4 under max_flash 8, 16 and 32 KiB (max_ram 8 KiB): the space of
          recipes/search-mnist1d-m4.yaml with that flash budget and no max_metric_drop (the device
          budget alone decides, as for the hand recipes), --trials TPE trials (--timeout seconds at
          most), against every hand recipe in recipes/ for mnist1d-cnn and distill-tiny followed by
          static int8, each run through compress with device cortex-m4 (flash of the C library,
          planned RAM) and measured the same way. The search's best and the best hand recipe that
          fits are then run again with --replay training seeds, and the mean printed. With --start
          each search first runs the hand recipes that fit its budget and lie in its space.
samplers  hypervolume of the feasible (accuracy, flash) points (flash and RAM within budget; no
          max_metric_drop), reference (accuracy 0, flash = the 16 KiB budget), of TPE, NSGA-II, GP
          and random sampling (--samplers) with the same trials, mean of --seeds.
scale     trials per hour of one worker against two on one PostgreSQL study (one torch thread each),
          the same space and trial count (random sampling, whose trials follow from their numbers),
          and whether both reach the same Pareto front.
rl        sampler rl (the AMC-style agent) against TPE and random sampling on a per-layer space
          (PER_LAYER below: mnist1d-cnn, one channel-pruning ratio per conv layer, 3-epoch fine-tune,
          4-bit static quantization), --trials trials each, mean of --seeds: the best feasible
          accuracy under --max-bytes bytes of .ecz and the hypervolume of the feasible (accuracy,
          bytes) points, reference (accuracy 0, bytes = the budget). One torch thread. Not in the
          default --parts.

--epochs caps every trial's fine-tune (the recipe's search.epochs, 30) for a quicker, rougher run;
the short run the pruner scores is then half of it (at least 1 epoch).

Every number is measured in this run; nothing is read from an earlier one.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

import edgecompress as ec

from ._table import print_table
from ._timing import threads

ROOT = Path(__file__).parents[1]
SPACE = ROOT / "recipes" / "search-mnist1d-m4.yaml"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def space(flash: int, trials: int, sampler: str = "tpe", seed: int = 0, epochs: int | None = None,
          timeout: float | None = None, max_drop: bool = True) -> dict:
    """The space of recipes/search-mnist1d-m4.yaml under ``flash`` bytes, ``trials`` trials and
    ``timeout`` seconds (None: no time limit); ``max_drop`` False leaves out its max_metric_drop, so
    that only the device budget decides what is feasible."""
    d = yaml.safe_load(SPACE.read_text())
    d["constraints"]["max_flash"] = flash
    if not max_drop:
        d["constraints"].pop("max_metric_drop")
    d["search"].update(trials=trials, sampler=sampler, seed=seed, timeout=timeout)
    if epochs is not None:
        d["search"].update(epochs=epochs, short_epochs=min(d["search"]["short_epochs"], max(1, epochs // 2)))
    if timeout is None:
        d["search"].pop("timeout")
    d["export"] = ["onnx"]
    return d


def hand_recipes() -> list[tuple[str, dict]]:
    """Every shipped recipe for mnist1d-cnn (not a search), and distill-tiny + static int8."""
    out = []
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        if d.get("task") == "mnist1d-cnn" and "search" not in d:
            out.append((p.name, d))
    tiny = yaml.safe_load((ROOT / "recipes" / "distill-tiny.yaml").read_text())
    tiny["stages"].append({"stage": "quantize", "mode": "static", "bits": 8, "reduce_range": False,
                           "keep_slow_float": False})
    out.append(("distill-tiny.yaml + int8", tiny))
    return out


def run_hand(name: str, d: dict, task, seed: int | None = None) -> dict[str, float]:
    """``d`` run on cortex-m4 with no constraints (with training seed ``seed``: its own when None)."""
    d = copy.deepcopy(d)
    d.update(device="cortex-m4", constraints={}, measure={"latency": False}, export=["onnx"])
    if seed is not None:
        d["seed"] = seed
    rep = ec.compress(task, ec.Recipe.from_dict(d, source=name)).report
    dev = rep.rows[-1].device
    return {"metric": rep.final.metric, "flash": dev.flash_bytes, "ram": dev.ram_bytes}


def hypervolume(points: list[tuple[float, float]], ref_flash: float) -> float:
    """Area dominated by (accuracy up, flash down) points, bounded by accuracy 0 and flash = ref_flash."""
    pts = sorted((f, a) for a, f in points if f <= ref_flash)
    area, best = 0.0, 0.0
    for i, (f, a) in enumerate(pts):
        best = max(best, a)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref_flash
        area += best * (nxt - f)
    return area


@contextlib.contextmanager
def postgres():
    """A throw-away PostgreSQL 15 server on a free port (as the postgres user when run as root)."""
    if not (PG_BIN / "initdb").is_file():
        raise RuntimeError(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing)")
    folder = Path(tempfile.mkdtemp(prefix="edgecompress-pg-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"

    def pg(*args: str) -> None:
        subprocess.run(as_user + list(args), check=True, capture_output=True, timeout=120, cwd=folder)

    pg(str(PG_BIN / "initdb"), "-D", str(data), "-U", "edgecompress", "--auth=trust", "-E", "UTF8")
    pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
       f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        yield f"postgresql://edgecompress@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


PER_LAYER = """
version: 1
task: mnist1d-cnn
seed: 0
stages:
  - stage: prune
    granularity: channel
    criterion: magnitude
    norm: 2
    scope: layer
    per_layer: true                   # conv1, conv2, conv3 (fc, the classifier, stays whole)
    sparsity: {range: [0.05, 0.85]}
    finetune: {epochs: 3, lr: 0.002}
  - stage: quantize
    mode: static
    bits: 4
    reduce_range: false
    keep_slow_float: false
measure: {latency: false}
export: [onnx]
search: {objectives: [metric, bytes], short_epochs: 0, pruner: none}
"""


def per_layer_space(trials: int, sampler: str, seed: int, max_bytes: int) -> dict:
    d = yaml.safe_load(PER_LAYER)
    d["constraints"] = {"max_bytes": max_bytes}
    d["search"].update(trials=trials, sampler=sampler, seed=seed)
    return d


def rl(args, task) -> None:
    rows = []
    with threads(1):
        for sampler in args.rl_samplers.split(","):
            bests, hvs, secs, counts = [], [], [], []
            for seed in range(args.seeds):
                t0 = time.time()
                res = ec.search(task, per_layer_space(args.trials, sampler, seed, args.max_bytes),
                                out=Path(args.out) / f"per-layer-{sampler}-{seed}", study=f"per-layer-{sampler}-{seed}")
                secs.append(time.time() - t0)
                ok = [r for r in res.trials if r.feasible]
                bests.append(max((r.values["metric"] for r in ok), default=0.0))
                hvs.append(hypervolume([(r.values["metric"], r.values["bytes"]) for r in ok], args.max_bytes))
                counts.append(f"{len(ok)}/{len(res.trials)}")
                print(f"{sampler} seed {seed}: best feasible {bests[-1]:.4f}, hypervolume {hvs[-1]:.1f}, "
                      f"feasible {counts[-1]}, {secs[-1] / 60:.1f} min", flush=True)
            rows.append([sampler, f"{statistics.mean(bests):.4f}", " / ".join(f"{b:.4f}" for b in bests),
                         f"{statistics.mean(hvs):.1f}", " / ".join(f"{h:.1f}" for h in hvs), " / ".join(counts),
                         f"{statistics.mean(secs) / 60:.1f}"])
    print(f"\n### Per-layer channel pruning of mnist1d-cnn under {args.max_bytes:,} bytes of .ecz, {args.trials} "
          f"trials, {args.seeds} seed(s)\n")
    print_table(["sampler", "mean best feasible accuracy", "per seed", "mean hypervolume (accuracy x bytes)",
                 "per seed", "feasible/trials per seed", "minutes per search"], rows)


def replayed(name: str, d: dict, task, first: float, seeds: int) -> str:
    """Mean accuracy of ``d`` over training seeds 0..seeds-1 (``first``: its seed-0 accuracy, already
    measured): the search's best is the maximum of many noisy trials, so its seed-0 accuracy is biased
    upwards; a replay at other seeds shows what part of a gap is the recipe and what part the draw."""
    accs = [first] + [run_hand(name, d, task, seed)["metric"] for seed in range(1, seeds)]
    return f"{statistics.mean(accs):.4f} ({' / '.join(f'{a:.3f}' for a in accs)})"


def starts(d: dict, names: list[str]) -> list[str]:
    """The hand recipes among ``names`` that the space ``d`` can run as they are (search.start)."""
    from edgecompress.search import Space

    out = []
    for name in names:
        path = ROOT / "recipes" / name
        if path.is_file():
            with contextlib.suppress(ec.RecipeError):
                Space.from_dict({**d, "search": {**d["search"], "start": [str(path)]}})
                out.append(str(path))
    return out


def budgets(args, task) -> None:
    recipes = hand_recipes()
    hands = [(name, run_hand(name, d, task)) for name, d in recipes]
    rows = []
    for kib in (8, 16, 32):
        flash = kib * 1024
        fits = [(n, v) for n, v in hands if v["flash"] <= flash and v["ram"] <= 8192]
        d = space(flash, args.trials, epochs=args.epochs, timeout=args.timeout, max_drop=False)
        if args.start:
            d["search"]["start"] = starts(d, [n for n, _ in fits])
            names = ", ".join(Path(p).name for p in d["search"]["start"]) or "nothing"
            print(f"{kib} KiB: the search starts from {names}", flush=True)
        t0 = time.time()
        res = ec.search(task, d, out=Path(args.out) / f"budget-{kib}k", study=f"budget-{kib}k")
        secs = time.time() - t0
        name, hv = max(fits, key=lambda x: x[1]["metric"]) if fits else ("none fits", None)
        b = res.best
        cut = sum(r.state == "cut" for r in res.trials)
        again = "-"
        if b and hv and args.replay > 1:
            again = (f"search {replayed('best', b.recipe, task, b.values['metric'], args.replay)}, "
                     f"{name} {replayed(name, dict(recipes)[name], task, hv['metric'], args.replay)}")
        rows.append([f"{kib} KiB", f"{len(res.trials)} ({cut} cut), {secs / 60:.1f} min",
                     f"{b.values['metric']:.4f} / {b.values['flash']:,.0f} B (trial {b.number})" if b else "no feasible trial",
                     f"{name}: {hv['metric']:.4f} / {hv['flash']:,} B" if hv else name,
                     f"{(b.values['metric'] - hv['metric']) * 100:+.2f} pt" if b and hv else "-", again])
    print("\n### Search against hand recipes (mnist1d-cnn, cortex-m4, max_ram 8 KiB)\n")
    print_table(["max_flash", "trials", "search best: accuracy / flash", "best hand recipe that fits", "gap",
                 f"mean accuracy over training seeds 0-{args.replay - 1}"], rows)
    print("\nHand recipes on cortex-m4 (all measured in this run):\n")
    print_table(["recipe", "accuracy", "flash B", "RAM B"],
                [[n, f"{v['metric']:.4f}", f"{v['flash']:,}", f"{v['ram']:,}"] for n, v in hands])


def samplers(args, task) -> None:
    flash = 16 * 1024
    rows = []
    for sampler in args.samplers.split(","):
        hvs, secs, counts = [], [], []
        for seed in range(args.seeds):
            t0 = time.time()
            res = ec.search(task, space(flash, args.trials, sampler, seed, args.epochs, max_drop=False),
                            out=Path(args.out) / f"{sampler}-{seed}", study=f"{sampler}-{seed}")
            secs.append(time.time() - t0)
            hvs.append(hypervolume([(r.values["metric"], r.values["flash"]) for r in res.trials if r.feasible], flash))
            counts.append(f"{sum(r.feasible for r in res.trials)}/{sum(r.state == 'cut' for r in res.trials)}")
        rows.append([sampler, f"{statistics.mean(hvs):.1f}", " / ".join(f"{h:.1f}" for h in hvs),
                     " / ".join(counts), f"{statistics.mean(secs) / 60:.1f}"])
    cap = f", fine-tunes capped at {args.epochs} epoch(s)" if args.epochs is not None else ""
    print(f"\n### Hypervolume of accuracy vs flash (<= 16 KiB), {args.trials} trials, {args.seeds} seed(s){cap}\n")
    print_table(["sampler", "mean hypervolume", "per seed", "feasible/cut per seed", "minutes per search"], rows)


def scale(args, task) -> None:
    rows, fronts = [], {}
    with postgres() as url:
        for workers in (1, 2):
            t0 = time.time()
            res = ec.search("mnist1d-cnn", space(16 * 1024, args.trials, "random", 0, args.epochs, max_drop=False),
                            out=Path(args.out) / f"w{workers}",
                            storage=url, study=f"workers-{workers}", workers=workers)
            secs = time.time() - t0
            done = sum(r.state != "running" for r in res.trials)
            fronts[workers] = [(r.number, round(r.values["metric"], 4), r.values["flash"]) for r in res.front]
            rows.append([str(workers), str(done), f"{secs:.0f}", f"{done / secs * 3600:.1f}",
                         ", ".join(f"#{n} {m:.4f} / {f:,.0f} B" for n, m, f in fronts[workers])])
    print("\n### Workers on one PostgreSQL study (one torch thread each)\n")
    print_table(["workers", "trials", "seconds", "trials per hour", "front: trial, accuracy / flash"], rows)
    print(f"\nspeed-up {float(rows[1][3]) / float(rows[0][3]):.2f}x; the same front: {fronts[1] == fronts[2]} "
          "(random sampling draws each trial's values from its number, so both studies hold the same trials)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parts", default="budgets,samplers,scale")
    ap.add_argument("--out", default="bench-search")
    ap.add_argument("--samplers", default="random,tpe,nsga2,gp")
    ap.add_argument("--epochs", type=int, default=None, help="cap every trial's fine-tune at this many epochs")
    ap.add_argument("--timeout", type=float, default=None, help="budgets: stop each search after this many seconds "
                    "(the trials finished by then count)")
    ap.add_argument("--start", action="store_true", help="budgets: start each search from the hand recipes that fit "
                    "its budget and lie in its space (search.start)")
    ap.add_argument("--replay", type=int, default=3, help="budgets: run the search's best and the best hand recipe "
                    "with this many training seeds (1: no replay)")
    ap.add_argument("--max-bytes", type=int, default=5120, help="rl: the budget on the .ecz file's bytes")
    ap.add_argument("--rl-samplers", default="rl,tpe,random", help="rl: the samplers compared")
    args = ap.parse_args()
    import torch

    from edgecompress.zoo import builtin_task

    torch.set_num_threads(1)  # one torch thread per search, as each worker has in ``scale``

    task = builtin_task("mnist1d-cnn")
    for part in args.parts.split(","):
        {"budgets": budgets, "samplers": samplers, "scale": scale, "rl": rl}[part](args, task)


if __name__ == "__main__":
    main()
