"""The key census: the values of the targets by format and key, as `verify` counted them.

For each target column: KMS values by the ARN of the key that opens them (the key verify
decrypted with, each other key that `KMS.open_stored` named, "" for a key this caller may
not use), Fernet tokens by the Fernet key that opens them ("current", "legacy #N", "" for
none or no key given), empty values and unreadable ones. Every key verify was given and
every KMS key a run of this database recorded is named even at 0, so that an operator sees
"0 values under arn:...:key/old" before disabling that key.

The verify command records it (`record`) in `kms_migrate_census` through
`checkpoints.census`: on an engine of its own that may write, in one short transaction,
only where the bookkeeping tables exist. A failed write (a read-only role, a standby) is a
one-line warning: verify's own result and exit code do not depend on it. `status` shows
the latest one (`census_json`, `census_lines`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from checkpoints.census import Census, CensusRow, record_census

from .db import make_engine, scrub
from .errors import KmsMigrateError
from .pipeline import ColumnCheck
from .verify import VerifyResult

__all__ = ["FORMATS", "Recorded", "by_key", "census_json", "census_lines", "census_rows",
           "key_name", "record", "summary_parts"]

FORMATS = ("kms", "fernet", "empty", "unreadable")
ByKey = dict[str, dict[str, int]]  # format -> key -> values


@dataclass(frozen=True)
class Recorded:
    """What became of a verify's census: its `taken` number; or why it was not recorded
    (`why_not`, for the verify output); or the warning line of a write that failed."""

    taken: int | None = None
    why_not: str = ""
    warning: str | None = None


def census_rows(result: VerifyResult) -> list[CensusRow]:
    """The census of a verify, a row per column, format and key (zeros included)."""
    return [CensusRow(c.table, c.column, fmt, key, n)
            for c in result.columns for fmt, key, n in _column(c, result)]


def _column(check: ColumnCheck, result: VerifyResult) -> list[tuple[str, str, int]]:
    kms: dict[str, int] = {arn: 0 for arn in (result.key_arn, *result.known_arns) if arn}
    if result.key_arn:
        kms[result.key_arn] += check.kms_ok
    for arn, n in sorted(check.other_keys.items(), key=lambda kv: (kv[0] == "", kv[0])):
        kms[arn] = kms.get(arn, 0) + n
    fernet = dict.fromkeys(result.fernet_keys, 0)
    for key, n in sorted(check.fernet_keys.items(), key=lambda kv: kv[0] == ""):
        fernet[key] = fernet.get(key, 0) + n
    if not fernet:
        fernet[""] = 0  # no Fernet key given and no token: still a row saying "0 Fernet"
    return [*(("kms", arn, n) for arn, n in kms.items()),
            *(("fernet", key, n) for key, n in fernet.items()),
            ("empty", "", check.empty), ("unreadable", "", check.undecryptable)]


def by_key(rows: Iterable[CensusRow]) -> ByKey:
    """format -> key -> values, over the rows given (every format present, in FORMATS'
    order; keys in the order the rows name them)."""
    out: ByKey = {fmt: {} for fmt in FORMATS}
    for r in rows:
        keys = out.setdefault(r.format, {})
        keys[r.key] = keys.get(r.key, 0) + r.count
    return out


def key_name(fmt: str, key: str) -> str:
    """How the output names a key of the census ("" is no key of its own)."""
    if key:
        return key
    return {"kms": "a KMS key this caller cannot use",
            "fernet": "no key given"}.get(fmt, "")


def record(url: str, result: VerifyResult) -> Recorded:
    """Record a verify's census in the bookkeeping tables of `url` (never a target table),
    in a short transaction on an engine of its own, only where those tables exist."""
    rows = census_rows(result)
    try:
        engine = make_engine(url)
    except KmsMigrateError as exc:
        return Recorded(warning=_warning(str(exc)))
    try:
        taken = record_census(engine, rows)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        why = str(orig).strip().splitlines()[0] if orig else type(exc).__name__
        return Recorded(warning=_warning(scrub(why, url)))
    finally:
        engine.dispose()
    if taken is None:
        return Recorded(why_not="not recorded: this database has no kms-migrate bookkeeping "
                                "tables with a census table (verify does not create them)")
    return Recorded(taken)


def _warning(why: str) -> str:
    return (f"kms-migrate: warning: verify's census was not recorded ({why}); the counts "
            "above stand, but status will not show them")


def census_json(census: Census | None) -> dict[str, Any] | None:
    """The latest census as `status --json` carries it (None: verify never recorded one)."""
    if census is None:
        return None
    columns: dict[tuple[str, str], list[CensusRow]] = {}
    for r in census.rows:
        columns.setdefault((r.table_name, r.column_name), []).append(r)
    return {
        "taken": census.taken,
        "taken_at": census.taken_at.isoformat(),
        "columns": [{"table": t, "column": c, "by_key": by_key(rows)}
                    for (t, c), rows in columns.items()],
        "by_key": by_key(census.rows),
    }


def census_lines(census: dict[str, Any]) -> list[str]:
    """`status`'s two lines on the latest census (as `census_json` gives it)."""
    totals: ByKey = census["by_key"]
    values = sum(n for keys in totals.values() for n in keys.values())
    head = (f"census of verify #{census['taken']} at {census['taken_at']}: {values:,} "
            f"value(s) in {len(census['columns'])} column(s)")
    return [head, "  " + "; ".join(summary_parts(totals))]


def summary_parts(totals: ByKey) -> list[str]:
    """"1,000 KMS under arn:...", "0 Fernet (0 current, 0 legacy #1)", "3 empty", ..."""
    parts = [f"{n:,} KMS under {key_name('kms', arn)}"
             for arn, n in totals.get("kms", {}).items()] or ["0 KMS"]
    fernet = totals.get("fernet", {})
    named = [f"{n:,} {key}" if key else f"{n:,} under {key_name('fernet', key)}"
             for key, n in fernet.items()]
    keyed = any(fernet) or any(fernet.values())
    parts.append(f"{sum(fernet.values()):,} Fernet" + (f" ({', '.join(named)})" if keyed
                                                      else ""))
    parts += [f"{sum(totals.get(fmt, {}).values()):,} {fmt}"
              for fmt in ("empty", "unreadable")]
    return parts
