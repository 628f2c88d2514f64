"""How a migrate run settles its failures when it ends (migrator.settle_column): what it
drops (values deleted or rewritten since they failed, conflicts included) and what every
count and reader says afterwards. Found by an adversarial review of the settle change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from migration.config import Target
from tests.conftest import Keys, KmsHandle
from tests.helpers import make_kms, run_main, settings_for
from tests.test_stateful_regressions import _vault


class DeletingKMS:
    """Real KMS; while the first batch's values are being encrypted the application
    deletes one row of that batch: its compare-and-swap finds no row, a conflict."""

    def __init__(self, inner: Any, url: str, pk: str) -> None:
        self.inner, self.url, self.pk, self.done = inner, url, pk, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def submit(self, fn: Any, items: Any) -> Any:
        if not self.done:
            self.done = True
            eng = create_engine(self.url)
            with eng.begin() as conn:
                conn.execute(text("DELETE FROM vault WHERE id = :i"), {"i": self.pk})
            eng.dispose()
        return self.inner.submit(fn, items)


def test_conflict_on_a_deleted_row_is_forgotten_from_failed_not_conflicts(
    db_url: str, kms: KmsHandle, keys: Keys, tmp_path: Path
) -> None:
    """A conflict is recorded as a failure row but counted in `conflicts`: once its row is
    gone, settling takes it off `conflicts` (it took it off `failed`: failed -1,
    conflicts 1, and an exit 1 naming nothing)."""
    cur = Fernet(keys.current.encode())
    _vault(db_url, tmp_path, {k: cur.encrypt(k.encode()).decode() for k in ("a", "b", "c")})
    settings = settings_for(db_url, keys.current, targets=(Target("vault", "id", ("s",)),),
                            batch_size=10)
    from migration.db import make_engine
    from migration.migrator import migrate

    engine = make_engine(db_url)
    try:
        result = migrate(settings, engine=engine,
                         kms=DeletingKMS(make_kms(kms.client, settings), db_url, "a"))  # type: ignore[arg-type]
        with engine.connect() as conn:
            ck = conn.execute(text(
                "SELECT failed, conflicts FROM kms_migrate_checkpoints")).one()
            left = conn.execute(text(
                "SELECT count(*) FROM vault WHERE s LIKE 'gAAAAA%'")).scalar()
    finally:
        engine.dispose()
    assert left == 0
    assert result.failures == []
    # nothing is left and nothing is named: every count of what is left must be 0
    assert (result.failed, result.conflicts) == (0, 0), (result.failed, result.conflicts)
    assert tuple(ck) == (0, 0), tuple(ck)


def test_ranged_run_counts_after_forgetting_range_failures(
    db_url: str, keys: Keys, kms: KmsHandle, monkeypatch: Any
) -> None:
    """Failures recorded on ranges, their rows deleted before the run completes: the
    checkpoint holds a negative correction; every reader must sum it with the ranges."""
    from migration import supervisor
    from migration.db import make_engine
    from migration.status import collect_status
    from migration.supervisor import Here, migrate_ranged
    from tests.helpers import make_db
    from tests.test_workers import thread_spawn

    make_db(db_url, 40, keys.current, keys.legacy, bad_values=True)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=7)
    real = supervisor._conclude

    def conclude(engine: Any, start: Any, codes: Any, bound: Any = ()) -> None:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM users WHERE user_id IN (1, 2, 3)"))
        real(engine, start, codes, bound)

    monkeypatch.setattr(supervisor, "_conclude", conclude)
    eng = make_engine(db_url)
    result = migrate_ranged(settings, engine=eng, kms=make_kms(kms.client, settings),
                            here=Here(1, rows_per_range=9,
                                      spawn=thread_spawn(settings, kms.client)))
    assert result.failures == []
    assert result.failed == 0 and result.conflicts == 0
    assert all(c.failed == 0 for c in result.columns), [
        (c.column, c.failed) for c in result.columns]
    report = collect_status(eng)
    assert report is not None
    assert all(p.failed == 0 for p in report.progress), [
        (p.column, p.failed) for p in report.progress]
    assert report.failures_total == 0


def test_cli_conflict_on_deleted_row_exits_1_naming_nothing(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path, monkeypatch: Any
) -> None:
    """Through the CLI: the application deletes a row while its batch is at KMS. Nothing
    is left in the table: exit 0 (it printed "failed -1" and exited 1 naming no value)."""
    from migration import cli

    cur = Fernet(env_keys.current.encode())
    config = _vault(db_url, tmp_path, {k: cur.encrypt(k.encode()).decode()
                                       for k in ("a", "b", "c")})
    real = cli.make_kms

    class Wrapped(DeletingKMS):
        def __enter__(self) -> Any:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(cli, "make_kms", lambda s: Wrapped(real(s), db_url, "a"))
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config, "--yes",
                              "--no-backup", "--no-progress")
    eng = create_engine(db_url)
    with eng.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM vault WHERE s LIKE 'gAAAAA%'")).scalar()
    eng.dispose()
    assert left == 0
    assert code == 0, (code, out, err)


def test_settle_forgets_thousands_of_failures(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    """1,300 recorded failures whose rows are gone: dropped in chunks, counts back to 0."""
    from tests.helpers import interrupted_migrate

    cur = Fernet(env_keys.current.encode())
    empty = cur.encrypt(b"").decode()
    rows = {f"k{i:05d}": empty for i in range(1300)}
    rows["z"] = cur.encrypt(b"z").decode()
    config = _vault(db_url, tmp_path, rows)
    settings = settings_for(db_url, env_keys.current, targets=(Target("vault", "id", ("s",)),),
                            batch_size=1200)
    interrupted_migrate(db_url, settings, kms.client, after_batches=1)
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(text("DELETE FROM vault WHERE id LIKE 'k%'"))
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config, "--yes",
                              "--no-backup", "--no-progress", "--batch-size", "1200")
    # The operator is told how many failures were dropped (a count, never redacted).
    assert "failed_values_gone" in err and "count=1200" in err and "[redacted]" not in err, err
    with eng.connect() as conn:
        recorded = conn.execute(text("SELECT count(*) FROM kms_migrate_failures")).scalar()
        failed = conn.execute(text("SELECT failed FROM kms_migrate_checkpoints")).scalar()
    eng.dispose()
    assert (code, recorded, failed) == (0, 0, 0), (code, recorded, failed, out[-500:])
