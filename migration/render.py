"""What the commands print: result tables, failure lists, estimates, status (the CLI and
the demo both print through here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from .census import Recorded, by_key, census_lines, census_rows, key_name
from .config import Settings
from .db import safe_url
from .migrator import MigrateResult
from .report import kms_cost
from .rollback import RollbackResult
from .status import StatusReport
from .steer import Steered
from .verify import VerifyResult

__all__ = [
    "estimate_line", "estimate_seconds", "print_migrate", "print_rollback", "print_status",
    "print_verify",
]


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
        ).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _failure_lines(failures: Sequence[Any], limit: int = 100) -> list[str]:
    out = [f"  {f.table_name} pk={f.pk} {f.column_name}: {f.reason}" for f in failures[:limit]]
    if len(failures) > limit:
        out.append(f"  ... and {len(failures) - limit} more (kms-migrate status --json lists all)")
    return out


def print_migrate(result: MigrateResult, settings: Settings) -> None:
    """A migrate (or retry, or rekey) run's summary: counts per column, KMS figures, the
    dry-run's estimate, and every value left untouched with its reason."""
    rekey = result.kind == "rekey"
    head = "DRY RUN (nothing was written)" if result.dry_run else (
        f"run {result.run_id}" + (" (joined)" if result.joined else
                                  " (resumed)" if result.resumed else ""))
    keys = (f"key {settings.key_id} -> {settings.to_key_id}"
            + (" (destination encryption context)" if settings.to_encryption_context else "")
            if rekey else f"key {settings.key_id}")
    click.echo(f"{'rekey' if rekey else 'migrate'} {head}: {safe_url(settings.db_url)}, {keys}")
    rows = [(f"{c.table}.{c.column}", c.migrated, c.skipped, c.already, c.failed, c.conflicts)
            for c in result.columns]
    verb = "rekey" if rekey else "migrate"
    first = f"would {verb}" if result.dry_run else f"{verb}ed" if rekey else "migrated"
    click.echo(_table([
        "column", first, "skipped", "already there" if rekey else "already kms",
        "left" if rekey else "failed", "conflicts"], rows))
    click.echo(f"KMS requests: {result.kms_requests} (retries: {result.retries}); "
               f"{result.seconds:.2f} s")
    if result.rate_limit is not None and result.throttles:
        click.echo(f"KMS throttled {result.throttles} time(s): the rate limit went down from "
                   f"{result.rate_limit:g}/s and was back at {result.rate_now:.0f}/s at the end")
    _print_steered(result.steered)
    if result.dry_run:
        _print_estimate(result, settings)
    _print_unfit(result)
    if result.conflicts:
        again = ("run `kms-migrate rekey` again to pick them up" if rekey else
                 "`kms-migrate migrate --retry-failed` picks them up")
        done = "rekeyed" if rekey else "migrated"
        click.echo(f"{result.conflicts} value(s) changed by the application while being "
                   f"{done} were left as written (listed below); {again}.")
    if result.failures:
        click.echo(f"{'Values left' if rekey else 'Failed values'} ({len(result.failures)}), "
                   "left untouched:")
        for line in _failure_lines(result.failures):
            click.echo(line)


CHANGE_LINES = 20  # the latest changes of a run a summary or status shows


def steered_lines(steered: Steered) -> list[str]:
    """How the run was steered: this command's holds, and every change of the run."""
    lines: list[str] = []
    if steered.holds:
        held = f", {_duration(steered.held_seconds)} in all" if steered.held_seconds else ""
        lines.append(f"held {steered.holds} time(s){held} (paused, or a guard)")
    if steered.changes:
        lines.append(f"changes to run ({len(steered.changes)}):")
        earlier = len(steered.changes) - CHANGE_LINES
        if earlier > 0:  # a guard that flaps holds and releases the run all night
            lines.append(f"  ({earlier} earlier: --report, or the table kms_migrate_changes, "
                         "has them all)")
        lines += [change_line(c.as_dict()) for c in steered.changes[-CHANGE_LINES:]]
    return lines


def change_line(c: dict[str, Any]) -> str:
    """One change of a run (`Change.as_dict`), as a summary and status show it."""
    return (f"  {c['at'][:19].replace('T', ' ')} {c['action']} by {c['user']}@{c['host']}"
            + (f": {c['detail']}" if c["detail"] else ""))


def _print_steered(steered: Steered) -> None:
    for line in steered_lines(steered):
        click.echo(line)


