"""A small building-code rulebook: numeric rules checked against plan text.

Each rule finds measurements in a page with a regular expression and checks
them against a limit. The figures are illustrative, not any jurisdiction's code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    code: str
    title: str
    pattern: re.Pattern[str]
    check: Callable[[float], bool]
    requirement: str
    severity: str = "major"


def _mm(text: str) -> re.Pattern[str]:
    return re.compile(text + r"\D{0,20}?(\d+(?:\.\d+)?)\s*(mm|m)\b", re.IGNORECASE)


RULES: tuple[Rule, ...] = (
    Rule("B-1.1", "Stair width", _mm(r"stair\s+\w+\s+width"), lambda v: v >= 900, "at least 900 mm"),
    Rule("B-1.2", "Stair riser", _mm(r"riser height"), lambda v: v <= 190, "at most 190 mm"),
    Rule("B-1.3", "Stair going", _mm(r"going"), lambda v: v >= 250, "at least 250 mm", "minor"),
    Rule("B-2.1", "Guard rail height", _mm(r"guard rail height"), lambda v: v >= 1070, "at least 1070 mm", "critical"),
    Rule("B-3.1", "Ceiling height", _mm(r"ceiling height"), lambda v: v >= 2400, "at least 2.4 m", "minor"),
    Rule("B-4.1", "Corridor width", _mm(r"corridor width"), lambda v: v >= 1200, "at least 1200 mm"),
    Rule("B-5.1", "Door clear width", _mm(r"door clear width"), lambda v: v >= 850, "at least 850 mm"),
    Rule("B-6.1", "Ramp width", _mm(r"ramp width"), lambda v: v >= 1000, "at least 1000 mm", "minor"),
)

_SPRINKLERS = re.compile(r"sprinklers:\s*none", re.IGNORECASE)
_OCCUPANTS = re.compile(r"occupant load\s+(\d+)", re.IGNORECASE)


def to_mm(value: str, unit: str) -> float:
    return float(value) * (1000.0 if unit.lower() == "m" else 1.0)


def check_page(text: str) -> tuple[list[dict[str, Any]], int]:
    """Findings on one page, and how many measurements were checked."""
    findings: list[dict[str, Any]] = []
    checked = 0
    for rule in RULES:
        for match in rule.pattern.finditer(text):
            checked += 1
            value = to_mm(match.group(1), match.group(2))
            if not rule.check(value):
                findings.append({
                    "rule": rule.code,
                    "title": rule.title,
                    "severity": rule.severity,
                    "found": match.group(0).strip(),
                    "requirement": rule.requirement,
                })  # fmt: skip
    if _SPRINKLERS.search(text):
        checked += 1
        occupants = _OCCUPANTS.search(text)
        if occupants is None or int(occupants.group(1)) > 150:
            findings.append({
                "rule": "F-1.1",
                "title": "Sprinklers",
                "severity": "critical",
                "found": "no sprinklers proposed",
                "requirement": "sprinklers for assembly occupancies over 150 persons",
            })  # fmt: skip
    return findings, checked
