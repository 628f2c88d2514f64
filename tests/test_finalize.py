"""finalize deletes the rollback journal once verify passes; rollback then says why it cannot.

Library tests call ``finalize()`` directly; CLI tests call ``migration.cli.main([...])``
in-process inside ``pytest.raises(SystemExit)`` with capsys, against moto's in-process KMS
(the ``kms`` fixture), which the CLI's own boto3 client talks to.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, func, select, update
from sqlalchemy import text as sql_text

import migration.finalize as fin
from checkpoints import store
from checkpoints.tables import journal, runs
from migration.config import Settings
from migration.db import make_engine
from migration.errors import ConfigError
from migration.finalize import FinalizeResult, finalize
from migration.rollback import rollback
from migration.sample import coinflip_metadata
from migration.status import collect_status
from migration.verify import verify
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    assert_error_line,
    interrupted_migrate,
    make_db,
    make_kms,
    migrate_db,
    run_main,
    settings_for,
    snapshot,
)

# -- helpers ------------------------------------------------------------------------------


def _settings(url: str, keys: Keys, **kw: Any) -> Settings:
    return settings_for(url, keys.current, keys.legacy, **kw)


def _finalize(url: str, keys: Keys, kms: KmsHandle, batch_size: int = 5000,
              **kw: Any) -> FinalizeResult:
    s = _settings(url, keys, **kw)
    return finalize(s, engine=make_engine(url), kms=make_kms(kms.client, s),
                    batch_size=batch_size)


def _journal(url: str) -> list[tuple[int, str, str]]:
    """(id, status, original token) of every journal row."""
    eng = create_engine(url)
    with eng.connect() as conn:
        rows = [(int(r.id), r.status, r.original) for r in
                conn.execute(select(journal).order_by(journal.c.id))]
    eng.dispose()
    return rows


def _runs(url: str) -> list[tuple[str, str]]:
    eng = create_engine(url)
    with eng.connect() as conn:
        out = [(r.kind, r.state) for r in conn.execute(select(runs).order_by(runs.c.id))]
    eng.dispose()
    return out


class _Terminal(io.StringIO):
    """A stdin that claims to be a terminal, with the operator's typing in it."""

    def isatty(self) -> bool:
        return True




# -- refusals -------------------------------------------------------------------------------


def test_finalize_refuses_while_verify_fails_and_deletes_nothing(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 20, keys.current, keys.legacy, bad_values=True)
    migrate_db(db_url, keys, kms)  # the corrupt, unknown-key and oversize values stay Fernet
    before, cells = _journal(db_url), snapshot(db_url)
    assert before
    with pytest.raises(ConfigError) as err:
        _finalize(db_url, keys, kms)
    msg = str(err.value)
    assert "verify did not pass (3 Fernet value(s) left, 0 undecryptable" in msg
    assert "kms-migrate verify" in msg and "nothing was deleted" in msg
    assert "\n" not in msg
    assert _journal(db_url) == before and snapshot(db_url) == cells
    assert _runs(db_url) == [("migrate", "completed")]


