"""Engines for the target database: URL checks, driver choice, read-only mode, safe printing."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

from .errors import ConfigError, DatabaseError

__all__ = [
    "carries_password",
    "idle_timeout_for_lease",
    "is_sqlite",
    "make_engine",
    "max_bind_params",
    "parse_url",
    "pg_session_options",
    "safe_url",
    "scrub",
    "scrub_known",
    "sqlite_path",
    "url_credentials",
]

SQLITE_BUSY_TIMEOUT = 10.0  # seconds a write waits on another writer's lock before failing
PG_LOCK_TIMEOUT = 30.0  # seconds a statement waits on a row or table lock before failing
PG_CONNECT_TIMEOUT = 10  # seconds a connection attempt may take
# Seconds a session may sit idle inside an open transaction before the server ends it.
# A process frozen mid-batch (GC pause, VM freeze, SIGSTOP) would otherwise keep its row
# locks and its share of the run lock's row until TCP gives up (hours), and no other
# worker could take its range over. Below the default lease (60 s); a ranged run's
# workers use half their lease (`idle_timeout_for_lease`).
PG_IDLE_IN_TRANSACTION_TIMEOUT = 30.0
# TCP keepalives on both ends: a machine that vanished (power, network) is noticed in
# about IDLE + INTERVAL * COUNT seconds instead of the kernels' default two hours.
PG_KEEPALIVES_IDLE = 30
PG_KEEPALIVES_INTERVAL = 10
PG_KEEPALIVES_COUNT = 3

# Bound parameters one statement may carry where the driver cannot say: PostgreSQL's wire
# protocol allows 65535. SQLite's own limit is read from the connection.
DEFAULT_MAX_PARAMS = 32767
SQLITE_OLD_MAX_PARAMS = 999  # SQLite before 3.32


def max_bind_params(conn: Connection) -> int:
    """How many bound parameters one statement may carry on this connection.

    SQLite's limit depends on its version (999 before 3.32, 32766 after) and can be
    lowered per connection, so it is read from the connection itself (Python 3.11+).
    """
    if conn.dialect.name != "sqlite":
        return DEFAULT_MAX_PARAMS
    getlimit = getattr(conn.connection.driver_connection, "getlimit", None)
    if getlimit is None:
        return SQLITE_OLD_MAX_PARAMS
    return max(1, int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)))


def parse_url(url: str) -> URL:
    """Parse a database URL, defaulting PostgreSQL to the psycopg 3 driver."""
    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(
            "the database URL is not a URL SQLAlchemy understands: use e.g. "
            "sqlite:///path/to/app.db or postgresql+psycopg://user@host:5432/dbname"
        ) from None
    if u.drivername in {"postgresql", "postgres"}:
        u = u.set(drivername="postgresql+psycopg")
    _SEEN.update(url_credentials(u))
    return u


# A query parameter whose name contains one of these (case-insensitive) may carry a
# credential: password, sslpassword, passwd, pwd, secret, token, api_key, auth...
CREDENTIAL_HINTS = ("pass", "pwd", "secret", "token", "key", "auth", "cred", "sig")
HIDDEN = "***"


def is_credential_param(name: str) -> bool:
    low = name.lower()
    return any(h in low for h in CREDENTIAL_HINTS)


def url_credentials(url: str | URL) -> list[str]:
    """Every credential the URL carries: its password and credential-bearing query values."""
    try:
        u = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return []
    found = [u.password] if u.password else []
    for name, value in u.query.items():
        if is_credential_param(name):
            found.extend(v for v in ((value,) if isinstance(value, str) else value) if v)
    return [str(v) for v in found]


def carries_password(url: str) -> bool:
    return bool(url_credentials(url))


def safe_url(url: str | URL) -> str:
    """The URL with its password and every credential-bearing query parameter hidden,
    fit for printing and logging."""
    try:
        u = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"
    query = {
        name: ((HIDDEN if isinstance(value, str) else tuple(HIDDEN for _ in value))
               if is_credential_param(name) else value)
        for name, value in u.query.items()
    }
    shown = u.set(query=query).render_as_string(hide_password=True)
    # render_as_string quotes the query values: show the mask as the mask.
    return shown.replace("%2A%2A%2A", HIDDEN)


# Every credential of every URL this process parsed: the last guard for messages that
# do not know the URL (a driver's error text, a log line).
_SEEN: set[str] = set()


def scrub_known(text: str) -> str:
    """`text` with every credential of a database URL this process used masked."""
    for value in sorted(_SEEN, key=len, reverse=True):
        text = text.replace(value, HIDDEN)
    return text


def scrub(text: str, url: str | URL) -> str:
    """`text` with every credential of `url` replaced by the mask (for driver messages)."""
    for value in sorted(url_credentials(url), key=len, reverse=True):
        text = text.replace(value, HIDDEN)
    return text


def is_sqlite(url: str | URL) -> bool:
    u = url if isinstance(url, URL) else parse_url(url)
    return u.get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL (None for an in-memory database)."""
    u = url if isinstance(url, URL) else parse_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def idle_timeout_for_lease(lease_seconds: float) -> float:
    """A worker's idle-in-transaction timeout: its frozen session is cut off well within
    the lease, so the range's next claimer does not wait on its row locks."""
    return max(1.0, min(PG_IDLE_IN_TRANSACTION_TIMEOUT, lease_seconds / 2))


