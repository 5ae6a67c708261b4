"""Rendering runs for a terminal: a one-line progress bar and readable summaries."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # for annotations only: importing the records loads the store package, for every command
    from haulage import RunRecord, StepRecord

BAR_WIDTH = 30


def progress_line(record: RunRecord, elapsed: float) -> str:
    filled = int(BAR_WIDTH * min(record.percent, 100.0) / 100.0)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    usd = sum(c.usd for c in record.cost.values())
    s = record.steps
    return (
        f"[{bar}] {record.percent:5.1f}% {record.status.value:<10} "
        f"steps {s.done}/{s.total} failed {s.failed}  ${usd:.4f}  {elapsed:5.1f}s  {record.message[:60]}"
    )


class ProgressPrinter:
    """Prints a progress line each time it changes; redraws in place on a terminal."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.last = ""
        self.started = time.monotonic()

    def show(self, record: RunRecord) -> None:
        line = progress_line(record, time.monotonic() - self.started)
        key = line.split("  ")[0] + record.message
        if key == self.last and not self.tty:
            return
        self.last = key
        if self.tty:
            self.out.write("\r\033[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def record_summary(record: RunRecord, steps: list[StepRecord] | None = None) -> str:
    lines = [
        f"run       {record.id}",
        f"workflow  {record.workflow}",
        f"status    {record.status.value}  {record.percent:.1f}%  {record.message}",
        f"steps     {record.steps.done} done, {record.steps.failed} failed, {record.steps.total} known",
    ]
    if steps:
        where = Counter(s.backend for s in steps)
        lines.append("ran on    " + ", ".join(f"{backend} {n}" for backend, n in sorted(where.items())))
    if record.created_by:
        lines.append(f"by        {record.created_by}")
    if record.tags:
        lines.append(f"tags      {', '.join(record.tags)}")
    for model, cost in sorted(record.cost.items()):
        lines.append(
            f"cost      {model}: ${cost.usd:.4f}, {cost.input_tokens} in / {cost.output_tokens} out, {cost.calls} calls"
        )
    if record.error:
        lines.append(f"error     {record.error}")
    lines.append("history")
    for event in record.history[-15:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        lines.append(f"  {stamp} {event.kind:<11} {event.message}")
    return "\n".join(lines)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=_default)


def _default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
