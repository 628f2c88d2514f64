"""End-to-end: the real `kms-migrate` CLI in a subprocess against moto's KMS server mode.

These tests kill the tool with SIGKILL and SIGINT in the middle of a migrate and of a
rollback, and check the design's invariants on every target cell after each crash:

* a target value is always either its original Fernet token (byte for byte) or a KMS
  ciphertext of the same plaintext;
* every value the tool rewrote has a journal row holding its original token and the value
  now stored (committed with the rewrite);
* a resumed run finishes the job without re-encrypting anything twice, the application's
  own ``decrypt_secret`` (the guide's) reads every migrated value, and a rollback puts back
  every original byte;
* no plaintext, Fernet key or AWS secret ever reaches stdout, stderr or a bookkeeping table.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from migration.sample import SampleSecrets
from tests.conftest import Keys, KmsHandle, MotoServer, kms_migrate_bin
from tests.helpers import (
    Cell,
    assert_no_leaks,
    bookkeeping_tables,
    dump_bookkeeping,
    make_db,
    snapshot,
)

pytestmark = pytest.mark.e2e

ROWS = 160  # users and wagers each: 640 target cells, ~590 good secrets, 3 bad on purpose
POLL_SECONDS = 0.005
KILL_DEADLINE = 60.0


# -- running the CLI ------------------------------------------------------------------------

@dataclass
class Outputs:
    """Every stdout and stderr the CLI produced in one test, for the leak check."""

    texts: list[str] = field(default_factory=list)

    def add(self, *chunks: str) -> None:
        self.texts.extend(chunks)


@dataclass
class Done:
    rc: int
    out: str
    err: str


class Running:
    """A CLI process whose stdout/stderr go to files (a pipe could fill up and stall it)."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path, outputs: Outputs):
        n = len(list(workdir.glob("cli-*.out")))
        self.out_path = workdir / f"cli-{n}.out"
        self.err_path = workdir / f"cli-{n}.err"
        self.outputs = outputs
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [kms_migrate_bin(), *args], env=env, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> Done:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        done = Done(rc, self.out_path.read_text(), self.err_path.read_text())
        self.outputs.add(done.out, done.err)
        return done


@pytest.fixture
def outputs() -> Outputs:
    return Outputs()


@pytest.fixture
def cli(cli_env: dict[str, str], tmp_path: Path, outputs: Outputs) -> Iterator[Any]:
    """cli.start(args, env=None) -> Running; cli.run(args, env=None) -> Done."""
    workdir = tmp_path / "cli"
    workdir.mkdir()
    started: list[Running] = []

    class Cli:
        def start(self, args: list[str], env: dict[str, str] | None = None) -> Running:
            r = Running(args, env or cli_env, workdir, outputs)
            started.append(r)
            return r

        def run(self, args: list[str], env: dict[str, str] | None = None,
                timeout: float = 60) -> Done:
            return self.start(args, env).wait(timeout)

    yield Cli()
    for r in started:  # never leave a process behind, whatever happened
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


# -- reading the database from the test ---------------------------------------------------

def poll_engine(url: str) -> Engine:
    """An engine whose every connection is short-lived (NullPool): for SQLite, a poll holds
    its shared lock only for the one SELECT, so the tool's writers barely wait on it."""
    return create_engine(url, poolclass=NullPool)


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    """One value, or None while the bookkeeping tables do not exist yet."""
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()
    except DBAPIError:
        return None


def scalar_rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql)).all()]


