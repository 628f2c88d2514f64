"""Preflight's lines: one `Check` per line, ok, FAIL (with its fix), info or skip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AGAIN", "Check", "format_check", "skip", "summary"]

AGAIN = "then re-run kms-migrate preflight"


@dataclass(frozen=True)
class Check:
    """One line of the preflight: ok True (passed), False (failed), None (informational;
    `skipped` when it could not run because an earlier check failed)."""

    name: str
    ok: bool | None
    detail: str
    skipped: bool = False

    @property
    def label(self) -> str:
        if self.ok is True:
            return "ok"
        if self.ok is False:
            return "FAIL"
        return "skip" if self.skipped else "info"


def skip(name: str, why: str) -> Check:
    return Check(name, None, why, skipped=True)


def format_check(check: Check) -> str:
    """`ok    name: detail`, `FAIL  name: detail`, `info  ...`, `skip  ...`."""
    return f"{check.label:<6}{check.name}: {check.detail}"


def summary(checks: Sequence[Check]) -> str:
    n = {label: sum(c.label == label for c in checks) for label in ("ok", "FAIL", "info", "skip")}
    tail = f"{n['ok']} ok, {n['FAIL']} failed, {n['info']} info, {n['skip']} skipped"
    if n["FAIL"]:
        return f"preflight FAILED: {tail}; fix each FAIL line as it says, then re-run"
    return f"preflight OK: {tail}"
