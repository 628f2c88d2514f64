"""Data and sequences that once stopped, looped or misled a run (issue 11, defects 2, 3, 6, 9
and 12): every loop ends, NULL keys are refused, the key check samples across the key
range, statements fit the database's parameter limit, conflicts are named and retried."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, create_engine, delete, event, select, text, update

from checkpoints.tables import checkpoints, runs
from migration.config import load_targets
from migration.sample import coinflip_metadata
from tests.conftest import Keys, KmsHandle, MotoServer
from tests.helpers import bookkeeping_tables, make_db, run_cli, run_main, settings_for, snapshot

# A command that loops forever is cut off here and fails its test.
LOOP_TIMEOUT = 60.0


def _retry_checkpoint(url: str) -> Any:
    eng = create_engine(url)
    with eng.connect() as conn:
        row = conn.execute(
            select(checkpoints).join(runs, runs.c.id == checkpoints.c.run_id)
            .where(runs.c.kind == "retry", checkpoints.c.table_name == "users",
                   checkpoints.c.column_name == "encrypted_secret")
        ).one()
    eng.dispose()
    return row


# -- defect 2: --retry-failed over keys deleted since ----------------------------------------

def test_retry_failed_ends_when_whole_pages_of_failed_keys_were_deleted(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str],
) -> None:
    truth = make_db(db_url, 30, keys.current, keys.legacy, bad_values=False)
    _, users, _ = coinflip_metadata()
    cells = sorted((c for c in truth.plaintexts if c[0] == "users" and c[2] == "encrypted_secret"),
                   key=lambda c: int(c[1]))
    bad = [int(c[1]) for c in cells[:10]]
    third = Fernet.generate_key()  # a key the operator forgot to configure
    eng = create_engine(db_url)
    with eng.begin() as conn:
        for pk in bad:
            token = Fernet(third).encrypt(truth.plaintexts[("users", str(pk),
                                                            "encrypted_secret")].encode())
            conn.execute(update(users).where(users.c.user_id == pk)
                         .values(encrypted_secret=token.decode()))
    common = ["--db", db_url, "--yes", "--no-backup", "--no-progress", "--batch-size", "4"]
    first = run_cli(["migrate", *common], cli_env, timeout=LOOP_TIMEOUT)
    assert first.returncode == 1, first.stdout + first.stderr
    # The application deletes the first eight failed rows: two whole pages of the key list.
    with eng.begin() as conn:
        conn.execute(delete(users).where(users.c.user_id.in_(bad[:8])))
    eng.dispose()
    env = {**cli_env, "ENCRYPTION_KEY_LEGACY": f"{keys.legacy},{third.decode()}"}  # the fix
    retry = run_cli(["migrate", "--retry-failed", *common], env, timeout=LOOP_TIMEOUT)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    after = snapshot(db_url)
    for pk in bad[8:]:
        cell = ("users", str(pk), "encrypted_secret")
        assert server_kms.decrypt_text(after[cell]) == truth.plaintexts[cell]
    ck = _retry_checkpoint(db_url)
    assert ck.done and ck.batches == 3  # ten listed keys, four a page: three batches
    assert ck.last_pk == str(bad[-1])


# -- defect 3: NULL primary keys (SQLite allows them in a non-integer PRIMARY KEY) -----------

def vault_table(url: str, tmp_path: Path, values: list[tuple[Any, str | None]],
                text_key: bool = True) -> str:
    """Create the application's own table `vaults` (key, secret) from raw SQL, as a schema
    not made by SQLAlchemy (whose primary keys are NOT NULL) would be, fill it, and return
    a --config naming it."""
    key_type = "VARCHAR(64)" if text_key else "INTEGER"
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text(f"CREATE TABLE vaults (vault_id {key_type} PRIMARY KEY, "
                          "secret TEXT)"))
        if values:
            conn.execute(text("INSERT INTO vaults (vault_id, secret) VALUES (:k, :v)"),
                         [{"k": k, "v": v} for k, v in values])
    eng.dispose()
    config = tmp_path / "vaults.toml"
    config.write_text('[[targets]]\ntable = "vaults"\nprimary_key = "vault_id"\n'
                      'columns = ["secret"]\n')
    return str(config)


def vault_values(url: str) -> dict[Any, Any]:
    eng = create_engine(url)
    with eng.connect() as conn:
        out = dict(conn.execute(text("SELECT vault_id, secret FROM vaults")).all())
    eng.dispose()
    return out


@pytest.mark.parametrize("null_rows", [5, 2], ids=["more-than-a-batch", "fewer-than-a-batch"])
def test_null_primary_keys_are_refused_up_front(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str], tmp_path: Path, null_rows: int,
) -> None:
    """More NULL-key rows than a batch looped forever (the same batch, fetched again and
    again); fewer were conflicts on every run, with exit 0. Both: refused, exit 2."""
    make_db(sqlite_url, 1, keys.current)  # the SQLite file
    f = Fernet(keys.current.encode())
    values: list[tuple[Any, str | None]] = [(None, f.encrypt(b"null-key secret").decode())
                                            for _ in range(null_rows)]
    values += [(f"v{i:02d}", f.encrypt(b"keyed secret").decode()) for i in range(10)]
    config = vault_table(sqlite_url, tmp_path, values)
    before = vault_values(sqlite_url)
    common = ["--db", sqlite_url, "--config", config, "--batch-size", "4"]
    for args in (["migrate", "--yes", "--no-progress", *common],
                 ["migrate", "--dry-run", "--no-progress", *common], ["verify", *common]):
        res = run_cli(args, cli_env, timeout=LOOP_TIMEOUT)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert re.search(rf"table vaults has {null_rows} row\(s\) whose primary key vault_id "
                         "is NULL", lines[0]), lines[0]
    assert vault_values(sqlite_url) == before
    assert bookkeeping_tables(sqlite_url) == []
    assert not list(tmp_path.glob("*.kms-migrate-backup-*"))  # no backup either: no write
    env = {**cli_env, "AWS_ENDPOINT_URL_STS": moto_server.url}
    pre = run_cli(["preflight", "--db", sqlite_url, "--config", config], env, timeout=LOOP_TIMEOUT)
    assert pre.returncode == 2, (pre.stdout, pre.stderr)
    assert re.search(rf"^FAIL  table vaults: table vaults has {null_rows} row\(s\) whose "
                     "primary key vault_id is NULL", pre.stdout, re.M), pre.stdout


# -- defect 6: the Fernet key check samples across the key range -----------------------------

def _named(out: str, table: str) -> set[str]:
    """The keys named on the failure lines of `table` (`  table pk=K column: why`)."""
    return {ln.split()[1][3:] for ln in out.splitlines() if ln.startswith(f"  {table} pk=")}


def test_unknown_key_rows_first_do_not_block_the_good_ones(
    db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """25 values under an unknown key first, 175 good ones after: the key check used to
    sample the first 20 and refuse (exit 2) migrate and even --dry-run; and once 20 or
    more were recorded as failed, every later migrate refused too."""
    good = Fernet(env_keys.current.encode())
    unknown = Fernet(Fernet.generate_key())
    values: list[tuple[Any, str | None]] = [
        (i, (unknown if i <= 25 else good).encrypt(f"secret {i}".encode()).decode())
        for i in range(1, 201)]
    config = vault_table(db_url, tmp_path, values, text_key=False)
    common = ["--db", db_url, "--config", config, "--no-progress"]
    bad = {str(i) for i in range(1, 26)}
    code, out, err = run_main(capsys, "migrate", "--dry-run", *common)
    assert code == 1, out + err
    assert _named(out, "vaults") == bad
    from migration.preflight import preflight

    checks = {c.name: c for c in preflight(settings_for(
        db_url, env_keys.current, targets=load_targets(config)), sleep=lambda s: None)}
    sample = checks["Fernet sample vaults.secret"]
    assert sample.ok is True and "opened 175 of 200 sampled" in sample.detail, sample
    code, out, err = run_main(capsys, "migrate", "--yes", "--no-backup", *common)
    assert code == 1, out + err
    assert _named(out, "vaults") == bad
    after = vault_values(db_url)
    assert all(kms.decrypt_text(after[i]) == f"secret {i}" for i in range(26, 201))
    # 25 recorded failures, and nothing else left in Fernet: the next migrate still runs
    # (and names them again) instead of refusing on them.
    code, out, err = run_main(capsys, "migrate", "--yes", "--no-backup", *common)
    assert code == 1, out + err
    assert _named(out, "vaults") == bad
    assert vault_values(db_url) == after


def test_keys_that_open_none_of_a_spread_sample_still_refuse(
    db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unknown = Fernet(Fernet.generate_key())
    values: list[tuple[Any, str | None]] = [
        (i, unknown.encrypt(b"x").decode()) for i in range(1, 301)]
    config = vault_table(db_url, tmp_path, values, text_key=False)
    for extra in (["--dry-run"], ["--yes", "--no-backup"]):
        code, out, err = run_main(capsys, "migrate", *extra, "--db", db_url, "--config", config,
                                  "--no-progress")
        assert code == 2 and "open none of the" in err, out + err
    assert bookkeeping_tables(db_url) == []


@pytest.mark.parametrize("text_key", [False, True], ids=["integer-key", "text-key"])
def test_the_key_sample_spans_the_key_range(db_url: str, tmp_path: Path, text_key: bool) -> None:
    from migration.config import Target
    from migration.reader import bind_target, spread_sample

    n = 5000
    keys = [f"k{i:05d}" if text_key else i for i in range(n)]
    vault_table(db_url, tmp_path, [(k, "gAAAAA") for k in keys], text_key=text_key)
    eng = create_engine(db_url)
    with eng.connect() as conn:
        bt = bind_target(conn, Target("vaults", "vault_id", ("secret",)))
        rows = spread_sample(conn, bt, "secret", probes=20, window=5)
    eng.dispose()
    where = sorted(keys.index(r.pk) for r in rows)
    assert len(rows) <= 100 and len(where) == len(set(where))
    assert where[0] == 0 and where[-1] > 0.9 * n  # the front, and the far end
    # Every tenth of the key range is sampled.
    assert {w * 10 // n for w in where} == set(range(10))


# -- defect 9: SQLite before 3.32 allows 999 bound parameters --------------------------------

@pytest.fixture
def sqlite_999_parameters() -> Iterator[None]:
    """Every SQLite connection opened during the test allows 999 bound parameters, as
    SQLite before 3.32 (still shipped by LTS distributions) does."""
    def lower(dbapi_conn: Any, record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    event.listen(Engine, "connect", lower)
    yield
    event.remove(Engine, "connect", lower)


def test_large_batches_fit_sqlites_old_999_parameter_limit(
    sqlite_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    sqlite_999_parameters: None,
) -> None:
    """The compare-and-swap binds 3 parameters per row: a 500-row batch stopped with "too
    many SQL variables". Migrate, retry (an IN list of 1000 keys) and rollback, each in
    batches of 1000, on a connection that allows 999."""
    make_db(sqlite_url, 1, env_keys.current)  # the SQLite file
    good = Fernet(env_keys.current.encode())
    third = Fernet.generate_key()  # a key the operator forgot to configure
    values: list[tuple[Any, str | None]] = [
        (i, (Fernet(third) if i <= 1000 else good).encrypt(f"secret {i}".encode()).decode())
        for i in range(1, 1201)]
    config = vault_table(sqlite_url, tmp_path, values, text_key=False)
    before = vault_values(sqlite_url)
    common = ["--db", sqlite_url, "--config", config, "--no-progress", "--batch-size", "500"]
    code, out, err = run_main(capsys, "migrate", "--yes", "--no-backup", *common)
    assert code == 1 and "too many SQL variables" not in out + err, out + err
    assert "Failed values (1000)" in out  # the first 100 are listed
    common[-1] = "1000"
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", f"{env_keys.legacy},{third.decode()}")  # fix
    code, out, err = run_main(capsys, "migrate", "--yes", "--no-backup", "--retry-failed",
                              *common)
    assert code == 0, out + err
    after = vault_values(sqlite_url)
    assert all(kms.decrypt_text(after[i]) == f"secret {i}" for i in range(1, 1201))
    code, out, err = run_main(capsys, "rollback", "--yes", "--no-backup", *common[:-5],
                              "--batch-size", "1000", "--no-progress")
    assert code == 0, out + err
    assert vault_values(sqlite_url) == before


# -- defect 12: conflicts are left, named, exit 1, and --retry-failed picks them up ----------

def test_conflicts_exit_1_are_named_and_retried(
    db_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value the application rewrote while it was being migrated is left as the
    application wrote it. migrate used to exit 0 with it undone, and --retry-failed did
    not see it (conflicts were not recorded)."""
    from migration.kms import KMS

    truth = make_db(db_url, 30, env_keys.current, env_keys.legacy, bad_values=False)
    pk = min(int(c[1]) for c in truth.plaintexts if c[0] == "users"
             and c[2] == "encrypted_secret")
    cell = ("users", str(pk), "encrypted_secret")
    app_token = Fernet(env_keys.current.encode()).encrypt(b"the app's new secret").decode()
    _, users, _ = coinflip_metadata()
    submit = KMS.submit
    meddled = [False]

    def meddling_submit(self: KMS, fn: Any, items: Any) -> Any:
        if not meddled[0]:  # the first batch, between its read and its write
            meddled[0] = True
            eng = create_engine(db_url)
            with eng.begin() as conn:
                conn.execute(update(users).where(users.c.user_id == pk)
                             .values(encrypted_secret=app_token))
            eng.dispose()
        return submit(self, fn, items)

    monkeypatch.setattr(KMS, "submit", meddling_submit)
    common = ["--db", db_url, "--yes", "--no-backup", "--no-progress", "--batch-size", "10"]
    code, out, err = run_main(capsys, "migrate", *common)
    assert meddled[0]
    assert code == 1, out + err  # a value is left: not 0
    assert _named(out, "users") == {str(pk)}  # and it is named
    assert "--retry-failed" in out
    assert snapshot(db_url)[cell] == app_token  # the application's write survived
    code, out, err = run_main(capsys, "migrate", "--retry-failed", *common)
    assert code == 0, out + err
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("users.encrypted_secret")]
    assert rows and rows[0][1] == "1"  # the conflicted value, migrated by the retry
    assert kms.decrypt_text(snapshot(db_url)[cell]) == "the app's new secret"
    # Resolved: nothing is left, and later runs say so.
    code, out, err = run_main(capsys, "migrate", *common)
    assert code == 0, out + err
    code, out, err = run_main(capsys, "migrate", "--retry-failed", *common)
    assert code == 0, out + err