def test_finalize_verifies_with_the_encryption_context_it_is_given(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    migrate_db(sqlite_url, keys, kms, encryption_context=True)
    n = len(_journal(sqlite_url))
    with pytest.raises(ConfigError, match=rf"0 Fernet value\(s\) left, {n} undecryptable"):
        _finalize(sqlite_url, keys, kms)  # without the context, nothing opens
    assert len(_journal(sqlite_url)) == n
    assert _finalize(sqlite_url, keys, kms, encryption_context=True).deleted == n
    assert _journal(sqlite_url) == []


def test_finalize_refuses_while_a_migrate_run_is_unfinished(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 30, keys.current, keys.legacy, bad_values=False)
    s = _settings(db_url, keys, batch_size=5)

    interrupted_migrate(db_url, s, kms.client)
    before = _journal(db_url)
    assert before
    with pytest.raises(ConfigError) as err:
        _finalize(db_url, keys, kms)
    assert str(err.value).startswith("migrate run 1 is unfinished (interrupted): finish it")
    assert "`kms-migrate migrate`" in str(err.value)
    assert _journal(db_url) == before
    assert _runs(db_url) == [("migrate", "interrupted")]


@pytest.mark.parametrize(("kind", "how"), [("retry", "kms-migrate migrate --retry-failed"),
                                           ("rollback", "kms-migrate rollback")])
def test_finalize_refuses_while_a_retry_or_rollback_run_is_unfinished(
    sqlite_url: str, kms: KmsHandle, keys: Keys, kind: str, how: str
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    migrate_db(sqlite_url, keys, kms)
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:
        run = store.create_run(conn, store.NewRun(kind, 5, fingerprint="x"))
        store.set_state(conn, run.id, "stopped")
    eng.dispose()
    before = _journal(sqlite_url)
    with pytest.raises(ConfigError, match=f"{kind} run 2 is unfinished") as err:
        _finalize(sqlite_url, keys, kms)
    assert f"`{how}`" in str(err.value)
    assert _journal(sqlite_url) == before


def test_finalize_refuses_when_a_run_starts_while_it_verifies(
    sqlite_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    migrate_db(sqlite_url, keys, kms)
    real = fin.verify

    def verify_then_a_migrate_runs(*a: Any, **kw: Any) -> Any:
        result = real(*a, **kw)
        eng = create_engine(sqlite_url)
        with eng.begin() as conn:  # another operator's migrate, start to finish
            run = store.create_run(conn, store.NewRun("migrate", 5, fingerprint="x"))
            store.set_state(conn, run.id, "completed")
        eng.dispose()
        return result

    monkeypatch.setattr(fin, "verify", verify_then_a_migrate_runs)
    before = _journal(sqlite_url)
    with pytest.raises(ConfigError, match="run 2 started while finalize was verifying"):
        _finalize(sqlite_url, keys, kms)
    assert _journal(sqlite_url) == before
    assert [k for k, _ in _runs(sqlite_url)] == ["migrate", "migrate"]


def test_finalize_without_bookkeeping_says_so_and_creates_nothing(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 3, keys.current)
    with pytest.raises(ConfigError, match="nothing to finalize: this database has no "
                                          "kms-migrate bookkeeping"):
        _finalize(sqlite_url, keys, kms)
    eng = create_engine(sqlite_url)
    with eng.connect() as conn:
        assert not store.schema_present(conn)
    eng.dispose()


# -- finalize, then rollback ----------------------------------------------------------------


def test_finalize_deletes_every_journal_row_and_records_a_run(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 25, keys.current, keys.legacy, bad_values=False)
    migrate_db(db_url, keys, kms)
    rollback(make_engine(db_url))
    migrate_db(db_url, keys, kms)  # journal rows of both statuses now
    rows = _journal(db_url)
    assert {s for _, s, _ in rows} == {"rolled_back", "migrated"}
    cells = snapshot(db_url)
    result = _finalize(db_url, keys, kms, batch_size=7)
    assert result.verify.ok
    assert result.deleted == len(rows)
    assert result.batches == len(rows) // 7 + 1
    assert result.run_id == 4 and not result.resumed
    assert _journal(db_url) == []
    assert snapshot(db_url) == cells  # the target columns are not touched
    assert _runs(db_url) == [("migrate", "completed"), ("rollback", "completed"),
                             ("migrate", "completed"), ("finalize", "completed")]
    report = collect_status(make_engine(db_url, read_only=True))
    assert report is not None and report.journal == {}
    assert report.runs[0]["kind"] == "finalize"
    assert report.runs[0]["note"] == f"deleted {len(rows)} rollback journal row(s)"
    # The run lock is released: a second finalize has nothing left and says so in its count.
    assert _finalize(db_url, keys, kms).deleted == 0


def test_rollback_after_finalize_refuses_and_changes_nothing(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 15, keys.current, keys.legacy, bad_values=False)
    migrate_db(db_url, keys, kms)
    result = _finalize(db_url, keys, kms)
    cells, history = snapshot(db_url), _runs(db_url)
    with pytest.raises(ConfigError) as err:
        rollback(make_engine(db_url))
    msg = str(err.value)
    assert msg.startswith(f"the rollback journal was deleted by finalize (run {result.run_id}, ")
    assert " UTC): the original Fernet tokens are gone, so kms-migrate cannot roll back; " in msg
    assert "restore the backup taken before the migration" in msg and "\n" not in msg
    assert snapshot(db_url) == cells and _runs(db_url) == history


def test_an_interrupted_finalize_blocks_rollback_and_a_rerun_finishes_it(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(db_url, 20, keys.current, keys.legacy, bad_values=False)
    migrate_db(db_url, keys, kms)
    total = len(_journal(db_url))
    _interrupt_finalize(db_url, keys, kms, monkeypatch, at_batch=3)
    assert len(_journal(db_url)) == total - 10  # two batches committed, the third rolled back
    assert _runs(db_url) == [("migrate", "completed"), ("finalize", "interrupted")]
    cells = snapshot(db_url)
    with pytest.raises(ConfigError, match=r"finalize run 2 .* has not finished deleting the "
                                          r"rollback journal: .* a rollback would be partial"):
        rollback(make_engine(db_url))
    assert snapshot(db_url) == cells
    again = _finalize(db_url, keys, kms, batch_size=5)
    assert again.resumed and again.run_id == 2 and again.deleted == total - 10
    assert _journal(db_url) == []
    assert _runs(db_url) == [("migrate", "completed"), ("finalize", "completed")]


def test_migrate_after_finalize_writes_a_fresh_journal_that_rollback_uses(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 20, keys.current, keys.legacy, bad_values=False)
    migrate_db(db_url, keys, kms)
    _finalize(db_url, keys, kms)
    # The application, still on Fernet writes, stores three new secrets.
    _, users, _ = coinflip_metadata()
    pks = sorted(int(pk) for t, pk, c in truth.plaintexts
                 if t == "users" and c == "encrypted_secret")[:3]
    new = {pk: Fernet(keys.current.encode()).encrypt(f"new secret {pk}".encode()).decode()
           for pk in pks}
    eng = create_engine(db_url)
    with eng.begin() as conn:
        for pk, token in new.items():
            conn.execute(update(users).where(users.c.user_id == pk)
                         .values(encrypted_secret=token))
    eng.dispose()
    result = migrate_db(db_url, keys, kms)
    assert not result.resumed and sum(c.migrated for c in result.columns) == 3
    rows = _journal(db_url)
    assert sorted(orig for _, _, orig in rows) == sorted(new.values())
    assert {s for _, s, _ in rows} == {"migrated"}
    s = _settings(db_url, keys)
    assert verify(s, engine=make_engine(db_url, read_only=True),
                  kms=make_kms(kms.client, s)).ok
    # That journal is a real one: rollback restores exactly what it holds.
    migrated = snapshot(db_url)
    assert rollback(make_engine(db_url)).restored == 3
    after = snapshot(db_url)
    for pk, token in new.items():
        assert after[("users", str(pk), "encrypted_secret")] == token
    assert {c: v for c, v in after.items() if v not in new.values()} == {
        c: v for c, v in migrated.items() if c not in
        {("users", str(pk), "encrypted_secret") for pk in new}}


# -- the CLI --------------------------------------------------------------------------------


def test_cli_finalize_asks_even_on_sqlite_and_refuses_without_a_terminal(
    sqlite_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    make_db(sqlite_url, 10, env_keys.current, env_keys.legacy, bad_values=False)
    migrate_db(sqlite_url, env_keys, kms)
    before = _journal(sqlite_url)
    assert_error_line(*run_main(capsys, "finalize", "--db", sqlite_url),
                      "refusing to delete the rollback journal of", "without confirmation",
                      "pass --yes")
    assert _journal(sqlite_url) == before


def test_cli_finalize_takes_the_typed_word_and_nothing_else(
    sqlite_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(sqlite_url, 10, env_keys.current, env_keys.legacy, bad_values=False)
    migrate_db(sqlite_url, env_keys, kms)
    before = _journal(sqlite_url)
    monkeypatch.setattr(sys, "stdin", _Terminal("finalize\n"))
    code, out, err = run_main(capsys, "finalize", "--db", sqlite_url)
    assert code == 2 and "cancelled (you did not type FINALIZE)" in err
    assert _journal(sqlite_url) == before
    monkeypatch.setattr(sys, "stdin", _Terminal("FINALIZE\n"))
    code, out, err = run_main(capsys, "finalize", "--db", sqlite_url)
    assert code == 0, err
    assert "Type FINALIZE to proceed" in out
    assert f"deleted {len(before)} rollback journal row(s)" in out
    assert _journal(sqlite_url) == []


def test_cli_finalize_with_yes_deletes_the_journal_then_rollback_exits_2(
    db_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    make_db(db_url, 20, env_keys.current, env_keys.legacy, bad_values=False)
    migrate_db(db_url, env_keys, kms)
    rows = _journal(db_url)
    code, out, err = run_main(capsys, "finalize", "--db", db_url, "--yes",
                               "--batch-size", "10")
    assert code == 0, err
    assert out.startswith("finalize run 2: ")
    assert "verify: OK" in out
    assert f"deleted {len(rows)} rollback journal row(s) in {len(rows) // 10 + 1} batch(es)" in out
    assert "rollback is no longer possible" in out
    assert _journal(db_url) == []
    cells = snapshot(db_url)
    line = assert_error_line(*run_main(capsys, "rollback", "--db", db_url, "--yes"),
                             "the rollback journal was deleted by finalize (run 2, ",
                             "cannot roll back", "restore the backup taken before the migration")
    assert snapshot(db_url) == cells
    for text_ in (out, err, line):  # never a token
        assert not any(orig in text_ for _, _, orig in rows)
    assert _runs(db_url) == [("migrate", "completed"), ("finalize", "completed")]


def test_cli_finalize_refuses_while_verify_fails(
    sqlite_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    make_db(sqlite_url, 10, env_keys.current, env_keys.legacy, bad_values=True)
    migrate_db(sqlite_url, env_keys, kms)
    before = _journal(sqlite_url)
    assert_error_line(*run_main(capsys, "finalize", "--db", sqlite_url, "--yes"),
                      "verify did not pass (3 Fernet value(s) left", "nothing was deleted")
    assert _journal(sqlite_url) == before
    eng = create_engine(sqlite_url)
    with eng.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)
                            .where(runs.c.kind == "finalize")).scalar_one() == 0
    eng.dispose()


# -- issue 11: finalize covers what the journal holds (defects 4 and 13) -------------------


def _vaults(url: str, keys: Keys, rows: int = 6) -> dict[int, str]:
    """A second target set: vaults.seed, Fernet tokens under the current key."""
    from sqlalchemy import Column, Integer, MetaData, Table, Text, insert

    md = MetaData()
    vaults = Table("vaults", md, Column("vault_id", Integer, primary_key=True),
                   Column("seed", Text))
    eng = create_engine(url)
    md.create_all(eng)
    f = Fernet(keys.current.encode())
    tokens = {i: f.encrypt(f"vault seed {i}".encode()).decode() for i in range(1, rows + 1)}
    with eng.begin() as conn:
        conn.execute(insert(vaults), [{"vault_id": i, "seed": t} for i, t in tokens.items()])
    eng.dispose()
    return tokens


def _vaults_config(tmp_path: Any) -> str:
    path = tmp_path / "vaults.toml"
    path.write_text('[[targets]]\ntable = "vaults"\nprimary_key = "vault_id"\n'
                    'columns = ["seed"]\n')
    return str(path)


def _set_seed(url: str, vault_id: int, value: str) -> str:
    """Write a vault's seed as the application would; return what was there."""
    eng = create_engine(url)
    with eng.begin() as conn:
        old = conn.execute(sql_text("SELECT seed FROM vaults WHERE vault_id = :i"),
                           {"i": vault_id}).scalar_one()
        conn.execute(sql_text("UPDATE vaults SET seed = :v WHERE vault_id = :i"),
                     {"v": value, "i": vault_id})
    eng.dispose()
    return str(old)


def _journal_tables(url: str) -> dict[str, int]:
    out: dict[str, int] = {}
    eng = create_engine(url)
    with eng.connect() as conn:
        for t, n in conn.execute(select(journal.c.table_name, func.count())
                                 .group_by(journal.c.table_name)):
            out[t] = int(n)
    eng.dispose()
    return out


def test_cli_finalize_verifies_every_journalled_column_not_only_the_given_targets(
    db_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    make_db(db_url, 10, env_keys.current, env_keys.legacy, bad_values=False)
    _vaults(db_url, env_keys)
    config = _vaults_config(tmp_path)
    assert run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-progress")[0] == 0
    assert run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-progress",
                    "--config", config)[0] == 0
    journalled = _journal_tables(db_url)
    assert journalled["vaults"] == 6 and journalled["users"] > 0
    # The application writes a Fernet token over a migrated vault value afterwards.
    fresh = Fernet(env_keys.current.encode()).encrypt(b"rewritten by the app").decode()
    migrated = _set_seed(db_url, 3, fresh)
    cells = snapshot(db_url)
    code, out, err = run_main(capsys, "finalize", "--db", db_url, "--yes")  # no --config
    line = assert_error_line(code, out, err, "verify did not pass (1 Fernet value(s) left",
                             "vaults.seed", "nothing was deleted")
    assert fresh not in line
    assert _journal_tables(db_url) == journalled and snapshot(db_url) == cells
    # Once the vault value is right again, finalize (still without --config) verifies
    # both target sets and deletes the whole journal.
    _set_seed(db_url, 3, migrated)
    code, out, err = run_main(capsys, "finalize", "--db", db_url, "--yes")
    assert code == 0, err
    assert "vaults.seed" in out
    assert _journal_tables(db_url) == {}


def test_finalize_refuses_journal_columns_no_run_recorded(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    migrate_db(sqlite_url, keys, kms)
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:  # the run's record of its targets lost (edited by hand)
        conn.execute(update(runs).values(targets_json="[]"))
    eng.dispose()
    before = _journal(sqlite_url)
    from migration.config import COINFLIP_TARGETS

    with pytest.raises(ConfigError, match=r"users\.encrypted_secret.*nothing was deleted"):
        _finalize(sqlite_url, keys, kms, targets=COINFLIP_TARGETS[1:])  # wagers only
    assert _journal(sqlite_url) == before


def _interrupt_finalize(url: str, keys: Keys, kms: KmsHandle,
                        monkeypatch: pytest.MonkeyPatch, at_batch: int = 2) -> None:
    """Run finalize with batches of 5, interrupted (Ctrl-C) on its `at_batch`-th delete."""
    real = fin._delete_batch
    calls: list[int] = []

    def crash(*args: Any) -> int:
        calls.append(1)
        if len(calls) == at_batch:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(fin, "_delete_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        _finalize(url, keys, kms, batch_size=5)
    monkeypatch.setattr(fin, "_delete_batch", real)


def test_cli_migrate_and_retry_refuse_while_a_finalize_is_unfinished(
    db_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth = make_db(db_url, 20, env_keys.current, env_keys.legacy, bad_values=False)
    migrate_db(db_url, env_keys, kms)
    _interrupt_finalize(db_url, env_keys, kms, monkeypatch)
    # The application writes a new Fernet secret: migrate would have work to do.
    _, users, _ = coinflip_metadata()
    pk = min(int(p) for t, p, c in truth.plaintexts if t == "users")
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(update(users).where(users.c.user_id == pk).values(
            encrypted_secret=Fernet(env_keys.current.encode()).encrypt(b"new").decode()))
    eng.dispose()
    history, cells, jr = _runs(db_url), snapshot(db_url), _journal(db_url)
    for extra in ((), ("--retry-failed",)):
        assert_error_line(*run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-progress",
                                    *extra),
                          "finalize run 2 is unfinished", "kms-migrate finalize",
                          "nothing was written")
        assert _runs(db_url) == history and snapshot(db_url) == cells
        assert _journal(db_url) == jr
    assert_error_line(*run_main(capsys, "rollback", "--db", db_url, "--yes", "--no-progress"),
                      "finalize run 2", "a rollback would be partial")
    assert snapshot(db_url) == cells


def test_rollback_refuses_after_an_unfinished_finalize_whatever_ran_since(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(db_url, 20, keys.current, keys.legacy, bad_values=False)
    migrate_db(db_url, keys, kms)
    _interrupt_finalize(db_url, keys, kms, monkeypatch)
    # A migrate run recorded after it (an older kms-migrate did not refuse to start one).
    eng = create_engine(db_url)
    with eng.begin() as conn:
        run = store.create_run(conn, store.NewRun("migrate", 5, fingerprint="x"))
        store.set_state(conn, run.id, "completed")
    eng.dispose()
    cells = snapshot(db_url)
    with pytest.raises(ConfigError, match=r"finalize run 2 .* a rollback would be partial"):
        rollback(make_engine(db_url))
    assert snapshot(db_url) == cells


def test_cli_rollback_after_a_completed_finalize_says_what_stays_kms(
    sqlite_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = make_db(sqlite_url, 10, env_keys.current, env_keys.legacy, bad_values=False)
    migrate_db(sqlite_url, env_keys, kms)
    fin_run = _finalize(sqlite_url, env_keys, kms).run_id
    _, users, _ = coinflip_metadata()
    pk = min(int(p) for t, p, c in truth.plaintexts if t == "users")
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:  # the application, still on Fernet, writes one more secret
        conn.execute(update(users).where(users.c.user_id == pk).values(
            encrypted_secret=Fernet(env_keys.current.encode()).encrypt(b"late").decode()))
    eng.dispose()
    migrate_db(sqlite_url, env_keys, kms)
    code, out, err = run_main(capsys, "rollback", "--db", sqlite_url, "--yes", "--no-progress")
    assert code == 0, err
    assert f"note: values finalized by run {fin_run} (" in out
    assert "stay in KMS format" in out
