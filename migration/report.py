"""The JSON report of a migrate run or dry-run (`--report PATH`).

It holds names, counts, primary keys, reasons, timings and costs: never a value.
Cost uses the guide's pricing: $0.03 per 10,000 KMS requests, 20,000 free a month.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from checkpoints.store import BatchCounts

from . import __version__
from .config import Settings
from .db import safe_url
from .errors import ConfigError
from .migrator import MigrateResult

__all__ = ["FREE_REQUESTS", "PRICE_PER_10K", "build_report", "kms_cost", "write_report"]

PRICE_PER_10K = 0.03  # USD per 10,000 symmetric KMS requests (the guide's pricing)
FREE_REQUESTS = 20_000  # free KMS requests a month (the guide's pricing)


def kms_cost(requests: int) -> dict[str, float | int]:
    """What `requests` KMS calls cost, before and after the monthly free tier."""
    return {
        "requests": requests,
        "usd": round(requests * PRICE_PER_10K / 10_000, 4),
        "usd_after_free_tier": round(max(requests - FREE_REQUESTS, 0) * PRICE_PER_10K / 10_000, 4),
        "usd_per_10k_requests": PRICE_PER_10K,
        "free_requests_per_month": FREE_REQUESTS,
    }


def build_report(
    result: MigrateResult, settings: Settings, *, started_at: datetime,
    estimate_seconds: float | None = None,
) -> dict[str, Any]:
    columns = [
        {"table": c.table, "column": c.column, "migrated": c.migrated, "skipped": c.skipped,
         "already_kms": c.already, "failed": c.failed, "conflicts": c.conflicts}
        for c in result.columns
    ]
    total = sum((c.counts for c in result.columns), BatchCounts())
    totals = {"migrated": total.migrated, "skipped": total.skipped,
              "already_kms": total.already, "failed": total.failed,
              "conflicts": total.conflicts}
    report: dict[str, Any] = {
        "tool": "kms-migrate",
        "version": __version__,
        "command": "rekey" if result.kind == "rekey" else "migrate",
        "dry_run": result.dry_run,
        "run_id": result.run_id,
        "resumed": result.resumed,
        "database": safe_url(settings.db_url),
        "key_id": settings.key_id,
        "region": settings.region,
        "encryption_context": settings.encryption_context,
        **({"to_key_id": settings.to_key_id,
            "to_encryption_context": settings.to_encryption_context,
            "verify_decrypt": settings.verify_decrypt} if result.kind == "rekey" else {}),
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "duration_seconds": round(result.seconds, 3),
        "batch_size": settings.batch_size,
        "concurrency": settings.concurrency,
        "max_kms_rps": settings.max_kms_rps or None,
        "columns": columns,
        "totals": totals,
        "failures": [
            {"table": f.table_name, "pk": f.pk, "column": f.column_name, "reason": f.reason}
            for f in result.failures
        ],
        "kms": {"requests": result.kms_requests, "retries": result.retries,
                "throttles": result.throttles},
        "batch_time": settings.batch_time,
        "steering": {"holds": result.steered.holds,
                     "held_seconds": round(result.steered.held_seconds, 3),
                     "changes": [c.as_dict() for c in result.steered.changes]},
        "cost": kms_cost(result.kms_requests),
    }
    if result.dry_run:
        calls = result.real_run_calls(settings)
        report["estimate_for_real_run"] = {
            "values_to_migrate" if result.kind != "rekey" else "values_to_rekey":
                totals["migrated"],
            "kms_requests": calls,
            "cost": kms_cost(calls),
            "duration_seconds": None if estimate_seconds is None else round(estimate_seconds, 1),
        }
    return report


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write atomically (a temporary file renamed into place), readable by the owner only."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kms-migrate-report-", dir=p.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, p)
    except OSError as exc:
        raise ConfigError(f"cannot write --report {p}: {exc.strerror}") from None
    return p
