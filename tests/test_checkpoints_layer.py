"""The bookkeeping layer on its own: its error tree, and the named writes that the
commands call instead of writing `kms_migrate_*` tables themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

from checkpoints import store
from checkpoints.errors import BookkeepingError, CheckpointLost, LeaseLost, LockHeld, LockLost
from checkpoints.store import BatchCounts
from checkpoints.tables import checkpoints, runs


@pytest.fixture
def eng(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    store.ensure_schema(engine)
    yield engine
    engine.dispose()


PACKAGE = Path(__file__).resolve().parent.parent / "checkpoints"


def _run(eng: Engine, kind: str = "migrate", targets: Any = (("users", "secret"),)) -> int:
    with eng.begin() as conn:
        return store.create_run(conn, kind=kind, targets=list(targets), targets_json="[]",
                                fingerprint="f", batch_size=10).id


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
        store.record_batch(c, run_id, "users", "other", last_pk="5",
                           counts=BatchCounts(migrated=5))
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