def wait_until(running: Running, what: str, cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + KILL_DEADLINE
    while time.monotonic() < deadline:
        if cond():
            return
        if running.finished():
            done = running.wait()
            pytest.fail(f"the CLI exited (rc={done.rc}) before {what}:\n{done.out}\n{done.err}")
        time.sleep(POLL_SECONDS)
    pytest.fail(f"timed out waiting for {what}")


def kill_in_range(engine: Engine, running: Running, what: str, cond: Callable[[], bool],
                  holding: str) -> int:
    """SIGKILL a worker of `running` while it holds a range it has not finished; return
    the range. `holding` selects candidate (pid, range id) rows. The worker is frozen
    (SIGSTOP) before the check that it still holds the range, so that it cannot finish the
    range, or move to the next, between the check and the kill."""
    for _ in range(50):
        wait_until(running, what, lambda: cond() and bool(scalar_rows(engine, holding)))
        rows = scalar_rows(engine, holding)
        if not rows:
            continue
        pid, rng = rows[0]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)  # a COMMIT the worker sent just before is settled in the database
        still = scalar(engine, "SELECT count(*) FROM kms_migrate_ranges r "
                               "JOIN kms_migrate_workers w ON r.worker_id = w.id "
                               "AND w.range_id = r.id WHERE r.id = :r AND w.pid = :p "
                               "AND NOT r.done", r=rng, p=pid)
        if still:
            os.kill(pid, signal.SIGKILL)
            return int(rng)
        os.kill(pid, signal.SIGCONT)
    pytest.fail(f"no worker stayed in its range long enough to be killed: {what}")


@dataclass(frozen=True)
class JournalEntry:
    run_id: int
    cell: Cell
    original: str
    migrated: str
    status: str


def journal_entries(engine: Engine) -> list[JournalEntry]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT run_id, table_name, pk, column_name, original, migrated, status "
            "FROM kms_migrate_journal ORDER BY id"
        )).all()
    return [JournalEntry(r[0], (r[1], r[2], r[3]), r[4], r[5], r[6]) for r in rows]


def runs_of(engine: Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(  # type: ignore[misc]
            "SELECT id, kind, state FROM kms_migrate_runs ORDER BY id")).all()]


# -- the invariants -------------------------------------------------------------------------

def kms_decrypt_all(kms: KmsHandle, stored: Iterable[str]) -> dict[str, str | None]:
    """Decrypt every stored text with the moto server (None when it is not a ciphertext)."""

    def one(s: str) -> str | None:
        try:
            blob = base64.b64decode(s.encode(), validate=True)
        except (binascii.Error, ValueError):
            return None
        try:
            return str(kms.client.decrypt(CiphertextBlob=blob)["Plaintext"].decode())
        except Exception:
            return None

    values = sorted(set(stored))
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(values, pool.map(one, values), strict=True))


def check_invariant(engine: Engine, url: str, before: dict[Cell, Any], truth: SampleSecrets,
                    kms: KmsHandle) -> tuple[int, list[JournalEntry]]:
    """Every cell is its original token or a KMS ciphertext of the same plaintext, and every
    changed cell has a journal row (original -> current value). Returns the changed count."""
    now = snapshot(url)
    assert now.keys() == before.keys(), "rows appeared or disappeared"
    entries = journal_entries(engine)
    journal_by_cell: dict[Cell, list[JournalEntry]] = {}
    for e in entries:
        journal_by_cell.setdefault(e.cell, []).append(e)
    changed = {cell: v for cell, v in now.items() if v != before[cell]}
    plain = kms_decrypt_all(kms, [v for v in changed.values() if isinstance(v, str)])
    for cell, value in changed.items():
        assert cell in truth.plaintexts, f"{cell} was not a good secret but changed"
        assert isinstance(value, str) and not value.startswith("gAAAAA"), (
            f"{cell} holds neither its original token nor a KMS ciphertext")
        assert plain[value] == truth.plaintexts[cell], (
            f"{cell} holds a value that does not decrypt to its plaintext")
        assert any(e.original == before[cell] and e.migrated == value
                   for e in journal_by_cell.get(cell, [])), (
            f"{cell} was rewritten without a journal row holding its original token")
    # A journal row marked rolled back means the original is back in place.
    for e in entries:
        if e.status == "rolled_back":
            assert now[e.cell] == e.original, f"{e.cell} marked rolled back but not restored"
        assert e.original == before[e.cell], f"journal original of {e.cell} is not the original"
    return len(changed), entries


