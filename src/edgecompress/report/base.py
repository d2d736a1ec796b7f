"""The report: a baseline row and one row per stage, every number measured in the same run."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArtifactError
from ..measure import Metrics
from ..task import change_text
from ..violations import Violation

SCHEMA_VERSION = 1


@dataclass
class Row:
    label: str
    stage: str
    metrics: Metrics
    touched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: Any = None  # devices.DeviceMetrics when the recipe names a device


@dataclass
class Report:
    """Rows in order; ratios are against ``rows[0]`` (the baseline), measured in the same run."""

    task: str
    rows: list[Row] = field(default_factory=list)
    constraints: dict[str, Any] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)  # each a str: its report line

    @property
    def baseline(self) -> Metrics:
        return self.rows[0].metrics

    @property
    def final(self) -> Metrics:
        return self.rows[-1].metrics

    def ratios(self, m: Metrics) -> dict[str, float | None]:
        b = self.baseline
        out: dict[str, float | None] = {
            "metric_change": m.metric - b.metric,
            "compression": b.dense_bytes / m.stored_bytes if m.stored_bytes else None,
            "mac_reduction": b.macs / m.macs if m.macs else None,
        }
        for key, ms in m.latency_ms.items():
            base = b.latency_ms.get(key)
            out[f"speedup_{key}"] = base / ms if base and ms else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "task": self.task,
            "constraints": self.constraints,
            "violations": self.violations,
            "rows": [{"label": r.label, "stage": r.stage, "metrics": r.metrics.to_dict(),
                      "ratios": self.ratios(r.metrics), "touched": r.touched, "skipped": r.skipped,
                      "notes": r.notes, "device": r.device.to_dict() if r.device is not None else None,
                      "robustness_change": self.robustness_change(r.metrics)}
                     for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any, where: str = "report") -> Report:
        """The report ``to_dict`` wrote (``report.json``); another schema version is an ArtifactError."""
        from ..devices import DeviceMetrics

        version = d.get("schema_version") if isinstance(d, dict) else None
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{where}: schema_version must be {SCHEMA_VERSION}; got {version!r}")
        try:
            rows = [Row(r["label"], r["stage"], Metrics(**r["metrics"]), r["touched"], r["skipped"], r["notes"],
                        DeviceMetrics(**r["device"]) if r["device"] is not None else None) for r in d["rows"]]
            report = cls(d["task"], rows, d["constraints"], [Violation(v) for v in d["violations"]])
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{where}: not an edgecompress report ({type(e).__name__}: {e})") from None
        if not rows:
            raise ArtifactError(f"{where}: rows must hold at least the baseline row; got none")
        return report

    def to_html(self, sections=()) -> str:
        """One self-contained HTML page with the table and plots; ``sections`` adds more (see report.html)."""
        from .html import to_html

        return to_html(self, sections=sections)

    # ---- human-readable forms --------------------------------------------------------------

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells: one compact row per stage (fits 100 columns)."""
        keys = list(self.baseline.latency_ms)
        slash = " / ".join(keys)
        head = ["stage", f"{self.baseline.metric_name} (change)", "params", "nonzero", "bytes (ratio)",
                "MACs (x fewer)"]
        timed = self._timed_runtimes()
        if keys:
            head += [f"ms {slash}", f"speed-up {slash}"]
        rows = []
        for r in self.rows:
            m, q = r.metrics, self.ratios(r.metrics)
            cells = [r.label, f"{m.metric:.4f} ({change_text(m.metric_name, q['metric_change'])})", f"{m.params:,}",
                     f"{m.nonzero_params:,}", f"{m.stored_bytes:,} {m.artifact} ({q['compression']:.2f}x)",
                     f"{m.macs:,} ({q['mac_reduction'] or float('nan'):.2f}x)"]
            if keys:
                cells.append(" / ".join(f"{m.latency_ms.get(k, float('nan')):.3f}" for k in keys))
                cells.append(" / ".join(f"{q.get(f'speedup_{k}') or float('nan'):.2f}x" for k in keys))
            if r.device is not None:
                d = r.device
                cells += [f"{d.flash_bytes:,}", f"{d.ram_bytes:,}", f"~{d.latency_ms_est:.2f}", f"~{d.energy_uj_est:.2f}"]
                lat = {e["runtime"]: e["latency_ms"] for e in getattr(d, "runtimes", [])}
                cells += [f"{lat[k]:.3f}" if lat.get(k) is not None else "-" for k in timed]
            rows.append(cells)
        if self.rows and self.rows[0].device is not None:
            name = self.rows[0].device.device
            head += [f"{name} flash B", f"{name} RAM B", "est. ms", "est. uJ"] + [f"{k} ms b=1" for k in timed]
        return head, rows

    def _timed_runtimes(self) -> list[str]:
        """The device's runtimes that were timed on this host in some row (see deploy.time_runtimes)."""
        out: list[str] = []
        for r in self.rows:
            for e in getattr(r.device, "runtimes", None) or []:
                if e["latency_ms"] is not None and e["runtime"] not in out:
                    out.append(e["runtime"])
        return out

    def device_lines(self) -> list[str]:
        """What the device columns measure and how the estimates are made."""
        rows = [r for r in self.rows if r.device is not None]
        if not rows:
            return []
        d = rows[-1].device
        lines = [f"flash: bytes of the {d.artifact} ({d.precision}); RAM: {d.ram_source}",
                 f"latency and energy are estimates: {d.estimate_model}"]
        for r in rows:
            lines += [f"{r.label}: {n}" for n in r.device.notes]
            lines.append(f"{r.label}: peak RAM {r.device.peak_at}")
            if getattr(r.device, "instructions", None) is not None:
                d = r.device
                est = (f"; cycles {d.cycles_est:,.0f}, {d.instr_latency_ms_est:.3f} ms (estimates from the profile's "
                       f"cycles per instruction and clock)" if d.cycles_est is not None else "")
                lines.append(f"{r.label}: {d.instructions:,} instructions per inference (measured: "
                             f"{d.instructions_source}){est}; MAC-based estimate {d.latency_ms_est:.3f} ms")
            lines += [f"{r.label}: weights {w}" for w in getattr(r.device, "weight_formats", {}).values()]
            for e in getattr(r.device, "runtimes", []):
                size = f"{e['bytes']:,} bytes ({e['artifact']})" if e["bytes"] is not None else "no file"
                if e["latency_ms"] is not None:
                    beside = "" if e["runtime"] == "onnxruntime" else \
                        f"ONNX Runtime {e['onnxruntime_ms']:.3f} ms in the same loop, "
                    when = (f"{e['latency_ms']:.3f} ms at batch 1 measured on this host, not on {r.device.device} "
                            f"({beside}{self.baseline.threads} thread(s))")
                else:
                    when = e["note"] or "not timed (measure: {latency: false})"
                lines.append(f"{r.label}: {e['runtime']}: {size}; {when}")
        return lines

    def robustness_change(self, m: Metrics) -> dict[str, float]:
        """The metric under each corruption minus the baseline's under the same corruption."""
        base = self.baseline.robustness
        return {k: v - base[k] for k, v in m.robustness.items() if k in base}

    def robustness_lines(self) -> list[str]:
        """One line per row: the metric under each corruption (change against the baseline's)."""
        lines = []
        for i, r in enumerate(self.rows):
            change = self.robustness_change(r.metrics)
            cells = [f"{k} {v:.4f}" + (f" ({change_text(r.metrics.metric_name, change[k])})" if i else "")
                     for k, v in r.metrics.robustness.items()]
            if cells:
                lines.append(f"{r.label}: {r.metrics.metric_name} under " + ", ".join(cells))
        return lines

    def layer_lines(self) -> list[str]:
        lines = self.robustness_lines()
        for r in self.rows[1:]:
            slower = [f"{k} ({r.metrics.latency_ms[k]:.3f} ms against {ms:.3f})"
                      for k, ms in self.baseline.latency_ms.items() if r.metrics.latency_ms.get(k, 0) > ms]
            if slower:
                lines.append(f"{r.label}: measured slower than the baseline at {', '.join(slower)}")
            for name, what in r.touched.items():
                lines.append(f"{r.label}: {name}: {what}")
            for name, why in r.skipped.items():
                lines.append(f"{r.label}: {name}: skipped ({why})")
            lines += [f"{r.label}: {n}" for n in r.notes]
        return lines

    def to_markdown(self) -> str:
        head, rows = self.table()
        out = [f"# edgecompress report: {self.task}", "", "| " + " | ".join(head) + " |",
               "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in rows]
        out += ["", "Bytes are of the file written; ratio is dense fp32 bytes of the baseline over it. "
                    f"Latency is ONNX Runtime, median after warm-up, {self.baseline.threads} thread(s)."
                + (" The device's runtime columns (ms b=1) are timed on this host, round-robin in a loop of their "
                   "own at batch 1 (see the device section)." if self._timed_runtimes() else "")]
        lines = self.layer_lines()
        if lines:
            out += ["", "## Layers", ""] + [f"- {line}" for line in lines]
        if self.device_lines():
            out += ["", f"## Device: {self.rows[0].device.device}", ""] + [f"- {x}" for x in self.device_lines()]
        if self.violations:
            out += ["", "## Constraints missed", ""] + [f"- {v}" for v in self.violations]
        return "\n".join(out) + "\n"

    def to_rich(self, width: int = 80):
        """The table as rich tables no wider than ``width``: columns that do not fit go to another
        table that repeats the stage column; headers and stage names wrap between words, cells never."""
        from rich.console import Group
        from rich.table import Table

        head, rows = self.table()
        need = [max([len(c[i]) for c in rows] + [len(w) for w in head[i].split()]) for i in range(len(head))]
        longest_word = max(len(w) for c in rows for w in c[0].split()) if rows else 5
        need[0] = max(longest_word, min(need[0], 12))
        groups: list[list[int]] = [[]]
        used = 1 + need[0] + 3  # a column takes its width, two spaces of padding and a border
        for i in range(1, len(head)):
            if groups[-1] and used + need[i] + 3 > width:
                groups.append([])
                used = 1 + need[0] + 3
            groups[-1].append(i)
            used += need[i] + 3
        tables = []
        for n, cols in enumerate(groups):
            spare = width - 1 - sum(need[i] + 3 for i in [0, *cols])
            wide = {}
            for i in cols:  # room left over goes to headers that would otherwise wrap
                wide[i] = need[i] + max(0, min(len(head[i]) - need[i], spare))
                spare -= wide[i] - need[i]
            t = Table(title=f"edgecompress: {self.task}" + (" (continued)" if n else ""), title_justify="left")
            for i in [0, *cols]:
                t.add_column(head[i], justify="left" if i == 0 else "right", width=wide.get(i, need[0]))
            for c in rows:
                t.add_row(*(c[i] for i in [0, *cols]))
            tables.append(t)
        return Group(*tables)
