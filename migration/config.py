"""Settings from flags and the environment, and the targets (built-in coinflip or TOML).

Fernet keys come from the environment only (``ENCRYPTION_KEY`` and the comma-separated
``ENCRYPTION_KEY_LEGACY``), never from the command line, so they never show in ``ps`` or
shell history. AWS credentials are never read here at all: boto3 resolves them itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "COINFLIP_TARGETS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_TIME",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_KEY_ID",
    "DEFAULT_MAX_KMS_RPS",
    "DEFAULT_REGION",
    "Settings",
    "Target",
    "fernet_keys_from_env",
    "load_targets",
    "named_fernet_keys",
    "resolve_db_url",
    "targets_fingerprint",
]

DEFAULT_KEY_ID = "alias/coinflip-master-key"
DEFAULT_REGION = "us-east-1"
DEFAULT_BATCH_SIZE = 500
# --batch-time: the target seconds per batch when --batch-size is not given (None: off).
# 1 s: a pause or Ctrl-C waits about a second for the batch in flight whatever KMS does,
# for 1-3% of the throughput of a fixed 500 (docs/benchmarks.md, "Adaptive batch size").
DEFAULT_BATCH_TIME: float | None = 1.0
DEFAULT_CONCURRENCY = 16
# KMS requests/s of the whole run. A default account quota for symmetric cryptographic
# operations is 10,000/s in most regions, shared with the live application: 2,000/s leaves
# it 80%. 0 means no limit.
DEFAULT_MAX_KMS_RPS = 2000.0
# Ranged runs (--workers): rows per key range, and how long a worker's claim on a range
# lasts without a heartbeat before another worker may take the range over.
DEFAULT_ROWS_PER_RANGE = 20_000
DEFAULT_LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class Target:
    """One table whose listed text columns hold encrypted secrets, keyed by one primary key."""

    table: str
    primary_key: str
    columns: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"table": self.table, "primary_key": self.primary_key, "columns": list(self.columns)}


# The guide's schema (Step 4): the coinflip platform's custodial and escrow secrets.
COINFLIP_TARGETS: tuple[Target, ...] = (
    Target("users", "user_id", ("encrypted_secret", "referral_payout_escrow_secret")),
    Target("wagers", "wager_id", ("creator_escrow_secret", "acceptor_escrow_secret")),
)


@dataclass(frozen=True)
class Settings:
    """Everything one command needs, resolved once from flags and environment."""

    db_url: str = field(repr=False)  # may hold a password (user info or query string)
    targets: tuple[Target, ...] = COINFLIP_TARGETS
    key_id: str = DEFAULT_KEY_ID
    region: str = DEFAULT_REGION
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    max_kms_rps: float = DEFAULT_MAX_KMS_RPS
    encryption_context: bool = False  # bind each ciphertext to its table, column and key
    # A rekey run: `key_id` and `encryption_context` are the source's, these the destination's.
    to_key_id: str | None = None
    to_encryption_context: bool = False
    verify_decrypt: bool = False  # rekey: prove equality by Decrypt of old and new (opt-in)
    fernet_keys: tuple[str, ...] = field(default=(), repr=False)
    # Steering (see migration/steer.py): a target batch time (seconds; None: a fixed
    # --batch-size), and what holds the run by itself: a pause file, and on PostgreSQL
    # the replicas' lag and the active sessions.
    batch_time: float | None = None
    pause_file: str | None = None
    max_replica_lag: float | None = None
    replicas: tuple[str, ...] = field(default=(), repr=False)  # URLs: may hold a password
    max_active_sessions: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.max_kms_rps < 0:
            raise ConfigError(f"--max-kms-rps must be 0 (no limit) or more, got {self.max_kms_rps}")
        for flag, number in (("--max-kms-rps", self.max_kms_rps),
                             ("--batch-time", self.batch_time),
                             ("--max-replica-lag", self.max_replica_lag)):
            if number is not None and not math.isfinite(number):
                raise ConfigError(f"{flag} must be a finite number, got {number}")
        if self.replicas and self.max_replica_lag is None:
            raise ConfigError("--replica names a replica for --max-replica-lag to watch: add "
                              "--max-replica-lag SECONDS, or leave --replica out")


def resolve_db_url(flag: str | None, env: Mapping[str, str] = os.environ) -> str:
    """Return --db, else DATABASE_URL; refuse with a clear line when neither is set."""
    url = flag or env.get("DATABASE_URL")
    if not url:
        raise ConfigError(
            "no database given: pass --db URL or set DATABASE_URL "
            "(e.g. sqlite:///coinflip.db or postgresql+psycopg://user@host/db)"
        )
    return url


def named_fernet_keys(
    env: Mapping[str, str] = os.environ, current: str | None = None
) -> tuple[tuple[str, str], ...]:
    """(name, key) for every Fernet key, as MultiFernet tries them: the current key first,
    then each ENCRYPTION_KEY_LEGACY key (comma-separated, blanks and spaces dropped).

    The current key is `current` when given (named "the encryption_key argument": the
    application helper's override), else ENCRYPTION_KEY. Each key is named by where it
    comes from and its position, so that an error can say which one is wrong without
    showing it. Shared by the tool (`fernet_keys_from_env`) and `migration.runtime`.
    """
    named: list[tuple[str, str]] = []
    given = (current or "").strip()
    key = given or env.get("ENCRYPTION_KEY", "").strip()
    if key:
        named.append(("the encryption_key argument" if given else "ENCRYPTION_KEY", key))
    legacy = [k.strip() for k in env.get("ENCRYPTION_KEY_LEGACY", "").split(",") if k.strip()]
    named.extend((f"ENCRYPTION_KEY_LEGACY key #{i}", k) for i, k in enumerate(legacy, 1))
    return tuple(named)


def fernet_keys_from_env(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """ENCRYPTION_KEY first, then every ENCRYPTION_KEY_LEGACY key, as MultiFernet tries them."""
    return tuple(key for _, key in named_fernet_keys(env))


def load_targets(path: str | Path | None) -> tuple[Target, ...]:
    """Read targets from a TOML file, or return the built-in coinflip targets.

    The file holds ``[[targets]]`` tables with ``table``, ``primary_key`` and ``columns``.
    """
    if path is None:
        return COINFLIP_TARGETS
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found: check the --config path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be read ({type(exc).__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    entries = raw.get("targets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"config file {p} has no [[targets]]: add at least one "
            '[[targets]] with table = "...", primary_key = "...", columns = ["..."]'
        )
    targets: list[Target] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries, 1):  # in order: the first bad entry is the one named
        where = f"config file {p}, target #{i}"
        t = _target(entry, where)
        for c in t.columns:
            if (t.table, c) in seen:
                raise ConfigError(f"{where}: column {t.table}.{c} is listed twice")
            seen.add((t.table, c))
        if t.primary_key in t.columns:
            raise ConfigError(
                f"{where}: the primary key {t.table}.{t.primary_key} cannot be a target column")
        targets.append(t)
    return tuple(targets)


def _target(entry: object, where: str) -> Target:
    """One [[targets]] entry, its own fields checked (`load_targets` checks its columns
    against the entries before it, then its primary key)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not a table: use [[targets]]")
    unknown = set(entry) - {"table", "primary_key", "columns"}
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}: "
                          "allowed are table, primary_key, columns")
    table, pk, columns = entry.get("table"), entry.get("primary_key"), entry.get("columns")
    if not isinstance(table, str) or not table:
        raise ConfigError(f'{where} needs table = "name"')
    if not isinstance(pk, str) or not pk:
        raise ConfigError(f'{where} ({table}) needs primary_key = "column"')
    if (
        not isinstance(columns, list)
        or not columns
        or not all(isinstance(c, str) and c for c in columns)
    ):
        raise ConfigError(f'{where} ({table}) needs columns = ["col", ...] with at least one')
    return Target(table, pk, tuple(columns))


def targets_fingerprint(targets: Sequence[Target], encryption_context: bool = False, *,
                        to_context: bool | None = None) -> str:
    """A stable digest of what a run writes where, stored with the run so that it is never
    resumed with other targets or other encryption-context settings. `to_context`: a
    rekey run's destination context (None: not a rekey run; `encryption_context` is then
    the source's)."""
    doc = json.dumps([t.as_dict() for t in targets], sort_keys=True)
    if encryption_context:
        doc += "|encryption-context"
    if to_context is not None:
        doc += "|rekey" + ("|to-encryption-context" if to_context else "")
    return hashlib.sha256(doc.encode()).hexdigest()[:16]
