"""What a search leaves behind: the Pareto front of the feasible trials, ``search.json`` and
``search.md``, ``pareto/trial-N.yaml`` (plain recipes ``edgecompress run`` reproduces), ``best.yaml``
and ``pareto.png``. Every number is the one the trial's ``compress`` measured."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .trial import TrialRecord

UNITS = {"bytes": "", "flash": "B", "ram": "B", "latency": "ms (estimate)", "energy": "uJ (estimate)", "macs": ""}


def _key(r: TrialRecord, objectives: list[str]) -> list[float]:
    """Values to minimise, in objective order (the metric negated)."""
    return [-r.values[o] if o == "metric" else r.values[o] for o in objectives]


def pareto_front(records: list[TrialRecord], objectives: list[str]) -> list[TrialRecord]:
    """The feasible trials no other feasible trial dominates, best metric first."""
    ok = [r for r in records if r.feasible and all(o in r.values for o in objectives)]
    keys = {r.number: _key(r, objectives) for r in ok}

    def dominated(a: TrialRecord) -> bool:
        ka = keys[a.number]
        return any(all(x <= y for x, y in zip(keys[b.number], ka)) and keys[b.number] != ka for b in ok)

    front = [r for r in ok if not dominated(r)]
    return sorted(front, key=lambda r: (_key(r, objectives), r.number))


def best_trial(records: list[TrialRecord], objectives: list[str]) -> TrialRecord | None:
    """The most accurate trial that meets every constraint (ties: cheaper, then earlier)."""
    ok = [r for r in records if r.feasible and "metric" in r.values]
    costs = [o for o in objectives if o != "metric"]
    return min(ok, key=lambda r: (-r.values["metric"], [r.values.get(o, 0.0) for o in costs], r.number), default=None)


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name == "metric":
        return f"{value:.4f}"
    if name in ("bytes", "flash", "ram", "macs"):
        return f"{int(value):,}"
    return f"{value:.3f}"


COLUMNS = ("metric", "bytes", "flash", "ram", "latency", "energy", "macs")


def summary(result) -> dict[str, Any]:
    """search.json: the study, counts by state and cut rule, the front, the best trial, every trial."""
    recs = result.trials
    states = Counter(r.state for r in recs)
    return {
        "schema_version": 1,
        "task": result.task_name,
        "study": result.study_name,
        "storage": result.storage,
        "objectives": result.objectives,
        "directions": ["maximize" if o == "metric" else "minimize" for o in result.objectives],
        "counts": {"trials": len(recs), "complete": states["complete"], "feasible": sum(r.feasible for r in recs),
                   "cut": states["cut"], "failed": states["failed"], "running": states["running"]},
        "cut_by_rule": {**dict.fromkeys(getattr(result, "rules", []), 0),
                        **Counter(r.rule for r in recs if r.state == "cut")},
        "front": [r.to_dict() for r in result.front],
        "best": result.best.to_dict() if result.best else None,
        "trials": [r.to_dict() for r in recs],
        "references": [{"recipe": name, "values": values} for name, values in result.references],
    }


def to_markdown(result) -> str:
    s = summary(result)
    name = result.front[0].metric_name if result.front else "metric"
    cols = [c for c in COLUMNS if any(c in r.values for r in result.trials)]
    head = ["trial"] + [name if c == "metric" else f"{c} {UNITS[c]}".strip() for c in cols] + ["recipe"]
    out = [f"# edgecompress search: {s['task']}", "",
           f"Study `{s['study']}`, objectives {', '.join(s['objectives'])}; {s['counts']['trials']} trials: "
           f"{s['counts']['complete']} complete ({s['counts']['feasible']} feasible), {s['counts']['cut']} cut, "
           f"{s['counts']['failed']} failed.", "", "## Pareto front (feasible trials)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.front:
        out.append("| " + " | ".join([str(r.number)] + [_fmt(c, r.values.get(c)) for c in cols]
                                     + [f"pareto/trial-{r.number}.yaml"]) + " |")
    if result.best:
        b = result.best
        out += ["", f"Best (most accurate meeting every constraint): trial {b.number}, {name} "
                    f"{b.values['metric']:.4f}; `edgecompress run best.yaml` reproduces it."]
    cut = [r for r in result.trials if r.state in ("cut", "failed")]
    if cut:
        out += ["", "## Trials cut or failed", "", "| trial | state | rule | reason |", "|---|---|---|---|"]
        out += [f"| {r.number} | {r.state} | {r.rule} | {r.reason.replace('|', '/')} |" for r in cut]
    rules = ", ".join(f"{k}: {v}" for k, v in s["cut_by_rule"].items())
    if rules:
        out += ["", f"Cut by rule: {rules}."]
    missed = [r for r in result.trials if r.state == "complete" and r.violations]
    if missed:
        out += ["", "## Complete but infeasible", ""] + [f"- trial {r.number}: {r.violations[0]}" for r in missed]
    return "\n".join(out) + "\n"


def recipe_yaml(r: TrialRecord, header: str) -> str:
    return header + yaml.safe_dump(r.recipe, sort_keys=False)


def plot(result, path: Path, references: list[tuple[str, dict[str, float]]] = ()) -> Path | None:
    """pareto.png: the metric against the first cost objective, every complete trial, the front
    highlighted, and reference points (hand recipes) when given; None when there is nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..report.html import NoFigure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    try:
        _draw_front(fig, result, references)
    except NoFigure:
        return None
    done = sum(1 for r in result.trials if r.state == "complete" and "metric" in r.values)
    fig.axes[0].set_title(f"{result.task_name}: {done} trials, front of {len(result.front)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _draw_front(fig, result, references) -> None:
    from ..report.html import NoFigure

    costs = [o for o in result.objectives if o != "metric"]
    done = [r for r in result.trials if r.state == "complete" and "metric" in r.values]
    if not costs or not done:
        raise NoFigure("No complete trial with a metric and a cost to draw yet.")
    x = costs[0]
    ax = fig.add_subplot()
    ok, bad = [r for r in done if r.feasible], [r for r in done if not r.feasible]
    ax.scatter([r.values[x] for r in ok], [r.values["metric"] for r in ok], c="#9aa", s=18, label="feasible trial")
    if bad:
        ax.scatter([r.values[x] for r in bad], [r.values["metric"] for r in bad], c="#bbb", s=14, marker="x",
                   label="misses a constraint")
    front = sorted(result.front, key=lambda r: r.values[x])
    if front:
        ax.plot([r.values[x] for r in front], [r.values["metric"] for r in front], "o-", c="#c33", ms=5,
                label="Pareto front")
        for r in front:
            ax.annotate(str(r.number), (r.values[x], r.values["metric"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for label, values in references:
        if x in values and "metric" in values:
            ax.scatter([values[x]], [values["metric"]], marker="*", s=80, c="#36c")
            ax.annotate(label, (values[x], values["metric"]), fontsize=7, xytext=(4, -9), textcoords="offset points")
    ax.set_xlabel(f"{x} {UNITS.get(x, '')}".strip())
    ax.set_ylabel(done[0].metric_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _draw_over_time(fig, result) -> None:
    from matplotlib.ticker import MaxNLocator

    from ..report.html import NoFigure

    done = [r for r in sorted(result.trials, key=lambda r: r.number) if r.state == "complete" and "metric" in r.values]
    if not done:
        raise NoFigure("No complete trial yet.")
    ax = fig.add_subplot()
    ax.scatter([r.number for r in done], [r.values["metric"] for r in done], c=["#c33" if r.feasible else "#bbb"
                                                                                for r in done], s=16)
    best, line = float("-inf"), []
    for r in done:
        if r.feasible:
            best = max(best, r.values["metric"])
        line.append(best if best > float("-inf") else None)
    xs = [r.number for r, b in zip(done, line) if b is not None]
    ax.step(xs, [b for b in line if b is not None], where="post", c="#333", lw=1, label="best feasible so far")
    for r in result.trials:
        if r.state in ("cut", "failed"):
            ax.axvline(r.number, c="#eee", lw=3, zorder=0)
    ax.set_xlabel("trial (grey bands: cut or failed)")
    ax.set_ylabel(done[0].metric_name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def to_html(result, references: list[tuple[str, dict[str, float]]] = ()) -> str:
    """search.html: one self-contained page with the Pareto front, the trials over time and the tables."""
    from ..report.html import CSS, esc, figure

    s = summary(result)
    c = s["counts"]
    cols = [k for k in COLUMNS if any(k in r.values for r in result.trials)]

    def rows(records, extra):
        return "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in [r.number, *(_fmt(k, r.values.get(k))
                                                                           for k in cols), *extra(r)]) + "</tr>"
                       for r in records)

    head = "".join(f"<th>{esc(k)}</th>" for k in ["trial", *cols])
    front = (f'<table><tr>{head}<th>recipe</th></tr>'
             + rows(result.front, lambda r: [f"pareto/trial-{r.number}.yaml"]) + "</table>")
    stopped = [r for r in result.trials if r.state in ("cut", "failed")]
    cut = ("<table><tr><th>trial</th><th>state</th><th>rule</th><th>reason</th></tr>"
           + "".join(f"<tr><td>{r.number}</td><td>{esc(r.state)}</td><td>{esc(r.rule)}</td><td>{esc(r.reason)}</td></tr>"
                     for r in stopped) + "</table>") if stopped else "<p>None.</p>"
    best = (f"<p>Best (most accurate meeting every constraint): trial {result.best.number}; "
            f"<code>edgecompress run best.yaml</code> reproduces it.</p>") if result.best else ""
    body = [f"<h1>edgecompress search: {esc(s['task'])}</h1>",
            f'<p class="lede">Study {esc(s["study"])}, objectives {esc(", ".join(s["objectives"]))}: '
            f"{c['trials']} trials, {c['complete']} complete ({c['feasible']} feasible), {c['cut']} cut, "
            f"{c['failed']} failed. Every number is the one the trial's run measured.</p>", best,
            "<h2 id=\"front\">Pareto front</h2>",
            figure("Metric against the first cost objective; the front in red", _draw_front, result, references,
                   size=(5.6, 3.6)), front,
            "<h2 id=\"time\">Trials over time</h2>",
            figure("Each complete trial's metric and the best feasible so far", _draw_over_time, result),
            "<h2 id=\"cut\">Trials cut or failed</h2>", cut]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>edgecompress search: {esc(s['task'])}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def write(result, out: Path, references: list[tuple[str, dict[str, float]]] = ()) -> list[Path]:
    """Write every result file into a staging folder, then move them into ``out`` (nothing partial)."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".search.", dir=out))
    try:
        (stage / "search.json").write_text(json.dumps(summary(result), indent=2) + "\n")
        (stage / "search.md").write_text(to_markdown(result))
        (stage / "search.html").write_text(to_html(result, references), encoding="utf-8")
        (stage / "pareto").mkdir()
        for r in result.front:
            head = (f"# trial {r.number} of study {result.study_name!r} (Pareto front): "
                    + ", ".join(f"{o} {_fmt(o, r.values.get(o))}" for o in result.objectives)
                    + f"\n# edgecompress run pareto/trial-{r.number}.yaml reproduces it\n")
            (stage / "pareto" / f"trial-{r.number}.yaml").write_text(recipe_yaml(r, head))
        if result.best:
            b = result.best
            head = (f"# trial {b.number} of study {result.study_name!r}: the most accurate trial meeting every "
                    f"constraint ({b.metric_name} {b.values['metric']:.4f})\n")
            (stage / "best.yaml").write_text(recipe_yaml(b, head))
        plot(result, stage / "pareto.png", references)
        for name in ("pareto.png", "best.yaml"):
            if not (stage / name).exists() and (out / name).exists():
                (out / name).unlink()
        written = []
        for item in stage.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
            written.append(target)
        return sorted(written)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
