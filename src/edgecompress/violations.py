"""A missed constraint, as a record: which constraint, the measured value, the limit, and the one
line the report prints. It is a ``str`` (the line), so it prints, compares and serializes as the
report always wrote it, and a search reads ``constraint``, ``value`` and ``limit`` instead of parsing
the text."""
from __future__ import annotations

#: the recipe's constraints, and the device's own memory
CONSTRAINTS = ("max_metric_drop", "max_bytes", "max_flash", "max_ram", "max_latency_ms", "device_flash",
               "device_ram")


class Violation(str):
    """One missed constraint; ``str(v)`` is its report line. Read back from a report.json, only the
    line is known (``constraint`` is "")."""

    constraint: str
    value: float
    limit: float

    def __new__(cls, line: str, constraint: str = "", value: float = float("nan"), limit: float = float("nan")):
        self = super().__new__(cls, line)
        self.constraint, self.value, self.limit = constraint, value, limit
        return self

    def __reduce__(self):
        return Violation, (str(self), self.constraint, self.value, self.limit)

    @property
    def excess(self) -> float:
        """How far over the limit, relative to it (> 0 for a miss)."""
        return (self.value - self.limit) / self.limit if self.limit else float("inf")
