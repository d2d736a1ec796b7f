"""What `edgecompress run` produces for each recipe, written down so a refactor can be checked
against it: per report row the metric, bytes, flash, RAM and instruction count, and the SHA-256 of
every exported file. Latency is left out (it is a timing, not an output).

    python -m bench.snapshot -o before.json                 # every recipe but the searches
    python -m bench.snapshot -o after.json --compare before.json

Run both with the same warm EDGECOMPRESS_CACHE so both start from the same baselines.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TIMED = ("latency", "time", "seconds", "_ms", "_s")
REPORTS = {"report.json", "report.md", "report.html"}  # hold latencies, compared through their rows


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in TIMED)}


def snapshot(recipe: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        p = subprocess.run([str(Path(sys.executable).with_name("edgecompress")), "run", str(recipe), "-o", str(out), "--json"],
                           capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if p.returncode not in (0, 1):
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1], "seconds": round(seconds)}
        report = json.loads(p.stdout)
        rows = [{"label": r["label"], "metrics": _untimed(r["metrics"]),
                 "device": _untimed(r["device"]) if r.get("device") else None} for r in report["rows"]]
        files = {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                 for f in sorted(out.rglob("*")) if f.is_file() and f.name not in REPORTS}
        return {"rows": rows, "files": files, "violations": report.get("violations", []),
                "seconds": round(seconds)}


def compare(old: dict, new: dict) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            lines.append(f"{name}: only in {'after' if a is None else 'before'}")
            continue
        for key in ("error", "rows", "violations"):
            if a.get(key) != b.get(key):
                lines.append(f"{name}: {key} differ:\n  before {a.get(key)}\n  after  {b.get(key)}")
        fa, fb = a.get("files", {}), b.get("files", {})
        for f in sorted(set(fa) | set(fb)):
            if fa.get(f) != fb.get(f):
                lines.append(f"{name}: {f} differs ({fa.get(f)} -> {fb.get(f)})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier snapshot to compare with")
    ap.add_argument("--recipe", action="append", help="recipe file names (default: all but searches)")
    args = ap.parse_args()
    names = args.recipe or [p.name for p in sorted(RECIPES.glob("*.yaml")) if not p.name.startswith("search")]
    result = {}
    for name in names:
        result[name] = snapshot(RECIPES / name)
        got = result[name]
        print(f"{name}: {got.get('error') or str(len(got['rows'])) + ' rows'} in {got['seconds']} s", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.compare:
        diffs = compare({k: v for k, v in json.loads(args.compare.read_text()).items() if k in result}, result)
        print("\n".join(diffs) or "identical to " + str(args.compare))
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