def pg_session_options(*, idle_timeout: float = PG_IDLE_IN_TRANSACTION_TIMEOUT,
                       statement_timeout: float | None = None) -> str:
    """The server-side settings of every tool session on PostgreSQL (libpq `options`)."""
    settings = {
        # A row the application keeps locked makes a batch wait, boundedly, then roll back.
        "lock_timeout": int(PG_LOCK_TIMEOUT * 1000),
        "idle_in_transaction_session_timeout": int(idle_timeout * 1000),
        # The server's side of the keepalives: it drops the session of a vanished client.
        "tcp_keepalives_idle": PG_KEEPALIVES_IDLE,
        "tcp_keepalives_interval": PG_KEEPALIVES_INTERVAL,
        "tcp_keepalives_count": PG_KEEPALIVES_COUNT,
    }
    if statement_timeout is not None:
        settings["statement_timeout"] = int(statement_timeout * 1000)
    return " ".join(f"-c {k}={v}" for k, v in settings.items())


def make_engine(url: str, *, read_only: bool = False,
                idle_timeout: float = PG_IDLE_IN_TRANSACTION_TIMEOUT,
                statement_timeout: float | None = None,
                connect_timeout: int = PG_CONNECT_TIMEOUT) -> Engine:
    """An engine that has proved it can connect; read_only makes every session read-only.

    On PostgreSQL every session is bounded: `lock_timeout`, an idle-in-transaction
    timeout (`idle_timeout` seconds), TCP keepalives on both ends, and `statement_timeout`
    when given (a worker's statements are one batch's: small). A connection attempt gives
    up after `connect_timeout` seconds (libpq counts at least 2).

    A SQLite file must exist already: connecting would otherwise create an empty one and
    report a baffling "table does not exist".
    """
    u = parse_url(url)
    shown = safe_url(u)
    connect_args: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        path = sqlite_path(u)
        if path is not None and not path.is_file():
            raise ConfigError(f"SQLite database file {path} does not exist: check --db")
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT
    elif u.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = connect_timeout
        connect_args["options"] = pg_session_options(idle_timeout=idle_timeout,
                                                     statement_timeout=statement_timeout)
        # The client's side: a server or network that vanished fails the call.
        connect_args.update(keepalives=1, keepalives_idle=PG_KEEPALIVES_IDLE,
                            keepalives_interval=PG_KEEPALIVES_INTERVAL,
                            keepalives_count=PG_KEEPALIVES_COUNT)
    try:
        engine = create_engine(
            u, connect_args=connect_args, pool_pre_ping=True, hide_parameters=True
        )
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"no driver for {shown} ({scrub(str(exc), u)}): install it or fix the URL"
        ) from None
    except (ArgumentError, SQLAlchemyError, TypeError) as exc:
        raise ConfigError(f"cannot use database URL {shown}: {type(exc).__name__}") from None
    # Batch-insert journal and failure rows as multi-row INSERTs (SQLAlchemy's
    # "insertmanyvalues"), not one statement per row: SQLite's driver gives the GIL up
    # around every statement step, and with the KMS threads busy each row then waited
    # for the GIL (a 500-row journal insert took ~400 ms instead of a few).
    engine.dialect.use_insertmanyvalues_wo_returning = True
    if read_only:
        _make_read_only(engine)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            # The multi-row INSERTs must fit the connection's real limit, not the one
            # SQLAlchemy assumes from the SQLite version.
            engine.dialect.insertmanyvalues_max_parameters = min(
                engine.dialect.insertmanyvalues_max_parameters, max_bind_params(conn))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise DatabaseError(f"cannot connect to {shown}: {scrub(reason, u)}") from None
    return engine


def _make_read_only(engine: Engine) -> None:
    """Make the database itself refuse writes on every connection of this engine."""
    backend = engine.url.get_backend_name()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        if backend == "sqlite":
            cur.execute("PRAGMA query_only = ON")
        elif backend == "postgresql":
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_conn.commit()
        cur.close()