def check_checkpoints(engine: Engine, url: str, before: dict[Cell, Any],
                      truth: SampleSecrets) -> None:
    """The checkpoint never runs ahead of (nor behind) committed data: in each column, the
    good values up to the checkpoint's last primary key are migrated, the rest untouched."""
    now = snapshot(url)
    with engine.connect() as conn:
        run_id = conn.execute(text(
            "SELECT max(id) FROM kms_migrate_runs WHERE kind = 'migrate'")).scalar_one()
        cks = conn.execute(text(
            "SELECT table_name, column_name, last_pk, done FROM kms_migrate_checkpoints "
            "WHERE run_id = :r"), {"r": run_id}).all()
    assert len(cks) == 4

    def order(table: str, pk: str) -> Any:
        return int(pk) if table == "users" else pk  # users.user_id is an integer key

    for table, column, last_pk, done in cks:
        cells = [c for c in before if c[0] == table and c[2] == column]
        for cell in cells:
            covered = bool(done) or (
                last_pk is not None and order(table, cell[1]) <= order(table, last_pk))
            if cell in truth.plaintexts:
                assert (now[cell] != before[cell]) == covered, (
                    f"{cell}: migrated={now[cell] != before[cell]} but checkpoint of "
                    f"{table}.{column} is at {last_pk!r} (done={done})")
            else:
                assert now[cell] == before[cell]


# -- test 1: SIGKILL mid-migrate and mid-rollback ------------------------------------------

def test_sigkill_mid_migrate_and_mid_rollback(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer, cli: Any,
    outputs: Outputs, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = db_url
    truth = make_db(url, ROWS, keys.current, keys.legacy, bad_values=True)
    assert len(truth.bad) == 3 and truth.empty and truth.plaintexts
    before = snapshot(url)
    eng = poll_engine(url)
    common = ["--db", url, "--yes", "--batch-size", "5", "--log-level", "debug"]

    # 1. migrate, SIGKILLed once some batches committed and before the run finished.
    mig = cli.start(["migrate", *common, "--concurrency", "4"])
    # Kill once more than half is done: inside the second table (text primary keys), after
    # checkpoints of finished columns; wherever the kill lands (mid-transaction, mid-KMS).
    kill_at = len(truth.plaintexts) * 55 // 100
    wait_until(mig, f"{kill_at} journal rows were committed", lambda: (
        scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= kill_at)
    mig.signal(signal.SIGKILL)
    killed = mig.wait()
    assert killed.rc == -signal.SIGKILL
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "running")], (
        "the run finished before the kill: nothing was tested")
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert 0 < changed < len(truth.plaintexts)
    assert len(entries) == changed  # exactly one journal row per rewritten value so far
    check_checkpoints(eng, url, before, truth)

    # 2. migrate again: resumes, finishes, lists the bad values, exit 1.
    res = cli.run(["migrate", *common, "--concurrency", "4"])
    assert res.rc == 1, res.err
    assert "Traceback" not in res.err
    assert "batch_committed" in res.err  # the logs were on, so the leak check saw them
    assert "(resumed)" in res.out
    assert f"Failed values ({len(truth.bad)}), left untouched:" in res.out
    for table, pk, column in truth.bad:
        assert f"  {table} pk={pk} {column}: " in res.out
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]

    after = snapshot(url)
    for cell, value in after.items():
        if cell not in truth.plaintexts:  # bad, NULL and empty values are untouched
            assert value == before[cell], f"{cell} should have been left alone"
    # The application's own decrypt_secret (the guide's) reads every migrated value.
    monkeypatch.setenv("USE_AWS_KMS", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_server.url)
    monkeypatch.delenv("AWS_KMS_KEY_ID", raising=False)
    from tests.guide_kms_encryption import decrypt_secret

    for cell, plaintext in truth.plaintexts.items():
        assert after[cell] != before[cell], f"{cell} was not migrated"
        assert decrypt_secret(after[cell]) == plaintext, f"{cell} decrypts to something else"
    # Nothing was re-encrypted twice: one journal row per migrated cell, no other.
    entries = journal_entries(eng)
    per_cell = Counter(e.cell for e in entries if e.status == "migrated")
    assert set(per_cell) == set(truth.plaintexts)
    assert max(per_cell.values()) == 1
    assert len(entries) == len(truth.plaintexts)
    assert all(e.migrated == after[e.cell] and e.original == before[e.cell] for e in entries)
    fails = Counter(scalar_rows(eng, "SELECT table_name, pk, column_name "
                                     "FROM kms_migrate_failures"))
    assert set(fails) == set(truth.bad) and max(fails.values()) == 1
    st = cli.run(["status", "--db", url, "--json"])
    assert st.rc == 0, st.err
    status = json.loads(st.out)
    assert status["failures_total"] == len(truth.bad)
    assert [(r["kind"], r["state"]) for r in status["runs"]] == [("migrate", "completed")]

    # 3. rollback, SIGKILLed once some values were restored and before it finished.
    rb = cli.start(["rollback", *common])
    kill_at = len(truth.plaintexts) // 3
    wait_until(rb, f"{kill_at} journal rows were rolled back", lambda: (scalar(
        eng, "SELECT count(*) FROM kms_migrate_journal WHERE status = 'rolled_back'") or 0)
        >= kill_at)
    rb.signal(signal.SIGKILL)
    killed = rb.wait()
    assert killed.rc == -signal.SIGKILL
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed"),
                                                     ("rollback", "running")], (
        "the rollback finished before the kill: nothing was tested")
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    restored = sum(e.status == "rolled_back" for e in entries)
    assert 0 < restored < len(truth.plaintexts)
    assert changed == len(truth.plaintexts) - restored

    # 4. rollback again: resumes, finishes, and every byte is back.
    res = cli.run(["rollback", *common])
    assert res.rc == 0, res.err
    assert "(resumed)" in res.out
    assert snapshot(url) == before
    assert {e.status for e in journal_entries(eng)} == {"rolled_back"}

    dump = dump_bookkeeping(url)
    assert before[next(iter(truth.plaintexts))] in dump  # the dump really holds the journal
    assert_no_leaks(outputs.texts, dump, truth, keys)
    eng.dispose()


