"""Helpers shared by the tests: build a sample database, snapshot target columns, settings."""

from __future__ import annotations

import base64
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.pool import NullPool

from checkpoints import store
from checkpoints.control import Who
from migration.config import Settings
from migration.kms import KMS, RetryPolicy
from migration.sample import (
    SampleSecrets,
    coinflip_metadata,
    create_coinflip_schema,
    fill_coinflip,
)

Cell = tuple[str, str, str]  # (table, primary key as text, column)


def make_db(url: str, rows: int, current: str, legacy: str | None = None,
            *, bad_values: bool = True, seed: int = 7) -> SampleSecrets:
    """Create the coinflip schema at `url` and fill it; return the truth about each cell."""
    eng = create_engine(url)
    create_coinflip_schema(eng)
    truth = fill_coinflip(eng, rows, current, legacy, bad_values=bad_values, seed=seed)
    eng.dispose()
    return truth


def snapshot(url: str) -> dict[Cell, Any]:
    """Every target cell's exact stored value."""
    _, users, wagers = coinflip_metadata()
    eng = create_engine(url)
    out: dict[Cell, Any] = {}
    with eng.connect() as conn:
        for t, pk in ((users, "user_id"), (wagers, "wager_id")):
            cols = [c for c in t.c if c.name.endswith("secret")]
            for row in conn.execute(select(t.c[pk], *cols)):
                for c, v in zip(cols, row[1:], strict=True):
                    out[(t.name, str(row[0]), c.name)] = v
    eng.dispose()
    return out


def settings_for(url: str, current: str, legacy: str | None = None, **kw: Any) -> Settings:
    keys = (current, legacy) if legacy else (current,)
    kw.setdefault("batch_size", 25)
    kw.setdefault("concurrency", 4)
    return Settings(db_url=url, fernet_keys=keys, **kw)


def interrupted_migrate(url: str, settings: Settings, client: Any, after_batches: int = 1) -> None:
    """Run migrate until it has committed `after_batches` batches, then interrupt it the way
    Ctrl-C would (KeyboardInterrupt from the batch hook); the run is left resumable."""
    from migration.db import make_engine
    from migration.migrator import migrate
    from migration.pipeline import Hooks

    committed = [0]

    def stop(table: str, column: str, counts: object) -> None:
        committed[0] += 1
        if committed[0] == after_batches:
            raise KeyboardInterrupt

    engine = make_engine(url)
    try:
        with pytest.raises(KeyboardInterrupt):
            migrate(settings, engine=engine, kms=make_kms(client, settings),
                    hooks=Hooks(on_batch=stop))
    finally:
        engine.dispose()


def make_kms(client: Any, settings: Settings, sleep: Any = None) -> KMS:
    return KMS(client, settings.key_id, settings.region, concurrency=settings.concurrency,
               policy=RetryPolicy(max_attempts=5, sleep=sleep or (lambda s: None)))


def assert_no_leaks(texts: Iterable[str], dump: str, truth: SampleSecrets, keys: Any) -> None:
    """No plaintext (raw or base64, as botocore's debug log would show it), no Fernet key
    and no AWS secret key in any of the texts or in the bookkeeping tables' dump."""
    from tests.conftest import AWS_SECRET

    needles = {"AWS secret access key": AWS_SECRET, "ENCRYPTION_KEY": keys.current,
               "ENCRYPTION_KEY_LEGACY": keys.legacy}
    for cell, p in truth.plaintexts.items():
        needles[f"plaintext of {cell}"] = p
        needles[f"base64 plaintext of {cell}"] = base64.b64encode(p.encode()).decode()
    haystacks = {f"output #{i}": t for i, t in enumerate(texts)}
    haystacks["bookkeeping tables"] = dump
    for where, hay in haystacks.items():
        for what, needle in needles.items():
            assert needle not in hay, f"{what} leaked into {where}"


def bookkeeping_tables(url: str) -> list[str]:
    """The kms_migrate_* tables at `url`, sorted (NullPool: no connection is kept)."""
    eng = create_engine(url, poolclass=NullPool)
    try:
        return sorted(t for t in inspect(eng).get_table_names() if t.startswith("kms_migrate"))
    finally:
        eng.dispose()


def dump_bookkeeping(url: str, skip: Iterable[str] = ()) -> str:
    """Every row of every kms_migrate_* table but those in `skip`, as text (each value as
    str(), not repr(), so that a leaked value shows as it is, not escaped)."""
    eng = create_engine(url, poolclass=NullPool)
    parts: list[str] = []
    skipped = set(skip)
    try:
        with eng.connect() as conn:
            for t in (t for t in bookkeeping_tables(url) if t not in skipped):
                parts.append(f"== {t}")
                for row in conn.execute(text(f'SELECT * FROM "{t}"')):
                    parts.append(" | ".join(map(str, row)))
    finally:
        eng.dispose()
    return "\n".join(parts)


def journal_cells(url: str) -> Counter[Cell]:
    """How many journal rows in status migrated each cell has; empty before the bookkeeping
    tables exist (a run refused up front writes nothing at all)."""
    from checkpoints.tables import journal

    eng = create_engine(url)
    try:
        if not inspect(eng).has_table("kms_migrate_journal"):
            return Counter()
        with eng.connect() as conn:
            rows = conn.execute(select(journal.c.table_name, journal.c.pk,
                                       journal.c.column_name)
                                .where(journal.c.status == "migrated")).all()
    finally:
        eng.dispose()
    return Counter((t, p, c) for t, p, c in rows)


def run_migrate(settings: Settings, client: Any) -> Any:
    """migrate() as a command runs it, on an engine of its own (disposed after)."""
    from migration.db import make_engine
    from migration.migrator import migrate

    engine = make_engine(settings.db_url)
    try:
        return migrate(settings, engine=engine, kms=make_kms(client, settings))
    finally:
        engine.dispose()