def _print_estimate(result: MigrateResult, settings: Settings) -> None:
    todo = sum(c.migrated for c in result.columns)
    calls = result.real_run_calls(settings)
    if result.kind == "rekey":
        how = ("ReEncrypt + Decrypt of old and new per value" if settings.verify_decrypt
               else "ReEncrypt + checking ReEncrypt per value")
        click.echo(f"A real run would rekey {todo} value(s) with about {calls} KMS requests "
                   f"({how}, two DescribeKey), and leave {result.failed} value(s) untouched.")
    else:
        click.echo(f"A real run would migrate {todo} value(s) with about {calls} KMS "
                   "requests (Encrypt + verifying Decrypt per value, one DescribeKey), "
                   f"and leave {result.failed} failed value(s) untouched.")
    click.echo(estimate_line(calls, result.kms_requests, result.seconds, result.rate_limit))


def _print_unfit(result: MigrateResult) -> None:
    for c in result.columns:
        if c.unfit:
            kind = "will not fit their KMS text" if result.dry_run else "did not fit their KMS text"
            on = " on AWS KMS" if result.dry_run else ""
            click.echo(f"{c.table}.{c.column} is {c.column_type}: {c.unfit} value(s) {kind} "
                       f"(up to {c.unfit_need} characters{on}): widen the column to at least "
                       f"{c.unfit_need} characters"
                       + ("" if result.dry_run else ", then run rekey again" if
                          result.kind == "rekey" else ", then migrate --retry-failed"))


def estimate_seconds(calls: int, measured_calls: int, seconds: float,
                     limit: float | None) -> float | None:
    """How long the real run should take: the dry-run's own KMS rate, capped by the limit.

    The dry-run makes the same KMS calls as the real run; the real run adds the writes,
    which the pipeline overlaps with KMS work.
    """
    measured = measured_calls / seconds if seconds > 0 else 0.0
    rates = [r for r in (measured, limit) if r]
    return calls / min(rates) if rates else None


def estimate_line(calls: int, measured_calls: int, seconds: float,
                  limit: float | None) -> str:
    est = estimate_seconds(calls, measured_calls, seconds, limit)
    if est is None:
        return "Estimated duration of the real run: unknown (nothing was measured)."
    measured = measured_calls / seconds if seconds > 0 else 0.0
    bound = "the --max-kms-rps limit" if limit and measured > limit else "the measured rate"
    cost = kms_cost(calls)
    return (f"Estimated duration of the real run: {_duration(est)} (measured {measured:.0f} "
            f"KMS requests/s; limit {f'{limit:g}/s' if limit else 'none'}; bound by {bound}). "
            f"Estimated KMS cost: ${cost['usd']:.2f} (${cost['usd_after_free_tier']:.2f} past "
            "the 20,000 free requests a month).")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_rollback(result: RollbackResult) -> None:
    click.echo(f"rollback run {result.run_id}" + (" (resumed)" if result.resumed else "") + ":")
    if not result.columns:
        click.echo("nothing to roll back: every journal entry was restored already")
        return
    rows = [(f"{c.table}.{c.column}", c.migrated, c.conflicts) for c in result.columns]
    click.echo(_table(["column", "restored", "conflicts"], rows))
    _print_steered(result.steered)
    if result.failures:
        click.echo(f"Not restored ({len(result.failures)}):")
        for line in _failure_lines(result.failures):
            click.echo(line)


def print_verify(result: VerifyResult, recorded: Recorded | None = None) -> None:
    rows = [(f"{c.table}.{c.column}", c.kms_ok, c.fernet_left, c.empty, c.undecryptable,
             c.other_key) for c in result.columns]
    click.echo(_table(["column", "kms ok", "fernet left", "null/empty", "undecryptable",
                       "other key"], rows))
    _print_census(result, recorded)
    for arn, n in sorted(result.other_keys().items()):
        click.echo(f"{n} value(s) under KMS key {arn}" if arn else
                   f"{n} value(s) under a KMS key this caller cannot use")
    if result.other_keys():
        click.echo("  (the configured key cannot decrypt them: re-encrypt them under it, or "
                   "check --key-id)")
    click.echo(f"KMS requests: {result.kms_requests}; {result.seconds:.2f} s")
    if result.problems:
        click.echo(f"Problems ({len(result.problems)}):")
        for t, c, pk, why in result.problems[:100]:
            click.echo(f"  {t} pk={pk} {c}: {why}")
    click.echo("verify: OK" if result.ok else "verify: FAILED")


