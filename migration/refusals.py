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

from .batches import Outcome
from .codec import FernetCodec, ValueKind, classify, fernet_key_ids
from .config import Settings, targets_fingerprint
from .db import max_bind_params
from .errors import ConfigError, ResumeMismatchError
from .reader import (
    BoundTarget,
    Row,
    spread_sample,
)
from .rewrap import Denied, Rekey, RekeySteps

__all__ = [
    "HOW_TO_FINISH",
    "check_keys_open_something",
    "fernet_sample",
    "refuse_missing_keys",
    "refuse_other_settings",
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


REKEY_SAMPLE = 10  # KMS values tried per column at most, until one re-encrypts


def check_source_opens_something(engine: Engine, bound: Sequence[BoundTarget], rekey: Rekey,
                                 *, from_context: bool, to_context: bool) -> None:
    """Refuse a rekey whose source key and context open none of a spread sample of the
    KMS values (and none is under the destination already): a wrong --from-key or a
    missing --from-encryption-context would otherwise make a run that reads every value,
    leaves every one, and writes nothing. Stops at the first value that re-encrypts (the
    new ciphertext is thrown away). A denial with no value re-encrypted is the run's own
    permission: raised as KMS said it."""
    tried: list[Outcome] = []
    with engine.connect() as conn:
        for bt in bound:
            for column in bt.target.columns:
                step = RekeySteps(bt, column, rekey, from_context, to_context)
                rows = spread_sample(conn, bt, column, probes=10, window=5)
                items = [i for i in map(step.item, rows) if i is not None]
                for item in items[:REKEY_SAMPLE]:
                    out = rekey.one(item)
                    if not isinstance(out, str):  # re-encrypted, or already there
                        return
                    tried.append(out)
    denied = [o for o in tried if isinstance(o, Denied)]
    if denied:
        raise denied[0].error
    if tried:
        ctx = "with the encryption context" if from_context else "without encryption context"
        raise ConfigError(
            f"the source key {rekey.source.key_id} ({rekey.source.arn}), {ctx}, opens none "
            f"of the {len(tried)} KMS values sampled across the targets, and none is under "
            "the destination: check --from-key and --from-encryption-context (kms-migrate "
            "verify --key-id KEY counts the values by key); nothing was written")


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


def refuse_other_settings(run: Run, settings: Settings, new: store.NewRun) -> None:
    """Raise ResumeMismatchError unless this command's keys, targets and encryption
    contexts (`new`, what it would record) are the run's own (to resume it, or to join it
    as a worker); and, for a migrate run, its Fernet keys cover the run's."""
    changed: list[str] = []
    rekey = run.kind == "rekey"
    if run.key_arn != new.key_arn:
        changed.append(
            f"the {'source ' if rekey else ''}KMS key (run used {run.key_id} = {run.key_arn}, "
            f"now {new.key_id} = {new.key_arn})"
        )
    if rekey and run.to_key_arn != new.to_key_arn:
        changed.append(
            f"the destination KMS key (run used {run.to_key_id} = {run.to_key_arn}, now "
            f"{new.to_key_id} = {new.to_key_arn})"
        )
    if run.targets_fingerprint != new.fingerprint:
        changed.append(_fingerprint_change(run, settings))
    if changed:
        raise ResumeMismatchError(
            f"unfinished {run.kind} run {run.id} was started with other settings: "
            f"{'; and '.join(changed)}. Re-run with the run's settings to finish it, "
            "or add --new-run to abandon it and start a new run; nothing was written"
        )
    refuse_missing_keys(run, settings.fernet_keys)


def _fingerprint_change(run: Run, settings: Settings) -> str:
    """What differs when the fingerprints do: one of the contexts, else the targets."""
    targets, ctx = settings.targets, settings.encryption_context
    to = settings.to_encryption_context if run.kind == "rekey" else None
    flag = "--from-encryption-context" if to is not None else "--encryption-context"
    if run.targets_fingerprint == targets_fingerprint(targets, not ctx, to_context=to):
        return (f"the encryption context (run used {'none' if ctx else flag}, now "
                f"{flag if ctx else 'none'})")
    if to is not None and run.targets_fingerprint == targets_fingerprint(
            targets, ctx, to_context=not to):
        flag = "--to-encryption-context"
        return (f"the destination encryption context (run used {'none' if to else flag}, "
                f"now {flag if to else 'none'})")
    was = ", ".join(f"{t['table']}.{c}" for t in run.targets for c in t["columns"])
    now = ", ".join(f"{t.table}.{c}" for t in targets for c in t.columns)
    return f"the targets (run used {was}; now {now})"


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


# What must be finished before a run of each kind starts, resumes or is joined (beyond an
# unfinished finalize or rollback, which stop every kind): a retry re-reads a migrate's
# failures, and a rekey and a migrate would each leave values behind the other's cursor.
_MUST_FINISH_FIRST = {"migrate": ("rekey",), "retry": ("migrate", "rekey"),
                      "rekey": ("migrate", "retry")}
HOW_TO_FINISH = {
    "migrate": "kms-migrate migrate",
    "retry": "kms-migrate migrate --retry-failed",
    "rollback": "kms-migrate rollback",
    "rekey": "kms-migrate rekey with the run's options",
    "finalize": "kms-migrate finalize",
}


def refuse_to_start(conn: Connection, kind: str = "migrate") -> None:
    """Raise ResumeMismatchError when a run of `kind` (migrate, retry, rekey) must not
    start now: a finalize or a rollback is unfinished, or a run it must follow is."""
    fin = store.unfinished_run(conn, "finalize")
    if fin is not None:
        # It has deleted part of the journal: a migrate now would mix a fresh journal with
        # a partial one, and a later rollback would restore only part of the values.
        raise ResumeMismatchError(
            f"finalize run {fin.id} is unfinished: it has deleted part of the rollback "
            f"journal; finish it first (kms-migrate finalize), then {kind} again; nothing "
            "was written"
        )
    for first in ("rollback", *_MUST_FINISH_FIRST.get(kind, ())):
        run = store.unfinished_run(conn, first)
        if run is not None:
            then = "retry its failures" if kind == "retry" else f"{kind} again"
            raise ResumeMismatchError(
                f"{first} run {run.id} is unfinished: finish it first "
                f"({HOW_TO_FINISH[first]}), then {then}; nothing was written"
            )