# -- test 2: dry-run writes nothing -----------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _summary_table(out: str) -> dict[str, list[int]]:
    """The per-column rows of migrate's summary table: column -> the five counts."""
    rows: dict[str, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 6 and "." in parts[0] and all(p.isdigit() for p in parts[1:]):
            rows[parts[0]] = [int(p) for p in parts[1:]]
    return rows


def _expected_counts(truth: SampleSecrets) -> dict[str, list[int]]:
    """column -> [to migrate, skipped, already kms, failed, conflicts] from the sample."""
    out: dict[str, list[int]] = {}
    for cells, slot in ((truth.plaintexts, 0), (truth.empty, 1), (truth.bad, 3)):
        for table, _, column in cells:
            out.setdefault(f"{table}.{column}", [0, 0, 0, 0, 0])[slot] += 1
    return out


def test_dry_run_changes_no_byte_and_creates_nothing(
    sqlite_url: str, tmp_path: Path, keys: Keys, server_kms: KmsHandle, cli: Any,
    outputs: Outputs,
) -> None:
    truth = make_db(sqlite_url, 60, keys.current, keys.legacy, bad_values=True)
    db = tmp_path / "coinflip.db"
    digest, files = _sha256(db), sorted(p.name for p in tmp_path.iterdir())

    res = cli.run(["migrate", "--db", sqlite_url, "--dry-run", "--batch-size", "7",
                   "--concurrency", "4", "--log-level", "debug"])

    # The sample holds values that cannot migrate, so even a dry run reports exit 1.
    assert res.rc == 1, res.err
    assert "Traceback" not in res.err
    assert "DRY RUN (nothing was written)" in res.out
    assert "would migrate" in res.out
    assert _summary_table(res.out) == _expected_counts(truth)
    assert f"Failed values ({len(truth.bad)}), left untouched:" in res.out
    for table, pk, column in truth.bad:
        assert f"  {table} pk={pk} {column}: " in res.out
    assert _sha256(db) == digest, "the dry run changed the database file"
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no -journal/-wal left behind
    assert bookkeeping_tables(sqlite_url) == []
    assert_no_leaks(outputs.texts, "", truth, keys)


# -- test 3: exit codes and one-line messages -------------------------------------------------

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_disabled_key_refuses_with_exit_2_and_writes_nothing(
    sqlite_url: str, tmp_path: Path, keys: Keys, server_kms: KmsHandle, cli: Any,
    outputs: Outputs,
) -> None:
    truth = make_db(sqlite_url, 30, keys.current, keys.legacy, bad_values=True)
    before, digest = snapshot(sqlite_url), _sha256(tmp_path / "coinflip.db")
    server_kms.client.disable_key(KeyId=server_kms.key_id)
    assert server_kms.client.describe_key(KeyId=server_kms.key_id)["KeyMetadata"][
        "KeyState"] == "Disabled"

    res = cli.run(["migrate", "--db", sqlite_url, "--yes", "--batch-size", "5",
                   "--log-level", "debug"])

    assert res.rc == 2
    line = _one_line(res.err)
    assert line.startswith("kms-migrate: error: ")
    assert "alias/coinflip-master-key" in line and "disabled" in line
    assert res.out == ""
    assert snapshot(sqlite_url) == before
    assert _sha256(tmp_path / "coinflip.db") == digest
    assert bookkeeping_tables(sqlite_url) == []
    assert_no_leaks(outputs.texts, "", truth, keys)


@pytest.mark.parametrize("unset", [("ENCRYPTION_KEY",),
                                   ("ENCRYPTION_KEY", "ENCRYPTION_KEY_LEGACY")],
                         ids=["legacy-only", "no-keys"])
def test_missing_encryption_key_refuses_with_exit_2(
    unset: tuple[str, ...], sqlite_url: str, tmp_path: Path, keys: Keys,
    server_kms: KmsHandle, cli_env: dict[str, str], cli: Any, outputs: Outputs,
) -> None:
    truth = make_db(sqlite_url, 30, keys.current, keys.legacy, bad_values=True)
    before, digest = snapshot(sqlite_url), _sha256(tmp_path / "coinflip.db")
    env = {k: v for k, v in cli_env.items() if k not in unset}

    res = cli.run(["migrate", "--db", sqlite_url, "--yes", "--log-level", "debug"], env=env)

    assert res.rc == 2, res.out + res.err
    line = _one_line(res.err)
    assert line.startswith("kms-migrate: error: ENCRYPTION_KEY is not set")
    assert res.out == ""
    assert snapshot(sqlite_url) == before
    assert _sha256(tmp_path / "coinflip.db") == digest
    assert_no_leaks(outputs.texts, "", truth, keys)


def test_sigint_exits_130_and_the_next_migrate_resumes(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer, cli: Any,
    outputs: Outputs,
) -> None:
    truth = make_db(sqlite_url, 60, keys.current, keys.legacy, bad_values=True)
    before = snapshot(sqlite_url)
    eng = poll_engine(sqlite_url)
    args = ["migrate", "--db", sqlite_url, "--yes", "--batch-size", "5", "--concurrency", "4",
            "--log-level", "debug"]

    mig = cli.start(args)
    wait_until(mig, "the first journal rows were committed",
               lambda: (scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) > 0)
    mig.signal(signal.SIGINT)
    res = mig.wait()

    assert res.rc == 130, res.err
    assert "Traceback" not in res.err
    assert res.err.strip().splitlines()[-1] == (
        "kms-migrate: interrupted; committed batches are kept, re-run the same command to "
        "resume")
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "interrupted")]
    changed, entries = check_invariant(eng, sqlite_url, before, truth, server_kms)
    assert 0 < changed < len(truth.plaintexts)
    assert len(entries) == changed
    check_checkpoints(eng, sqlite_url, before, truth)

    res = cli.run(args)
    assert res.rc == 1, res.err
    assert "(resumed)" in res.out
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]
    changed, entries = check_invariant(eng, sqlite_url, before, truth, server_kms)
    assert changed == len(truth.plaintexts) == len(entries)
    check_checkpoints(eng, sqlite_url, before, truth)
    assert len({e.cell for e in entries}) == len(entries)  # nothing migrated twice
    dump = dump_bookkeeping(sqlite_url)
    eng.dispose()
    assert_no_leaks(outputs.texts, dump, truth, keys)