def _print_census(result: VerifyResult, recorded: Recorded | None) -> None:
    """The key census, over every column: each key named, zeros included, the one verify
    decrypted with marked; and whether (and as which number) it was recorded."""
    note = ""
    if recorded is not None and recorded.taken is not None:
        note = f" (census #{recorded.taken}; kms-migrate status shows the latest)"
    elif recorded is not None and recorded.why_not:
        note = f" ({recorded.why_not})"
    click.echo(f"values by key{note}:")
    lines: list[tuple[str, str, int]] = []
    for fmt, keys in by_key(census_rows(result)).items():
        for key, n in keys.items():
            mine = fmt == "kms" and key == result.key_arn
            lines.append((fmt, key_name(fmt, key) + (" (verify's key)" if mine else ""), n))
    fmts = max((len(fmt) for fmt, _, _ in lines), default=0)
    counts = max((len(f"{n:,}") for _, _, n in lines), default=0)
    for fmt, name, n in lines:
        click.echo(f"  {fmt.ljust(fmts)}  {f'{n:,}'.rjust(counts)}  {name}".rstrip())


# -- commands ------------------------------------------------------------------------------


def print_status(report: StatusReport) -> None:
    """`kms-migrate status` as tables: runs, the latest migrate run's columns, workers and
    ranges of the latest ranged run, failures, journal."""
    click.echo(_table(["run", "kind", "state", "started", "finished", "seconds"], [
        (r["id"], r["kind"], r["state"], r["started_at"] or "", r["finished_at"] or "",
         r["seconds"] if r["seconds"] is not None else "")
        for r in report.runs
    ]))
    if report.run_id is not None:
        click.echo(f"\nlatest {report.run_kind or 'migrate'} run {report.run_id}:")
        rekey = report.run_kind == "rekey"
        click.echo(_table(
            ["column", "rekeyed" if rekey else "migrated", "skipped",
             "already there" if rekey else "already", "left" if rekey else "failed",
             "conflicts", "remaining", "last pk"],
            [(f"{p.table}.{p.column}", p.migrated, p.skipped, p.already, p.failed, p.conflicts,
              "done" if p.done else (p.remaining if p.remaining is not None else "?"),
              p.last_pk or "") for p in report.progress]))
    if report.steering is not None:
        _print_steering(report.steering)
    if report.ranged_run_id is not None:
        _print_ranged(report)
    if report.failures:
        click.echo(f"\nfailures of run {report.run_id} ({report.failures_total}):")
        for f in report.failures:
            click.echo(f"  {f['table_name']} pk={f['pk']} {f['column_name']}: {f['reason']}")
    if report.journal:
        click.echo("\njournal: " + ", ".join(f"{k}={v}" for k, v in report.journal.items()))
    if report.census is not None:
        click.echo("")
        for line in census_lines(report.census):
            click.echo(line)


RANGE_LINES = 200


def _print_steering(st: dict[str, Any]) -> None:
    """The run a steering command would act on: paused, held or going, its live limits,
    its latest changes."""
    click.echo(f"\nrun {st['run_id']} ({st['kind']}, {st['state']}): {st['now']}")
    limits = st["limits"]
    click.echo("live settings: " + ", ".join(
        f"{k.replace('_', ' ')} {v if v is not None else 'as started'}"
        for k, v in limits.items()))
    changes = st["changes"]
    if changes:
        click.echo(f"changes ({len(changes)}):")
        for c in changes[-CHANGE_LINES:]:
            click.echo(change_line(c))


def _print_ranged(report: Any) -> None:
    click.echo(f"\nworkers of run {report.ranged_run_id}:")
    click.echo(_table(
        ["worker", "host", "pid", "state", "range", "rate share", "kms requests", "heartbeat"],
        [(w["id"], w["host"], w["pid"], w["state"], w["range_id"] or "",
          w["rate_share"] if w["rate_share"] is not None else "", w["kms_requests"],
          f"{w['heartbeat_age_s']:g} s ago" if w["state"] == "running" else "")
         for w in report.workers]))
    states: dict[str, int] = {}
    for r in report.ranges:
        states[r["state"]] = states.get(r["state"], 0) + 1
    click.echo(f"\nranges of run {report.ranged_run_id}: "
               + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    shown = report.ranges if len(report.ranges) <= RANGE_LINES else [
        r for r in report.ranges if r["state"] != "done"][:RANGE_LINES]
    if shown:
        click.echo(_table(
            ["range", "column", "after", "up to", "state", "at", "worker", "claims",
             "migrated", "failed"],
            [(r["id"], f"{r['table']}.{r['column']}", r["after"] or "(start)",
              r["upto"] or "(end)", r["state"], r["last_pk"] or "", r["worker_id"] or "",
              r["claims"], r["migrated"], r["failed"]) for r in shown]))
    if len(shown) < len(report.ranges):
        click.echo(f"({len(report.ranges) - len(shown)} more ranges: kms-migrate status "
                   "--json lists all)")
