"""What must hold before a migrate run starts, resumes or is joined: the Fernet keys open
something (a sample spread over the key range), no finalize or rollback is unfinished, and an
unfinished run is only resumed or joined with its own key, targets, context and Fernet keys."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, select

from checkpoints import store
from checkpoints.store import Run
from checkpoints.tables import failures

from .codec import FernetCodec, ValueKind, classify, fernet_key_ids
from .config import Settings, targets_fingerprint
from .db import max_bind_params
from .errors import ConfigError, ResumeMismatchError
from .reader import (
    BoundTarget,
    Row,
    spread_sample,
)

__all__ = [
    "check_keys_open_something", "fernet_sample", "refuse_missing_keys", "refuse_other_settings",
    "refuse_to_start",
]

SAMPLE_IN_CHUNK = 500  # keys per IN list when leaving out recorded failures


def check_keys_open_something(
    engine: Engine, bound: Sequence[BoundTarget], codec: FernetCodec
) -> None:
    """Refuse to start when the Fernet keys open none of a spread sample of Fernet values.

    Without this, a wrong ENCRYPTION_KEY makes a run that "succeeds" with every value
    failed: the classic silent no-op of re-encryption tools. The sample is spread over
    each column's key range (the oldest rows are the likeliest to be under a legacy or
    unknown key), and leaves out values a run already recorded as failed: those are
    named in the failure list, and must not stop the migration of the others.
    """
    sampled = 0
    with engine.connect() as conn:
        for bt in bound:
            for column in bt.target.columns:
                tokens = fernet_sample(conn, bt, column)
                sampled += len(tokens)
                if any(codec.decrypt(r.value) is not None for r in tokens):
                    return
    if sampled:
        raise ConfigError(
            f"the Fernet keys open none of the {sampled} Fernet tokens sampled across the "
            "targets: set ENCRYPTION_KEY (and ENCRYPTION_KEY_LEGACY) to the keys the "
            "application encrypted them with; nothing was written"
        )


def fernet_sample(conn: Connection, bt: BoundTarget, column: str) -> list[Row]:
    """The Fernet tokens of a sample spread over one column's key range, less the values
    a run already recorded as failed (the key check's sample, and preflight's)."""
    tokens = [r for r in spread_sample(conn, bt, column) if classify(r.value) is ValueKind.FERNET]
    if tokens and store.schema_present(conn):
        known = _recorded_failures(conn, bt, column, [r.pk for r in tokens])
        tokens = [r for r in tokens if bt.pk_text(r.pk) not in known]
    return tokens


def _recorded_failures(
    conn: Connection, bt: BoundTarget, column: str, pks: Sequence[Any]
) -> set[str]:
    """Which of these keys a run recorded as failed in this column (as key text)."""
    texts = [bt.pk_text(pk) for pk in pks]
    f = failures.c
    out: set[str] = set()
    step = max(1, min(SAMPLE_IN_CHUNK, max_bind_params(conn) - 2))
    for i in range(0, len(texts), step):
        out.update(conn.execute(
            select(f.pk).where(f.table_name == bt.name, f.column_name == column,
                               f.pk.in_(texts[i:i + step]))).scalars())
    return out


def refuse_other_settings(run: Run, settings: Settings, key_arn: str) -> None:
    """Raise ResumeMismatchError unless this command's key, targets and encryption context
    are the run's own (to resume it, or to join it as a worker)."""
    fingerprint = targets_fingerprint(settings.targets, settings.encryption_context)
    pairs = [(t.table, c) for t in settings.targets for c in t.columns]
    changed: list[str] = []
    if run.key_arn != key_arn:
        changed.append(
            f"the KMS key (run used {run.key_id} = {run.key_arn}, now {settings.key_id} "
            f"= {key_arn})"
        )
    if run.targets_fingerprint == targets_fingerprint(
        settings.targets, not settings.encryption_context
    ):
        changed.append(
            "the encryption context (run used "
            f"{'none' if settings.encryption_context else '--encryption-context'}, "
            f"now {'--encryption-context' if settings.encryption_context else 'none'})"
        )
    elif run.targets_fingerprint != fingerprint:
        was = ", ".join(f"{t['table']}.{c}" for t in run.targets for c in t["columns"])
        now = ", ".join(f"{t}.{c}" for t, c in pairs)
        changed.append(f"the targets (run used {was}; now {now})")
    if changed:
        raise ResumeMismatchError(
            f"unfinished migrate run {run.id} was started with other settings: "
            f"{'; and '.join(changed)}. Re-run with the run's settings to finish it, "
            "or add --new-run to abandon it and start a new run; nothing was written"
        )
    refuse_missing_keys(run, settings.fernet_keys)


def refuse_missing_keys(run: Run, keys: Sequence[str]) -> None:
    """Raise ResumeMismatchError unless `keys` include every Fernet key the run was
    started with (compared by identifier): with one missing, every value under it would
    be recorded as a failure. Names the missing keys by their position, never a value."""
    if not run.fernet_key_ids:
        return  # a run from before the identifiers were recorded
    want: list[str] = json.loads(run.fernet_key_ids)
    have = set(fernet_key_ids(keys))
    missing = [str(n) for n, kid in enumerate(want, 1) if kid not in have]
    if missing:
        raise ResumeMismatchError(
            f"migrate run {run.id} was started with {len(want)} Fernet key(s) and this "
            f"command lacks key {', '.join(missing)} of them (key 1 is the ENCRYPTION_KEY "
            "it was started with, the ENCRYPTION_KEY_LEGACY entries follow in order): set "
            "the same keys as where the run was started, then re-run; nothing was written"
        )


def refuse_to_start(conn: Connection, *, retry_failed: bool = False) -> None:
    """Raise ResumeMismatchError when a migrate (or retry) must not start now: a finalize
    or a rollback is unfinished, or (for a retry) a migrate is."""
    fin = store.unfinished_run(conn, "finalize")
    if fin is not None:
        # It has deleted part of the journal: a migrate now would mix a fresh journal with
        # a partial one, and a later rollback would restore only part of the values.
        raise ResumeMismatchError(
            f"finalize run {fin.id} is unfinished: it has deleted part of the rollback "
            "journal; finish it first (kms-migrate finalize), then migrate again; nothing "
            "was written"
        )
    rb = store.unfinished_run(conn, "rollback")
    if rb is not None:
        raise ResumeMismatchError(
            f"rollback run {rb.id} is unfinished: finish it first (kms-migrate rollback), "
            "then migrate again; nothing was written"
        )
    if retry_failed:
        mig = store.unfinished_run(conn, "migrate")
        if mig is not None:
            raise ResumeMismatchError(
                f"migrate run {mig.id} is unfinished: finish it first (kms-migrate "
                "migrate), then retry its failures; nothing was written"
            )
