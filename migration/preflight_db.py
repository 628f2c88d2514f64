"""Preflight's database checks: the database, the target tables, the Fernet keys and what
they open, whether each bounded column can hold the KMS text, and the bookkeeping (an
unfinished run, the run lock). Reads only: the engine is read-only at the database level.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from checkpoints import store
from checkpoints.tables import VERSION_TABLE, lock

from .codec import (
    FERNET_PREFIX,
    KMS_BLOB_OVERHEAD,
    KMS_MAX_PLAINTEXT,
    FernetCodec,
    column_length,
    fernet_token_length,
    kms_text_length,
    max_plaintext_fitting,
)
from .config import Settings, targets_fingerprint
from .db import make_engine, safe_url
from .errors import ConfigError, KmsMigrateError
from .preflight_lines import AGAIN, Check, skip
from .reader import BoundTarget, bind_target, refuse_null_keys
from .refusals import fernet_sample

__all__ = [
    "check_bookkeeping",
    "check_database",
    "check_fernet_keys",
    "check_fit",
    "check_samples",
    "check_targets",
]


def check_database(settings: Settings, checks: list[Check]) -> Engine | None:
    shown = safe_url(settings.db_url)
    try:
        engine = make_engine(settings.db_url, read_only=True)
    except ConfigError as exc:
        checks.append(Check("database", False, str(exc)))
        return None
    except KmsMigrateError as exc:
        checks.append(Check("database", False, f"{exc}: check --db / DATABASE_URL, that the "
                            "server is up and that it accepts connections from this host"))
        return None
    except SQLAlchemyError as exc:
        checks.append(Check("database", False, f"cannot use {shown} ({type(exc).__name__}): "
                            "check --db / DATABASE_URL"))
        return None
    checks.append(Check("database", True, f"reachable: {shown} (read-only session)"))
    return engine


def check_targets(
    engine: Engine | None, settings: Settings, checks: list[Check]
) -> dict[str, BoundTarget]:
    bound: dict[str, BoundTarget] = {}
    for target in settings.targets:
        name = f"table {target.table}"
        if engine is None:
            checks.append(skip(name, "the database is unreachable"))
            continue
        try:
            with engine.connect() as conn:
                bt = bind_target(conn, target)
                refuse_null_keys(conn, bt)  # keyset paging cannot pass a NULL key
        except ConfigError as exc:
            checks.append(Check(name, False, str(exc)))
            continue
        except SQLAlchemyError as exc:
            checks.append(Check(name, False, f"cannot read its schema ({type(exc).__name__}): "
                                "check that the database user may read it"))
            continue
        bound[target.table] = bt
        kind = "integer" if bt.pk_is_int else "text"
        checks.append(Check(name, True, f"exists; primary key {target.primary_key} ({kind}); "
                            f"columns {', '.join(target.columns)} exist and are text"))
    return bound


# -- Fernet -----------------------------------------------------------------------------------

def check_fernet_keys(
    settings: Settings, env: Mapping[str, str] | None, checks: list[Check]
) -> FernetCodec | None:
    name = "Fernet keys"
    if env is not None and not env.get("ENCRYPTION_KEY", "").strip():
        checks.append(Check(name, False, "ENCRYPTION_KEY is not set: export the Fernet key the "
                            "application uses (older keys go in ENCRYPTION_KEY_LEGACY, "
                            "comma-separated)"))
        return None
    try:
        codec = FernetCodec(settings.fernet_keys)
    except ConfigError as exc:  # names the key (ENCRYPTION_KEY, legacy #n), never its value
        checks.append(Check(name, False, str(exc)))
        return None
    legacy = len(settings.fernet_keys) - 1
    checks.append(Check(name, True, (
        f"ENCRYPTION_KEY and {legacy} ENCRYPTION_KEY_LEGACY key(s) are valid Fernet keys"
        if legacy else "ENCRYPTION_KEY is a valid Fernet key (no ENCRYPTION_KEY_LEGACY)")))
    return codec


def check_samples(
    engine: Engine | None,
    settings: Settings,
    bound: Mapping[str, BoundTarget],
    codec: FernetCodec | None,
    checks: list[Check],
) -> None:
    for target in settings.targets:
        bt = bound.get(target.table)
        if bt is None:
            why = ("the database is unreachable" if engine is None
                   else f"table {target.table} failed its check")
            checks.append(skip(f"Fernet sample {target.table}", why))
            continue
        for column in target.columns:
            name = f"Fernet sample {target.table}.{column}"
            if codec is None or engine is None:
                checks.append(skip(name, "no valid Fernet keys to try"))
                continue
            checks.append(_sample_column(engine, bt, column, codec, name))


def _sample_column(
    engine: Engine, bt: BoundTarget, column: str, codec: FernetCodec, name: str
) -> Check:
    try:
        with engine.connect() as conn:
            # Spread over the key range, as migrate's own check samples: the oldest rows
            # alone may all be under a legacy or unknown key.
            values = [r.value for r in fernet_sample(conn, bt, column)]
    except SQLAlchemyError as exc:
        return Check(name, False, f"cannot read the column ({type(exc).__name__}): check "
                     "that the database user may read it")
    sampled = len(values)
    opened = sum(codec.decrypt(v) is not None for v in values)
    if sampled == 0:
        return Check(name, True, "no Fernet tokens to sample (NULL, empty or already "
                     "migrated): nothing to migrate here")
    if opened == 0:
        return Check(name, False, f"opened 0 of {sampled} sampled: set ENCRYPTION_KEY (and "
                     "ENCRYPTION_KEY_LEGACY) to the keys the application encrypted them with")
    if opened < sampled:
        return Check(name, True, f"opened {opened} of {sampled} sampled; no key given opens "
                     f"the other {sampled - opened} (corrupt, or made with another key: add "
                     "it to ENCRYPTION_KEY_LEGACY): migrate would fail them, left untouched")
    return Check(name, True, f"opened {opened} of {sampled} sampled")


def check_fit(
    engine: Engine | None,
    settings: Settings,
    bound: Mapping[str, BoundTarget],
    codec: FernetCodec | None,
    checks: list[Check],
) -> None:
    """One line per target column with a declared length (VARCHAR(n)): can it hold the
    AWS KMS text of every value? Unbounded columns (TEXT) get no line."""
    if engine is None:
        return  # the database line already says why
    for target in settings.targets:
        bt = bound.get(target.table)
        if bt is None:
            continue  # its table line already says why
        for column in target.columns:
            length = column_length(bt.col(column))
            if length is None:
                continue
            name = f"column fit {target.table}.{column}"
            if codec is None:
                checks.append(skip(name, "no valid Fernet keys to size the values with"))
                continue
            checks.append(_fit_column(engine, bt, column, length, codec, name))


def _fit_column(
    engine: Engine, bt: BoundTarget, column: str, length: int, codec: FernetCodec, name: str
) -> Check:
    """Count the values whose KMS text, sized for real AWS KMS (plaintext + KMS_BLOB_OVERHEAD
    bytes, base64), is longer than the column. Sized by the plaintext, never shown: only
    tokens long enough to hold a plaintext that does not fit are read and opened."""
    col = bt.col(column)
    kind = col.type
    fits = max_plaintext_fitting(length)
    shortest = fernet_token_length(max(fits + 1, 1))
    q = select(col).where(col.like(f"{FERNET_PREFIX}%"), func.length(col) >= shortest)
    unfit = need = 0
    try:
        with engine.connect() as conn:
            for (value,) in conn.execute(q):
                size = _plaintext_size(codec, value)
                # Empty, oversize or unopened values fail for their own reason.
                if 1 <= size <= KMS_MAX_PLAINTEXT and kms_text_length(size) > length:
                    unfit += 1
                    need = max(need, kms_text_length(size))
    except SQLAlchemyError as exc:
        return Check(name, False, f"cannot read the column ({type(exc).__name__}): check "
                     "that the database user may read it")
    if unfit:
        return Check(name, False, (
            f"{kind} cannot hold the AWS KMS text of {unfit} value(s) (up to {need} "
            f"characters: plaintext + {KMS_BLOB_OVERHEAD} bytes, base64): widen it to at least "
            f"{need} characters, {AGAIN}; migrate would fail those values, left untouched"))
    return Check(name, True, f"{kind} holds the AWS KMS text of every value (plaintexts "
                 f"up to {max(fits, 0)} bytes fit)")


def _plaintext_size(codec: FernetCodec, token: object) -> int:
    """The length of the plaintext a token holds (0 when no key opens it); the plaintext
    itself is dropped at once."""
    plaintext = codec.decrypt(token) if isinstance(token, str) else None
    return len(plaintext) if plaintext is not None else 0


# -- bookkeeping (informational, read only) ----------------------------------------------------

def check_bookkeeping(
    engine: Engine | None, settings: Settings, key_arn: str | None, checks: list[Check]
) -> None:
    """Informational lines: unfinished runs that decide what the command does next (a
    migrate, or a rekey when the settings name a destination key), and the run lock."""
    if engine is None:
        checks.append(skip("bookkeeping", "the database is unreachable"))
        return
    kind = "rekey" if settings.to_key_id else "migrate"
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            if not insp.has_table(VERSION_TABLE):
                checks.append(Check("bookkeeping", None, f"no kms-migrate tables yet: the first "
                                    f"{kind} creates them (kms_migrate_*)"))
                return
            unfinished = {k: store.unfinished_run(conn, k)
                          for k in ("rollback", "migrate", "rekey")}
            holder = (conn.execute(select(lock)).first()
                      if insp.has_table(lock.name) else None)
    except SQLAlchemyError as exc:
        checks.append(Check("bookkeeping", None, f"cannot read the kms_migrate_* tables "
                            f"({type(exc).__name__})"))
        return
    lines = (_rekey_lines(unfinished) if kind == "rekey"
             else _migrate_lines(unfinished, settings, key_arn))
    checks.extend(Check("bookkeeping", None, line) for line in lines)
    if holder is None:
        checks.append(Check("run lock", None, "free"))
    else:
        what = f"{holder.kind} run {holder.run_id}" if holder.run_id else f"a {holder.kind}"
        mine = holder.host == socket.gethostname() and holder.pid == os.getpid()
        checks.append(Check("run lock", None, (
            f"held by {what} (host {holder.host}, pid {holder.pid}, last heartbeat "
            f"{holder.heartbeat_at:%Y-%m-%d %H:%M:%S}){' (this process)' if mine else ''}: "
            "a second migrate or rollback waits for it to finish; a lock left by a dead "
            "process is taken over automatically")))


def _migrate_lines(unfinished: Mapping[str, store.Run | None], settings: Settings,
                   key_arn: str | None) -> list[str]:
    lines: list[str] = []
    rollback_run, migrate_run = unfinished["rollback"], unfinished["migrate"]
    if rollback_run is not None:
        lines.append(f"unfinished rollback run {rollback_run.id} ({rollback_run.state}): "
                     "migrate refuses to start until kms-migrate rollback finishes it")
    if migrate_run is not None:
        lines.append(_unfinished(migrate_run, settings, key_arn))
    if rollback_run is None and migrate_run is None:
        lines.append("no unfinished run: migrate starts a new one")
    return lines


def _rekey_lines(unfinished: Mapping[str, store.Run | None]) -> list[str]:
    """A rekey starts after an unfinished rollback or migrate finishes, and resumes an
    unfinished rekey."""
    lines = [f"unfinished {kind} run {run.id} ({run.state}): a rekey refuses to start until "
             f"it finishes (kms-migrate {kind} resumes it)"
             for kind in ("rollback", "migrate") if (run := unfinished[kind]) is not None]
    run = unfinished["rekey"]
    if run is not None:
        lines.append(f"unfinished rekey run {run.id} ({run.state}, started "
                     f"{run.started_at:%Y-%m-%d %H:%M}, from {run.key_arn or run.key_id} to "
                     f"{run.to_key_arn or run.to_key_id}): rekey resumes it")
    return lines or ["no unfinished run: rekey starts a new one"]


def _unfinished(run: store.Run, settings: Settings, key_arn: str | None) -> str:
    line = (f"unfinished migrate run {run.id} ({run.state}, started "
            f"{run.started_at:%Y-%m-%d %H:%M}): migrate resumes it (--new-run abandons it)")
    changed: list[str] = []
    if key_arn is not None and run.key_arn and run.key_arn != key_arn:
        changed.append(f"another KMS key ({run.key_arn})")
    elif key_arn is None and run.key_id and run.key_id != settings.key_id:
        changed.append(f"another KMS key id ({run.key_id})")
    if run.targets_fingerprint != targets_fingerprint(settings.targets,
                                                      settings.encryption_context):
        changed.append("other targets or another --encryption-context setting")
    if changed:
        line += (f"; it was started with {' and '.join(changed)}, so migrate with these "
                 "settings refuses to resume it")
    return line
