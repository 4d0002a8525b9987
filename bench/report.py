"""The tables of ``make bench``: figures, ratios to the references, the issue's targets, memory per connection.

Everything is Markdown, printed at the end of the run and appended to
``bench/RESULTS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WORKLOADS = ("W1", "W2", "W3")
MAIN_FIGURE = {"W1": "rt_per_s", "W2": "tasks_per_s", "W3": "deliveries_per_s"}
# The ASGI server whose figures the targets are checked on (the production option).
PRODUCTION_SERVER = "uvicorn"


@dataclass
class Row:
    """One system's figures: a workload's summary dict, or ``{"error": why}``, or absent (not applicable)."""

    key: str
    label: str
    turtlemq: bool = False
    server: str | None = None
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    def figure(self, workload: str) -> float | None:
        """The workload's main figure when it was verified, or the rate reached when it timed out."""
        summary = self.figures.get(workload) or {}
        if not (summary.get("ok", True) or summary.get("timed_out")):
            return None
        return summary.get(MAIN_FIGURE[workload])

    def partial(self, workload: str) -> bool:
        """Whether the workload's figure comes from a run that timed out."""
        return bool((self.figures.get(workload) or {}).get("timed_out"))


@dataclass
class Memory:
    label: str
    connections: int
    rss_before: int
    rss_after: int

    @property
    def per_connection_kb(self) -> float:
        return (self.rss_after - self.rss_before) / self.connections / 1024


def _number(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _cell(row: Row, workload: str, key: str, digits: int = 0) -> str:
    summary = row.figures.get(workload)
    if summary is None:
        return ""
    if summary.get(key) is None:
        return "failed" if summary.get("error") else ""
    text = _number(summary.get(key), digits)
    if summary.get("timed_out"):
        text += " (timed out)"
    elif not summary.get("ok", True):
        text += " (unverified)"
    return text


def figures_table(rows: list[Row]) -> str:
    lines = [
        "| system | W1 round trips/s | W1 p50 ms | W1 p99 ms | W2 tasks/s | W3 deliveries/s | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        name = f"**TurtleMQ**, {row.label}" if row.turtlemq else row.label
        cells = [
            _cell(row, "W1", "rt_per_s"),
            _cell(row, "W1", "p50_ms", 2),
            _cell(row, "W1", "p99_ms", 2),
            _cell(row, "W2", "tasks_per_s"),
            _cell(row, "W3", "deliveries_per_s"),
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {row.note} |")
    return "\n".join(lines)


PARTIAL_NOTE = "\\* from a run that timed out: the rate of what was answered or delivered within the time limit."


def ratio(ours: Row, theirs: Row, workload: str) -> str:
    a, b = ours.figure(workload), theirs.figure(workload)
    if not (a and b):
        return ""
    return f"{a / b:.2f}x" + ("\\*" if ours.partial(workload) or theirs.partial(workload) else "")


def ratios_table(rows: list[Row]) -> str:
    """Each TurtleMQ row against each reference: TurtleMQ's figure divided by the reference's."""
    by_key = {row.key: row for row in rows}
    lines = ["| TurtleMQ | against | W1 | W2 | W3 |", "|---|---|---:|---:|---:|"]
    for ours in (row for row in rows if row.turtlemq):
        # The relays on the same ASGI server, and the brokers people would pick instead.
        keys = [f"channels-relay-{ours.server}", "ws-relay", "rabbitmq", "celery"]
        if not ours.key.startswith("turtlemq-embedded"):
            keys.insert(0, f"turtlemq-embedded-{ours.server}")
        for theirs in (by_key[key] for key in keys if key in by_key):
            cells = [ratio(ours, theirs, w) for w in WORKLOADS]
            if any(cells):
                lines.append(f"| {ours.label} | {theirs.label} | {' | '.join(cells)} |")
    return "\n".join([*lines, "", PARTIAL_NOTE])


def targets(rows: list[Row], memory: list[Memory]) -> str:
    """The issue's targets, each with the measured ratio and whether it is met."""
    by_key = {row.key: row for row in rows}
    embedded = by_key.get(f"turtlemq-embedded-{PRODUCTION_SERVER}")
    lean = by_key.get(f"channels-relay-{PRODUCTION_SERVER}")
    checks: list[tuple[str, float | None, float, bool]] = []

    def against(ours: Row | None, theirs: Row | None, workload: str, goal: float, what: str) -> None:
        value = ours.figure(workload) if ours else None
        reference = theirs.figure(workload) if theirs else None
        partial = any(row is not None and row.partial(workload) for row in (ours, theirs))
        checks.append((what, value / reference if value and reference else None, goal, partial))

    for workload, goal in (("W1", 0.5), ("W2", 0.5), ("W3", 3.0)):
        against(embedded, lean, workload, goal, f"embedded {workload} / lean Channels relay ({PRODUCTION_SERVER})")
    for workload in WORKLOADS:
        against(embedded, by_key.get("rabbitmq"), workload, 1.5, f"embedded {workload} / RabbitMQ")
    for workload in ("W1", "W2"):
        against(embedded, by_key.get("celery"), workload, 8.0, f"embedded {workload} / Celery")
    postgres = by_key.get(f"turtlemq-postgres-redis-{PRODUCTION_SERVER}")
    for workload in ("W1", "W3"):
        against(postgres, embedded, workload, 0.5, f"PostgreSQL + Redis {workload} / embedded")
    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for what, value, goal, partial in checks:
        measured = "" if value is None else f"{value:.2f}x" + ("\\*" if partial else "")
        met = "no figure" if value is None else ("yes" if value >= goal else "**no**")
        lines.append(f"| {what} | {measured} | >= {goal:g}x | {met} |")
    for entry in memory:
        kb = entry.per_connection_kb
        lines.append(
            f"| idle subscriber connection, {entry.label} | {kb:.1f} KB | < 40 KB | {'yes' if kb < 40 else '**no**'} |"
        )
    return "\n".join([*lines, "", PARTIAL_NOTE])


def memory_table(memory: list[Memory]) -> str:
    lines = [
        "| broker process | idle subscribers | RSS before | RSS after | per connection |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in memory:
        lines.append(
            f"| {entry.label} | {entry.connections:,} | {entry.rss_before / 2**20:.1f} MiB | "
            f"{entry.rss_after / 2**20:.1f} MiB | {entry.per_connection_kb:.1f} KB |"
        )
    return "\n".join(lines)
