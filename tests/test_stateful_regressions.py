"""Minimal sequences the state machine (tests/test_stateful.py) shrank to that match none of
issue 11's fifteen listed defects, kept as plain tests through the real CLI.

Each test says the sequence it replays and the invariant it broke.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from migration.config import Target
from tests.conftest import ALIAS, Keys, KmsHandle
from tests.helpers import interrupted_migrate, run_main, settings_for


def _vault(url: str, tmp_path: Path, rows: dict[str, str | None]) -> str:
    """A one-column target table `vault` (text keys) holding `rows`; its --config file."""
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE vault (id TEXT PRIMARY KEY, s TEXT)"))
        for pk, value in rows.items():
            conn.execute(text("INSERT INTO vault (id, s) VALUES (:i, :s)"), {"i": pk, "s": value})
    eng.dispose()
    config = tmp_path / "vault.toml"
    config.write_text('[[targets]]\ntable = "vault"\nprimary_key = "id"\ncolumns = ["s"]\n')
    return str(config)


VAULT = (Target("vault", "id", ("s",)),)


def _vault_a_then_bcd(db_url: str, tmp_path: Path, env_keys: Keys, a: str) -> tuple[str, Any]:
    """`vault` with row 'a' holding the token `a` and rows 'b', 'c', 'd' good tokens under
    the current key; its --config file, and settings in batches of 2 ('a' in the first)."""
    cur = Fernet(env_keys.current.encode())
    config = _vault(db_url, tmp_path, {"a": a, **{k: cur.encrypt(k.encode()).decode()
                                                  for k in ("b", "c", "d")}})
    return config, settings_for(db_url, env_keys.current, targets=VAULT, batch_size=2)


def _kms_text(kms: KmsHandle, plaintext: bytes) -> str:
    blob = kms.client.encrypt(KeyId=ALIAS, Plaintext=plaintext)["CiphertextBlob"]
    return base64.b64encode(blob).decode()


def test_verify_names_a_value_kms_refuses_to_open_and_checks_the_rest(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    """Machine sequence: the application writes base64 of a 201-byte blob that is no
    ciphertext (KMS answers Decrypt with AccessDeniedException, as it does for a ciphertext
    of a key in another account), then `verify`. Invariant 4: one value's problem is that
    value's, named (exit 1), not a run-level stop (exit 2) that hides every other result."""
    stray = base64.b64encode(b"\x01" + b"q" * 200).decode()
    config = _vault(db_url, tmp_path, {"good": _kms_text(kms, b"secret"), "stray": stray})
    code, out, err = run_main(capsys, "verify", "--db", db_url, "--config", config)
    assert code == 1, err
    assert "vault pk=stray s:" in out
    assert "vault pk=good s:" not in out


def test_resumed_migrate_does_not_exit_0_past_a_value_written_behind_its_checkpoint(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    """Machine sequence: `migrate` stopped after one batch; the application writes a new
    Fernet token into a row the run has already passed; `migrate` again (resumes the run).
    Invariant 4: exit 0 only when nothing is left, else exit 1 naming what is left. The
    resumed run starts after its checkpoint, never sees the new token, and exits 0."""
    cur = Fernet(env_keys.current.encode())
    config = _vault(db_url, tmp_path, {k: cur.encrypt(k.encode()).decode()
                                       for k in ("a", "b", "c", "d", "e")})
    settings = settings_for(db_url, env_keys.current, targets=VAULT, batch_size=2)
    interrupted_migrate(db_url, settings, kms.client, after_batches=1)  # a, b migrated
    eng = create_engine(db_url)
    with eng.begin() as conn:  # the application, still on Fernet, writes row a again
        conn.execute(text("UPDATE vault SET s = :s WHERE id = 'a'"),
                     {"s": cur.encrypt(b"new secret").decode()})
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config, "--yes",
                              "--no-backup", "--no-progress", "--batch-size", "2")
    with eng.connect() as conn:
        left = conn.execute(text("SELECT id FROM vault WHERE s LIKE 'gAAAAA%'")).scalars().all()
    eng.dispose()
    assert "(resumed)" in out
    if code == 0:
        assert left == [], f"exit 0 with Fernet value(s) left in rows {left}"
    else:
        assert code == 1 and all(f"vault pk={pk} s:" in out for pk in left), (code, out, err)


