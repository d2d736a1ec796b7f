"""Budgets: the recipe's device constraints and the device's own memory, checked against a model's
DeviceMetrics; each miss a ``Violation`` naming the layer or tensor that is over and by how much."""
from __future__ import annotations

from ..devices import Device, DeviceMetrics
from ..violations import Violation


def check(m: DeviceMetrics, device: Device, max_flash: int | None = None, max_ram: int | None = None,
          max_latency_ms: float | None = None) -> list[Violation]:
    """One record per budget the model misses: the recipe's constraints and the device's own memory."""
    out = []
    for limit, what, key in ((max_flash, "max_flash", "max_flash"),
                             (device.flash_bytes, f"{device.name} flash", "device_flash")):
        if limit is not None and m.flash_bytes > limit:
            top = sorted(m.weights_by_layer.items(), key=lambda kv: -kv[1])[:3]
            out.append(Violation(f"flash: {m.flash_bytes:,} bytes ({m.artifact}) exceed {what} {limit:,} by "
                                 f"{m.flash_bytes - limit:,} bytes; largest weights: "
                                 + ", ".join(f"{k} {v:,} B" for k, v in top), key, m.flash_bytes, limit))
            break
    for limit, what, key in ((max_ram, "max_ram", "max_ram"), (device.ram_bytes, f"{device.name} RAM", "device_ram")):
        if limit is not None and m.ram_bytes > limit:
            out.append(Violation(f"RAM: {m.ram_bytes:,} bytes of activations ({m.ram_source}) exceed {what} "
                                 f"{limit:,} by {m.ram_bytes - limit:,} bytes; {m.peak_at}", key, m.ram_bytes, limit))
            break
    if max_latency_ms is not None and m.latency_ms_est > max_latency_ms:
        top = sorted(m.macs_by_layer.items(), key=lambda kv: -kv[1])[:2]
        line = (f"latency: estimated {m.latency_ms_est:.3f} ms exceeds max_latency_ms {max_latency_ms:g} by "
                f"{m.latency_ms_est - max_latency_ms:.3f} ms; most MACs: "
                + ", ".join(f"{k} {v:,}" for k, v in top) + f" ({m.estimate_model})")
        out.append(Violation(line, "max_latency_ms", m.latency_ms_est, max_latency_ms))
    return out