def migrate_db(url: str, keys: Any, kms: Any, **kw: Any) -> Any:
    """migrate() over the coinflip database at `url` with both keys (settings_for's
    settings, `kw` on top) and the KMS of the `kms` fixture."""
    return run_migrate(settings_for(url, keys.current, keys.legacy, **kw), kms.client)


def run_cli(args: list[str], env: dict[str, str],
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess; one that runs past `timeout` fails the test."""
    from tests.conftest import kms_migrate_bin

    return subprocess.run([kms_migrate_bin(), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_clean(*texts: str, keys: Any = None) -> None:
    """No AWS secret key, no traceback and (given `keys`) no Fernet key in any text."""
    from tests.conftest import AWS_SECRET

    for t in texts:
        assert AWS_SECRET not in t and "Traceback" not in t
        if keys is not None:
            assert keys.current not in t and keys.legacy not in t


def assert_refused(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, exactly one line on stderr, nothing on stdout, no traceback, no AWS secret;
    return the line, which holds every `expected` fragment."""
    from tests.conftest import AWS_SECRET

    assert code == 2, (code, out, err)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("kms-migrate: "), line
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""
    assert AWS_SECRET not in err
    for fragment in expected:
        assert fragment in line, (fragment, line)
    return line


def assert_error_line(code: int, out: str, err: str, *expected: str) -> str:
    """assert_refused, and the line is an error: `kms-migrate: error: ...`."""
    line = assert_refused(code, out, err, *expected)
    assert line.startswith("kms-migrate: error: "), line
    return line


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Call the console entry point in-process; return (exit code, stdout, stderr) of
    this call only."""
    from migration import cli

    capsys.readouterr()  # drop what the setup (library calls, their logs) printed
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    try:
        with pytest.raises(SystemExit) as excinfo:
            cli.main(list(args))
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    code = excinfo.value.code
    assert isinstance(code, int), code
    return code, out, err


# The HTTP status and body of each KMS error as the KMS API reference gives them, for the
# in-process injector (tests/test_kms.py) and the proxy (tests/kms_proxy.py).
KMS_ERRORS: dict[str, tuple[int, str]] = {
    "ThrottlingException": (400, "Rate exceeded"),
    "KMSInternalException": (500, "An internal error occurred"),
    "DependencyTimeoutException": (503, "The system timed out while trying to fulfill the "
                                        "request"),
    "KeyUnavailableException": (500, "The request was rejected because the specified KMS key "
                                     "was not available"),
    "DisabledException": (400, "arn:aws:kms:us-east-1:123456789012:key/x is disabled."),
    "KMSInvalidStateException": (400, "arn:aws:kms:us-east-1:123456789012:key/x is pending "
                                      "deletion."),
    "AccessDeniedException": (400, "User: arn:aws:iam::123456789012:user/migrator is not "
                                   "authorized to perform: kms:Encrypt"),
    "NotFoundException": (400, "Alias arn:aws:kms:us-east-1:123456789012:"
                               "alias/coinflip-master-key is not found."),
    "InvalidCiphertextException": (400, ""),
    "IncorrectKeyException": (400, "The key ID in the request does not identify a KMS key "
                                   "that can perform this operation."),
    "ValidationException": (400, "1 validation error detected: Value at 'plaintext' failed to "
                                 "satisfy constraint: Member must have length greater than or "
                                 "equal to 1"),
    "UnrecognizedClientException": (400, "The security token included in the request is "
                                         "invalid."),
}


# A VARCHAR(270) column (issue 11, defect 11) and the plaintext size (bytes) of each row:
# the Fernet tokens fit (268, 228, 100 characters). Row 1's KMS text does not fit even with
# moto (276); row 2's fits with moto (220) but not with real AWS KMS (about 348); row 3's
# fits both ways.
VAULT_LENGTH = 270
VAULT_SIZES = {1: 143, 2: 100, 3: 10}


def make_vault(url: str, key: str, folder: Any) -> str:
    """Create table vault (id, secret VARCHAR(270)) holding Fernet tokens of VAULT_SIZES;
    return the path of a --config naming it as the only target."""
    import random

    from cryptography.fernet import Fernet
    from sqlalchemy import text

    rng = random.Random(11)
    f = Fernet(key.encode())
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text(f"CREATE TABLE vault (id INTEGER PRIMARY KEY, "
                          f"secret VARCHAR({VAULT_LENGTH}))"))
        for i, n in VAULT_SIZES.items():
            plaintext = "".join(rng.choice("abcdefghjkmnpqrstuvwxyz") for _ in range(n))
            conn.execute(text("INSERT INTO vault (id, secret) VALUES (:i, :s)"),
                         {"i": i, "s": f.encrypt(plaintext.encode()).decode()})
    eng.dispose()
    config = folder / "vault.toml"
    config.write_text('[[targets]]\ntable = "vault"\nprimary_key = "id"\ncolumns = ["secret"]\n')
    return str(config)


def vault_values(url: str) -> dict[int, str]:
    from sqlalchemy import text

    eng = create_engine(url)
    with eng.connect() as conn:
        out = {int(i): str(s) for i, s in conn.execute(text("SELECT id, secret FROM vault"))}
    eng.dispose()
    return out


WHO = Who("alice", "ops-1")  # who gives the steering commands of the in-process tests


def make_run(engine: Any, kind: str = "migrate", state: str = "running") -> int:
    """A run row of `kind` in `state` (the bookkeeping tables made first): its id."""
    store.ensure_schema(engine)
    with engine.begin() as conn:
        run = store.create_run(conn, store.NewRun(kind, 100))
        if state != "running":
            store.set_state(conn, run.id, state)
    return int(run.id)