def test_retry_failed_is_not_refused_for_tokens_it_does_not_retry(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """Machine sequence (PostgreSQL, long profile): a run records one value as failed (a
    token of an empty plaintext: it opens, KMS cannot take it); the application then writes
    a token under the legacy key, which this command's environment lacks; `migrate
    --retry-failed`. Invariant 4: exit 2 only for a run-level cause. The retry touches only
    the recorded failures, yet it was refused because the keys open none of the *other*
    tokens (the key check's sample leaves recorded failures out)."""
    cur = Fernet(env_keys.current.encode())
    legacy = Fernet(env_keys.legacy.encode())
    config = _vault(db_url, tmp_path, {"empty": cur.encrypt(b"").decode(),
                                       "good": cur.encrypt(b"secret").decode()})
    common = ["--db", db_url, "--config", config, "--yes", "--no-backup", "--no-progress"]
    code, out, err = run_main(capsys, "migrate", *common)
    assert code == 1 and "vault pk=empty s:" in out, (code, out, err)
    eng = create_engine(db_url)
    with eng.begin() as conn:  # written by the application after the run, legacy key
        conn.execute(text("INSERT INTO vault (id, s) VALUES ('late', :s)"),
                     {"s": legacy.encrypt(b"late secret").decode()})
    eng.dispose()
    monkeypatch.delenv("ENCRYPTION_KEY_LEGACY", raising=False)
    code, out, err = run_main(capsys, "migrate", *common, "--retry-failed")
    assert code == 1, (code, out, err)  # the empty plaintext fails again, named
    assert "vault pk=empty s:" in out and "vault pk=late" not in out


def test_a_failed_value_deleted_before_the_run_resumes_is_no_longer_counted(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    """Machine sequence (PostgreSQL, long profile): `migrate` stopped after one batch, which
    recorded one value as failed (a token of an empty plaintext); the application deletes
    that row; `migrate` again (resumes the run). Invariant 4: exit 0 exactly when nothing is
    left. The resumed run carried the stale failure in its counts and its failure list,
    named a row that no longer exists, and exited 1 with nothing left."""
    cur = Fernet(env_keys.current.encode())
    config, settings = _vault_a_then_bcd(db_url, tmp_path, env_keys, cur.encrypt(b"").decode())
    interrupted_migrate(db_url, settings, kms.client, after_batches=1)  # a failed, b migrated
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(text("DELETE FROM vault WHERE id = 'a'"))
    common = ["--db", db_url, "--config", config, "--yes", "--no-backup", "--no-progress"]
    code, out, err = run_main(capsys, "migrate", *common, "--batch-size", "2")
    assert "(resumed)" in out
    assert code == 0, (code, out, err)
    assert "vault pk=a" not in out
    code, out, err = run_main(capsys, "status", "--db", db_url)
    assert code == 0, (code, out, err)
    with eng.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM vault WHERE s LIKE 'gAAAAA%'")).scalar()
        recorded = conn.execute(text("SELECT count(*) FROM kms_migrate_failures")).scalar()
    eng.dispose()
    assert left == 0 and recorded == 0, (left, recorded)


def test_a_failed_value_the_application_rewrites_during_the_run_is_no_longer_counted(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    """The same within one invocation: a value fails in the first batch; before the run
    ends the application replaces it with a KMS ciphertext (its helper encrypts on write).
    Nothing is left, so exit 0; the value the run failed on no longer exists."""
    cur = Fernet(env_keys.current.encode())
    _, settings = _vault_a_then_bcd(db_url, tmp_path, env_keys, cur.encrypt(b"").decode())
    rewritten = _kms_text(kms, b"written by the app")
    url = db_url

    def app_writes(table: str, column: str, counts: object) -> None:
        eng = create_engine(url)
        with eng.begin() as conn:
            conn.execute(text("UPDATE vault SET s = :s WHERE id = 'a'"), {"s": rewritten})
        eng.dispose()

    from migration.db import make_engine
    from migration.migrator import migrate
    from migration.pipeline import Hooks
    from tests.helpers import make_kms

    engine = make_engine(db_url)
    try:
        result = migrate(settings, engine=engine, kms=make_kms(kms.client, settings),
                         hooks=Hooks(on_batch=app_writes))
    finally:
        engine.dispose()
    assert result.failures == [], result.failures
    assert sum(c.failed for c in result.columns) == 0


def test_a_retry_names_a_failure_only_an_interrupted_run_recorded(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """Machine sequence (PostgreSQL, long profile; the model was wrong, not the tool): a
    `migrate` interrupted after it recorded a failure (a token under the legacy key, which
    the environment lacks) that no output named; `rollback` (abandons that run); `migrate
    --retry-failed`. The retry takes every recorded failure, that one too, and names it,
    as it is still left: exit 1 naming only values that are left."""
    monkeypatch.delenv("ENCRYPTION_KEY_LEGACY", raising=False)
    legacy = Fernet(env_keys.legacy.encode())
    config, settings = _vault_a_then_bcd(db_url, tmp_path, env_keys,
                                         legacy.encrypt(b"old").decode())
    interrupted_migrate(db_url, settings, kms.client, after_batches=1)  # a failed, b migrated
    common = ["--db", db_url, "--yes", "--no-backup", "--no-progress"]
    code, out, err = run_main(capsys, "rollback", *common)
    assert code == 0, (code, out, err)
    code, out, err = run_main(capsys, "migrate", *common, "--config", config, "--retry-failed")
    assert code == 1, (code, out, err)
    assert "vault pk=a s:" in out
    assert all(f"vault pk={k} s:" not in out for k in ("b", "c", "d"))


def test_a_retry_does_not_name_a_failed_value_deleted_before_it_ends(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    """The stale failure, in a `--retry-failed` run: the empty plaintext fails again in the
    retry's first batch, and the application deletes that row before the retry ends. Exit 1
    names only values that exist: here none is left, so the retry names nothing."""
    cur = Fernet(env_keys.current.encode())
    _vault(db_url, tmp_path, {"a": cur.encrypt(b"").decode(), "b": cur.encrypt(b"b").decode(),
                              "c": cur.encrypt(b"").decode()})
    settings = settings_for(db_url, env_keys.current, targets=VAULT,
                            batch_size=1)
    from migration.db import make_engine
    from migration.migrator import Mode, migrate
    from migration.pipeline import Hooks
    from tests.helpers import make_kms

    engine = make_engine(db_url)
    try:
        first = migrate(settings, engine=engine, kms=make_kms(kms.client, settings))
        assert sorted(f.pk for f in first.failures) == ["a", "c"]

        def app_deletes(table: str, column: str, counts: object) -> None:
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM vault WHERE id = 'a'"))

        retry = migrate(settings, engine=engine, kms=make_kms(kms.client, settings),
                        mode=Mode(retry_failed=True), hooks=Hooks(on_batch=app_deletes))
    finally:
        engine.dispose()
    assert [f.pk for f in retry.failures] == ["c"], retry.failures
    assert retry.failed == 1


def test_a_single_process_resume_without_a_fernet_key_of_the_run_is_refused(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """Machine sequence (PostgreSQL, long profile; the model lacked issue 16's rule): a
    `migrate` started with both Fernet keys is interrupted; the legacy key is removed from
    the environment; `migrate` again. The resume is refused as a whole (exit 2, one line
    naming the key's position, never its value): resumed, it would fail every value under
    the legacy key. Nothing is written."""
    cur = Fernet(env_keys.current.encode())
    legacy = Fernet(env_keys.legacy.encode())
    config = _vault(db_url, tmp_path, {k: (legacy if k in "ac" else cur).encrypt(b"x").decode()
                                       for k in ("a", "b", "c", "d", "e")})
    settings = settings_for(db_url, env_keys.current, env_keys.legacy,
                            targets=VAULT, batch_size=2)
    interrupted_migrate(db_url, settings, kms.client, after_batches=1)
    eng = create_engine(db_url)
    with eng.connect() as conn:
        before = conn.execute(text("SELECT id, s FROM vault ORDER BY id")).all()
    monkeypatch.delenv("ENCRYPTION_KEY_LEGACY", raising=False)
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config, "--yes",
                              "--no-backup", "--no-progress", "--batch-size", "2")
    with eng.connect() as conn:
        after = conn.execute(text("SELECT id, s FROM vault ORDER BY id")).all()
        failures = conn.execute(text("SELECT count(*) FROM kms_migrate_failures")).scalar()
    eng.dispose()
    assert code == 2, (code, out, err)
    assert "key 2" in err and err.strip().count("\n") == 0, err
    assert env_keys.legacy not in err + out
    assert after == before and failures == 0
