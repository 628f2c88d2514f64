"""The bookkeeping tables, as SQLAlchemy Core (the schema itself is created by Alembic).

They live in the target database so that one transaction can hold a batch's rewrites,
their journal rows, its failures and its checkpoint. They hold names, primary keys,
counts, reasons and Fernet/KMS ciphertexts (the journal), never a plaintext or a key.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

__all__ = [
    "VERSION_TABLE", "census", "changes", "checkpoints", "failures", "journal", "lock",
    "metadata", "ranges", "runs", "workers",
]

VERSION_TABLE = "kms_migrate_alembic_version"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# One row per run. kind: migrate, retry (migrate --retry-failed), rollback, finalize;
# dry-runs, verify and status have none (verify writes only its census, below). A resume
# goes on in the same row, and every worker of a ranged run (`ranged`) shares its run's row.
# state: running -> completed | interrupted | stopped | abandoned. interrupted (asked to
# stop, between batches) and stopped (ended by an error; a fatal KMS or worker error is
# in `note`) are resumed by the next command of the kind, back to running; abandoned is a
# run superseded by --new-run, by a new retry, or by a rollback of its migrate.
runs = Table(
    "kms_migrate_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("key_id", String(2048)),
    Column("key_arn", String(2048)),
    Column("region", String(64)),
    Column("targets_json", Text, nullable=False),
    Column("targets_fingerprint", String(64), nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("tool_version", String(32)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("note", Text),
    Column("ranged", Boolean, nullable=False, server_default=false()),
    # A ranged run's --max-kms-rps, for the whole run: workers joining from another
    # machine share this limit rather than their own command's.
    Column("max_kms_rps", Float),
    # Identifiers of the run's Fernet keys, in order (JSON list; HMACs that reveal nothing
    # of the keys): a command whose keys do not cover them may not join or resume it.
    Column("fernet_key_ids", Text),
    # A rekey run's destination key (its source is key_id / key_arn).
    Column("to_key_id", String(2048)),
    Column("to_key_arn", String(2048)),
    # The rekey run a rollback run restores (NULL: the migrate layer, every migrate and
    # retry run's journal): a rollback after a rekey undoes the rekey only.
    Column("undoes_run_id", Integer),
    # Steering (`kms-migrate pause`, `resume`, `set`): every process of the run holds
    # between batches while paused_at is set, and takes the set_* limits over its own
    # command's (NULL: its own). `held`: why the run holds by itself (the database guard,
    # a pause file), as the process that saw it wrote it, for `status`.
    Column("paused_at", DateTime(timezone=True)),
    Column("paused_by", String(255)),
    Column("pause_note", Text),
    Column("set_max_kms_rps", Float),
    Column("set_batch_size", Integer),
    Column("set_batch_time", Float),
    Column("held", Text),
    Column("held_at", DateTime(timezone=True)),
    Column("held_by", String(255)),
)

# Who steered a run, and how: pause, resume, set (a limit, "old -> new"), hold and
# release (the run holding by itself, and why). user_name and host of the command.
changes = Table(
    "kms_migrate_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("kms_migrate_runs.id"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user_name", String(255), nullable=False),
    Column("host", String(255), nullable=False),
    Column("action", String(16), nullable=False),
    Column("detail", Text),
    Index(None, "run_id"),
)

# One row per run and target column: where the run is (last primary key, or for a
# rollback the last journal id) and what it has counted so far. Written in the same
# transaction as the batch it describes, so it never runs ahead of committed data.
checkpoints = Table(
    "kms_migrate_checkpoints",
    metadata,
    Column("run_id", Integer, ForeignKey("kms_migrate_runs.id"), primary_key=True),
    Column("table_name", String(255), primary_key=True),
    Column("column_name", String(255), primary_key=True),
    Column("last_pk", Text),
    Column("done", Boolean, nullable=False, default=False),
    Column("batches", Integer, nullable=False, default=0),
    Column("migrated", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    Column("already", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("conflicts", Integer, nullable=False, default=0),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# The rollback journal: the original Fernet token of every value the tool rewrote,
# committed with the rewrite. status: migrated -> rolled_back | conflict.
journal = Table(
    "kms_migrate_journal",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("kms_migrate_runs.id"), nullable=False),
    Column("table_name", String(255), nullable=False),
    Column("column_name", String(255), nullable=False),
    Column("pk", Text, nullable=False),
    Column("original", Text, nullable=False),
    Column("migrated", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("migrated_at", DateTime(timezone=True), nullable=False),
    Column("rollback_run_id", Integer, ForeignKey("kms_migrate_runs.id")),
    Column("rolled_back_at", DateTime(timezone=True)),
    Index(None, "table_name", "column_name", "status", "id"),
)

# Values a run left untouched, with the reason (never the value).
failures = Table(
    "kms_migrate_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("kms_migrate_runs.id"), nullable=False),
    Column("table_name", String(255), nullable=False),
    Column("column_name", String(255), nullable=False),
    Column("pk", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index(None, "run_id"),
)

# The run lock: one row while a migrate, retry, rollback or finalize writes. Taken with an
# INSERT (the primary key makes it exclusive), taken over from a dead holder with a
# compare-and-swap on `token`, and checked again by every batch transaction (fencing), so
# a process that lost its lock can never commit another batch.
lock = Table(
    "kms_migrate_lock",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("token", String(64), nullable=False),
    Column("run_id", Integer),
    Column("kind", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("acquired_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    # The holder's kernel boot id: with host, says whether its pid can be checked here.
    Column("boot_id", String(64)),
)

# A ranged run (`migrate --workers N`, or `rollback --workers N`) splits each target column
# into key ranges: (lo, hi] of the primary key (for a rollback, of the journal id); lo NULL
# is the start, hi NULL the end. A worker claims a range by setting `lease_token` (with
# SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL) and records each batch on it with a
# compare-and-swap on that token, so a worker whose lease was taken over writes nothing.
# `last_pk` is the range's checkpoint; the counts are the range's share of the column's.
ranges = Table(
    "kms_migrate_ranges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("kms_migrate_runs.id"), nullable=False),
    Column("table_name", String(255), nullable=False),
    Column("column_name", String(255), nullable=False),
    Column("lo", Text),
    Column("hi", Text),
    Column("last_pk", Text),
    Column("done", Boolean, nullable=False),
    Column("lease_token", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    Column("worker_id", String(64)),
    Column("claims", Integer, nullable=False),
    Column("batches", Integer, nullable=False),
    Column("migrated", Integer, nullable=False),
    Column("skipped", Integer, nullable=False),
    Column("already", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("conflicts", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "run_id", "done"),
)

# The worker processes of ranged runs: who they are, their heartbeat (the live ones share
# the run's --max-kms-rps), the range they hold and their KMS request counts.
# state: running -> finished | interrupted | stopped | failed | lost. lost: marked by
# another process that found it gone (its pid dead on this host, its heartbeat silent,
# or the run's lock taken over by a new command).
workers = Table(
    "kms_migrate_workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("run_id", Integer, ForeignKey("kms_migrate_runs.id"), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("range_id", Integer),
    Column("rate", Float),
    Column("kms_requests", Integer, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("throttles", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("note", Text),
    Column("boot_id", String(64)),  # see the lock's
    Index(None, "run_id"),
)


# What `verify` counted, by format and key, for `status --json`: one `taken` number per
# verify, shared by its rows (the id of its first row: `checkpoints.census`). format:
# fernet | kms | empty | unreadable. key: for fernet, "current", "legacy #N" or "" (no key
# given opens it); for kms, the ARN of the key that opens it ("" when this caller may not
# use that key); "" otherwise. Every key verify was given and every KMS key a run recorded
# has its row, count 0 included, and so has each format. Never a value.
census = Table(
    "kms_migrate_census",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("taken", Integer, nullable=False),
    Column("taken_at", DateTime(timezone=True), nullable=False),
    Column("table_name", String(255), nullable=False),
    Column("column_name", String(255), nullable=False),
    Column("format", String(16), nullable=False),
    Column("key", String(2048), nullable=False),
    Column("count", Integer, nullable=False),
    Index(None, "taken"),
)
