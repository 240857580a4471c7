"""Writing tables: a CSV file and a markdown table of the same rows, and the cells every table formats the
same way (numbers to 4 significant digits, a value with its interval as `v [low, high]`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any


def cell(value: Any) -> str:
    """One markdown cell: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def with_interval(value: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    """`value [low, high]`, or the value alone where there is no interval."""
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table of `rows` (columns: every key, in first-seen order, unless given)."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """`rows` as CSV text (columns: every key, in first-seen order)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def write(
    rows: list[dict[str, Any]],
    csv_path: Path,
    title: str = "",
    note: str = "",
    shown: list[dict[str, Any]] | None = None,
    markdown_path: Path | None = None,
) -> list[Path]:
    """Write `rows` to `csv_path` and a markdown table (`markdown_path`, default the CSV's name with `.md`)
    under an optional title and note: of `shown` (the same rows with display cells, e.g. intervals joined)
    where given, else of `rows`."""
    csv_path = Path(csv_path)
    csv_path.write_text(csv_text(rows))
    head = (f"# {title}\n\n" if title else "") + (f"{note}\n\n" if note else "")
    markdown_path = Path(markdown_path or csv_path.with_suffix(".md"))
    markdown_path.write_text(head + markdown(shown if shown is not None else rows))
    return [csv_path, markdown_path]
