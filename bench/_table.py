"""One Markdown table for every benchmark, and the mean ± sd cell its repeated runs print."""
from __future__ import annotations

import statistics


def line(cells: list) -> str:
    """One row of a table (for a benchmark that prints its rows as they finish)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(head: list[str], rows: list[list], title: str | None = None) -> str:
    """The table as Markdown, under a ``### title`` heading when one is given."""
    out = [f"### {title}", ""] if title else []
    out += [line(head), "|" + "---|" * len(head)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def print_table(head: list[str], rows: list[list], title: str | None = None) -> None:
    print(markdown(head, rows, title))


def mean_sd(values: list[float], scale: float = 1.0, fmt: str = ".4f") -> str:
    """Mean ± sample standard deviation (0 for one value), both times ``scale``."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:{fmt}} ± {sd * scale:{fmt.lstrip('+')}}"
