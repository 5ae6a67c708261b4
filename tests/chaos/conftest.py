"""The chaos suite's table of results, printed at the end of the session (see tests/chaos/report.py)."""

from __future__ import annotations

from typing import Any

from tests.chaos import report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    found = report.rows()
    if not found:
        return
    path = report.write_table()
    terminalreporter.section("chaos results")
    terminalreporter.write_line(report.table(found))
    terminalreporter.write_line(f"(written to {path}; total SIGKILLs {sum(r.kills for r in found)})")
