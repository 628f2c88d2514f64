"""The bookkeeping layer on its own: its error tree, and the named writes that the
commands call instead of writing `kms_migrate_*` tables themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

from checkpoints import rollback_journal, store
from checkpoints.errors import BookkeepingError, CheckpointLost, LeaseLost, LockHeld, LockLost
from checkpoints.lock import RunLock
from checkpoints.store import BatchCounts, JournalRow
from checkpoints.tables import checkpoints, journal, runs


@pytest.fixture
def eng(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    store.ensure_schema(engine)
    yield engine
    engine.dispose()


PACKAGE = Path(__file__).resolve().parent.parent / "checkpoints"


def _run(eng: Engine, kind: str = "migrate", targets: Any = (("users", "secret"),)) -> int:
    with eng.begin() as conn:
        return store.create_run(conn, store.NewRun(kind, 10, targets=list(targets),
                                                   fingerprint="f")).id


def test_the_errors_form_one_tree_and_keep_their_old_homes() -> None:
    from checkpoints.leases import LeaseLost as OldLeaseLost
    from checkpoints.lock import LockHeld as OldLockHeld
    from checkpoints.lock import LockLost as OldLockLost

    assert (OldLockHeld, OldLockLost, OldLeaseLost) == (LockHeld, LockLost, LeaseLost)
    for cls in (LockHeld, LockLost, LeaseLost, CheckpointLost):
        assert issubclass(cls, BookkeepingError)


def test_a_batch_whose_checkpoint_row_is_gone_is_refused_with_checkpoint_lost(
    eng: Engine,
) -> None:
    run_id = _run(eng)
    with pytest.raises(CheckpointLost, match=r"users\.other matched 0 rows"), eng.begin() as c:
        store.record_batch(c, run_id, "users", "other", store.Batch("5", BatchCounts(migrated=5)))
    with eng.connect() as conn:  # nothing of the refused batch was written
        row = conn.execute(select(checkpoints).where(checkpoints.c.run_id == run_id)).one()
        assert (row.batches, row.migrated, row.last_pk) == (0, 0, None)
        assert conn.execute(select(runs.c.state).where(runs.c.id == run_id)).scalar_one() \
            == "running"


def test_checkpoints_imports_nothing_of_migration() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "migration" for n in names), path.name


def test_the_schema_is_created_without_the_migration_package(tmp_path: Path) -> None:
    """checkpoints finds its alembic/ revisions itself (a checkout or an editable install
    here; `checkpoints/_alembic` in a wheel)."""
    db = tmp_path / "bare.db"
    code = (
        "import sys\n"
        "from sqlalchemy import create_engine\n"
        "from checkpoints import schema\n"
        f"engine = create_engine('sqlite:///{db}')\n"
        "schema.ensure_schema(engine)\n"
        "with engine.connect() as conn:\n"
        "    assert schema.schema_present(conn)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'migration'], 'imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _state(eng: Engine, run_id: int) -> tuple[str, str | None, bool]:
    with eng.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).one()
    return row.state, row.note, row.finished_at is not None


def test_the_run_row_writes_the_commands_call(eng: Engine) -> None:
    run_id = _run(eng)
    with eng.begin() as conn:
        store.touch_run(conn, run_id, datetime(2999, 1, 1, tzinfo=UTC))
        store.mark_ranged(conn, run_id)
        store.set_run_rate(conn, run_id, 12.5)
        run = store.get_run(conn, run_id)
    assert run is not None and run.ranged and run.max_kms_rps == 12.5
    assert run.updated_at.year == 2999

    run_lock = RunLock.acquire(eng, "migrate")
    try:
        with eng.begin() as conn:  # a worker fenced out: the run is not its to stop
            store.stop_running(conn, run_id, "Encrypt failed", lock_token="not-the-lock")
        assert _state(eng, run_id) == ("running", None, False)
        with eng.begin() as conn:
            store.stop_running(conn, run_id, "Encrypt failed", lock_token=run_lock.token)
            store.interrupt_running(conn, run_id)  # only a running run: it keeps `stopped`
        assert _state(eng, run_id) == ("stopped", "Encrypt failed", False)
    finally:
        run_lock.release(eng)

    other = _run(eng)
    with eng.begin() as conn:
        store.interrupt_running(conn, other)
    assert _state(eng, other) == ("interrupted", None, False)


def test_only_one_caller_completes_a_ranged_run(eng: Engine) -> None:
    run_id = _run(eng, targets=[("users", "a"), ("users", "b")])
    with eng.begin() as conn:
        assert store.complete_ranged(conn, run_id) is True
        assert store.complete_ranged(conn, run_id) is False
        done = conn.execute(select(checkpoints.c.done).where(checkpoints.c.run_id == run_id))
        assert [d for (d,) in done] == [True, True]
    assert _state(eng, run_id) == ("completed", None, True)


def test_the_journal_writes_of_rollback_and_finalize(eng: Engine) -> None:
    run_id = _run(eng, targets=[("users", "a"), ("users", "b")])
    with eng.begin() as conn:
        for column in ("a", "b"):
            store.record_batch(conn, run_id, "users", column, store.Batch(
                "3", BatchCounts(migrated=3), journal_rows=[
                    JournalRow(str(pk), f"fernet-{pk}", f"kms-{pk}") for pk in (1, 2, 3)]))
        ids = [i for (i,) in conn.execute(select(journal.c.id).order_by(journal.c.id))]
    rollback_id = _run(eng, kind="rollback")
    with eng.begin() as conn:
        rollback_journal.mark_replayed(conn, rollback_id, [], store.now())  # nothing to mark
        rollback_journal.mark_replayed(conn, rollback_id, [(ids[0], True), (ids[1], False)],
                                       store.now())
        rows = conn.execute(select(journal.c.status, journal.c.rollback_run_id)
                            .order_by(journal.c.id)).all()
    assert [tuple(r) for r in rows[:3]] == [
        ("rolled_back", rollback_id), ("conflict", rollback_id), ("migrated", None)]
    with eng.begin() as conn:
        # users.b verified: its rows go, and users.a's replayed ones; its last one stays.
        assert rollback_journal.delete_batch(conn, 10, [("users", "b")]) == 5
        left = conn.execute(select(journal.c.id, journal.c.status)).all()
    assert [tuple(r) for r in left] == [(ids[2], "migrated")]
