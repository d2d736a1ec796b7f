"""The report: a baseline row and one row per stage, every number measured in the same run."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .measure import Metrics

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
    violations: list[str] = field(default_factory=list)

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
                      "notes": r.notes, "device": r.device.to_dict() if r.device is not None else None}
                     for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---- human-readable forms --------------------------------------------------------------

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells: one compact row per stage (fits 100 columns)."""
        keys = list(self.baseline.latency_ms)
        slash = " / ".join(keys)
        head = ["stage", f"{self.baseline.metric_name} (change)", "params", "nonzero", "bytes (ratio)",
                "MACs (x fewer)"]
        if keys:
            head += [f"ms {slash}", f"speed-up {slash}"]
        rows = []
        for r in self.rows:
            m, q = r.metrics, self.ratios(r.metrics)
            cells = [r.label, f"{m.metric:.4f} ({q['metric_change'] * 100:+.2f} pt)", f"{m.params:,}",
                     f"{m.nonzero_params:,}", f"{m.stored_bytes:,} {m.artifact} ({q['compression']:.2f}x)",
                     f"{m.macs:,} ({q['mac_reduction'] or float('nan'):.2f}x)"]
            if keys:
                cells.append(" / ".join(f"{m.latency_ms.get(k, float('nan')):.3f}" for k in keys))
                cells.append(" / ".join(f"{q.get(f'speedup_{k}') or float('nan'):.2f}x" for k in keys))
            if r.device is not None:
                d = r.device
                cells += [f"{d.flash_bytes:,}", f"{d.ram_bytes:,}", f"~{d.latency_ms_est:.2f}", f"~{d.energy_uj_est:.2f}"]
            rows.append(cells)
        if self.rows and self.rows[0].device is not None:
            name = self.rows[0].device.device
            head += [f"{name} flash B", f"{name} RAM B", "est. ms", "est. uJ"]
        return head, rows

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
        return lines

    def layer_lines(self) -> list[str]:
        lines = []
        for r in self.rows[1:]:
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
                    f"Latency is ONNX Runtime, median after warm-up, {self.baseline.threads} thread(s)."]
        lines = self.layer_lines()
        if lines:
            out += ["", "## Layers", ""] + [f"- {line}" for line in lines]
        if self.device_lines():
            out += ["", f"## Device: {self.rows[0].device.device}", ""] + [f"- {x}" for x in self.device_lines()]
        if self.violations:
            out += ["", "## Constraints missed", ""] + [f"- {v}" for v in self.violations]
        return "\n".join(out) + "\n"

    def to_rich(self):
        from rich.table import Table

        head, rows = self.table()
        t = Table(title=f"edgecompress: {self.task}", title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for c in rows:
            t.add_row(*c)
        return t
