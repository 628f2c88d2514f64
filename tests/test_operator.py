"""Operator features: progress lines, the JSON report, the SQLite backup, --retry-failed,
and a Ctrl-C that stops cleanly after the batch in flight."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, select, update

from checkpoints.tables import journal, runs
from migration.progress import LineProgress
from migration.sample import coinflip_metadata
from tests.conftest import Keys, KmsHandle, MotoServer, kms_migrate_bin
from tests.helpers import assert_no_leaks, dump_bookkeeping, make_db, run_main, snapshot


def test_plain_progress_lines_come_often_at_first_then_every_30_s() -> None:
    now = [0.0]
    out = io.StringIO()
    p = LineProgress("migrate", out, clock=lambda: now[0])
    p.start("users", "encrypted_secret", 10_000)
    for _ in range(200):  # 100 rows every 0.5 s, for 100 s
        now[0] += 0.5
        p.advance("users", "encrypted_secret", 50)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 + 2  # at 5 s, 10 s, 20 s, then 50 s and 80 s
    assert lines[0].startswith("migrate users.encrypted_secret: 500/10000 rows (5.0%), 100 rows/s")
    assert "ETA 1m35s" in lines[0]


def test_report_of_a_dry_run_and_of_a_real_run(
    capsys: Any, sqlite_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    truth = make_db(sqlite_url, 30, env_keys.current, env_keys.legacy)
    dry = tmp_path / "dry.json"
    code, out, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--dry-run", "--report",
                            str(dry), "--no-progress")
    assert code == 1  # the sample's bad values fail
    rep = json.loads(dry.read_text())
    n = len(truth.plaintexts)
    assert rep["dry_run"] is True and rep["run_id"] is None
    assert rep["totals"]["migrated"] == n and rep["totals"]["failed"] == len(truth.bad)
    assert {(f["table"], f["pk"], f["column"]) for f in rep["failures"]} == set(truth.bad)
    assert rep["kms"]["requests"] == 2 * n + 1
    est = rep["estimate_for_real_run"]
    assert est["kms_requests"] == 2 * n + 1 and est["duration_seconds"] > 0
    assert est["cost"]["usd"] == pytest.approx((2 * n + 1) * 0.03 / 10_000, abs=1e-4)
    assert est["cost"]["usd_after_free_tier"] == 0  # under the 20,000 free requests
    assert "Estimated duration of the real run" in out and "Estimated KMS cost" in out

    real = tmp_path / "real.json"
    code, out, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--report",
                            str(real), "--no-backup", "--no-progress")
    rep = json.loads(real.read_text())
    assert code == 1 and rep["dry_run"] is False and rep["run_id"] == 1
    assert rep["totals"]["migrated"] == n and rep["duration_seconds"] > 0
    assert rep["cost"]["requests"] == 2 * n + 1
    assert "estimate_for_real_run" not in rep
    assert_no_leaks([dry.read_text(), real.read_text(), out], "", truth, env_keys)


def test_sqlite_is_backed_up_before_the_first_write_and_not_on_resume(
    capsys: Any, sqlite_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    make_db(sqlite_url, 20, env_keys.current, env_keys.legacy, bad_values=False)
    before = snapshot(sqlite_url)
    code, out, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-progress")
    assert code == 0
    backups = sorted(tmp_path.glob("coinflip.db.kms-migrate-backup-*.db"))
    assert len(backups) == 1 and str(backups[0]) in out
    assert snapshot(f"sqlite:///{backups[0]}") == before  # the pre-migration bytes
    assert oct(backups[0].stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(backups[0]) as c:  # taken before the tool created its tables
        names = [r[0] for r in c.execute("SELECT name FROM sqlite_master")]
    assert not [n for n in names if n.startswith("kms_migrate")]
    # --no-backup: none; a rollback takes its own.
    code, _, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-backup",
                          "--no-progress")
    assert len(list(tmp_path.glob("coinflip.db.kms-migrate-backup-*.db"))) == 1
    code, out, _ = run_main(capsys, "rollback", "--db", sqlite_url, "--yes", "--no-progress")
    assert code == 0 and "backup of" in out
    assert len(list(tmp_path.glob("coinflip.db.kms-migrate-backup-*.db"))) == 2


def test_no_backup_when_resuming_a_run(
    capsys: Any, sqlite_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    make_db(sqlite_url, 20, env_keys.current, bad_values=False)
    eng = create_engine(sqlite_url)
    run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-progress")
    with eng.begin() as conn:  # make the run look interrupted
        conn.execute(update(runs).values(state="interrupted", finished_at=None))
    eng.dispose()
    code, out, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-progress")
    assert code == 0 and "(resumed)" in out and "backup of" not in out
    assert len(list(tmp_path.glob("coinflip.db.kms-migrate-backup-*.db"))) == 1


def test_retry_failed_migrates_only_the_values_that_had_failed(
    capsys: Any, sqlite_url: str, kms: KmsHandle, keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth = make_db(sqlite_url, 30, keys.current, keys.legacy, bad_values=False)
    # Ten values under a third key that the operator forgot to configure.
    third = Fernet.generate_key().decode()
    _, users, _ = coinflip_metadata()
    eng = create_engine(sqlite_url)
    forgotten = sorted((c for c in truth.plaintexts if c[0] == "users"
                        and c[2] == "encrypted_secret"), key=lambda c: int(c[1]))[:10]
    with eng.begin() as conn:
        for cell in forgotten:
            token = Fernet(third.encode()).encrypt(truth.plaintexts[cell].encode()).decode()
            conn.execute(update(users).where(users.c.user_id == int(cell[1]))
                         .values(encrypted_secret=token))
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    code, out, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-backup",
                            "--no-progress")
    assert code == 1 and out.count("no Fernet key opens this token") == 10
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", f"{keys.legacy},{third}")  # the fix
    code, out, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-backup",
                            "--no-progress", "--retry-failed")
    assert code == 0, out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("users.encrypted_secret")]
    assert rows and rows[0][1] == "10"  # exactly the ten failed values, nothing else read
    with eng.connect() as conn:
        kinds = [r.kind for r in conn.execute(select(runs).order_by(runs.c.id))]
        migrated_by_retry = conn.execute(
            select(journal.c.pk).where(journal.c.run_id == 2)).scalars().all()
    eng.dispose()
    assert kinds == ["migrate", "retry"]
    assert sorted(migrated_by_retry) == sorted(c[1] for c in forgotten)
    after = snapshot(sqlite_url)
    assert all(kms.decrypt_text(after[c]) == truth.plaintexts[c] for c in forgotten)


def test_first_ctrl_c_finishes_the_batch_in_flight_then_exits_130(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str], tmp_path: Path,
) -> None:
    truth = make_db(sqlite_url, 400, keys.current, keys.legacy, bad_values=False)
    log = tmp_path / "log.json"
    proc = subprocess.Popen(
        [kms_migrate_bin(), "migrate", "--db", sqlite_url, "--yes", "--batch-size", "20",
         "--concurrency", "2", "--no-backup", "--log-level", "info", "--log-format", "json",
         "--log-file", str(log)],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    eng = create_engine(sqlite_url, connect_args={"timeout": 30})
    deadline = time.monotonic() + 60
    while True:  # wait until some batches are committed
        time.sleep(0.1)
        try:
            with eng.connect() as conn:
                if len(conn.execute(select(journal.c.id)).all()) >= 40:
                    break
        except Exception:  # the tables may not exist yet
            pass
        assert time.monotonic() < deadline and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping once the batch in flight has committed" in err
    assert err.strip().splitlines()[-1].startswith("kms-migrate: interrupted")
    events = [json.loads(ln) for ln in log.read_text().splitlines()]
    committed = [e for e in events if e["event"] == "batch_committed"]
    assert committed  # and the run stopped between batches, not inside one:
    with eng.connect() as conn:
        n_journal = len(conn.execute(select(journal.c.id)).all())
        state = conn.execute(select(runs.c.state)).scalar_one()
    eng.dispose()
    assert state == "interrupted"
    assert n_journal == sum(e["migrated"] for e in committed)
    assert n_journal < len(truth.plaintexts)
    assert_no_leaks([out, err, log.read_text()], dump_bookkeeping(sqlite_url), truth, keys)
    res = subprocess.run([kms_migrate_bin(), "migrate", "--db", sqlite_url, "--yes",
                          "--no-backup", "--no-progress"], env=cli_env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "(resumed)" in res.stdout


def test_demo_runs_end_to_end_and_checks_its_own_promises(
    capsys: Any, tmp_path: Path
) -> None:
    code, out, err = run_main(capsys, "demo", "--dir", str(tmp_path / "demo"), "--rows", "30")
    assert code == 0, err
    assert out.count("  ok: ") == 13  # every step's promise was checked and held
    assert "can no longer read any of them" in out and "reads every one" in out
    assert "rekey run 2" in out
    assert "demo OK" in out and (tmp_path / "demo" / "coinflip.db").is_file()


# -- issue 11, defect 8: the backup is private from its first byte, and taken under the lock

def test_sqlite_backup_is_0600_while_it_is_being_written(
    capsys: Any, sqlite_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    import migration.backup as backup_mod

    make_db(sqlite_url, 40, env_keys.current, env_keys.legacy, bad_values=False)
    real_connect = sqlite3.connect
    modes: list[int] = []

    def observe(*_: Any) -> None:  # after each page: the copy's mode as a reader sees it
        for p in tmp_path.glob("coinflip.db.kms-migrate-backup-*.db*"):
            modes.append(p.stat().st_mode & 0o777)

    class Source:  # the source connection, copying one page at a time under observation
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def backup(self, dst: sqlite3.Connection, **_: Any) -> None:
            observe()
            self.conn.backup(dst, pages=1, progress=observe)

        def close(self) -> None:
            self.conn.close()

    def connect(*args: Any, **kw: Any) -> Any:
        conn = real_connect(*args, **kw)
        return Source(conn) if kw.get("uri") else conn

    monkeypatch.setattr(backup_mod.sqlite3, "connect", connect)
    old_umask = os.umask(0o022)  # the usual umask: new files 0644
    try:
        code, _, err = run_main(capsys, "migrate", "--db", sqlite_url, "--yes",
                                "--no-progress")
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert len(modes) > 3  # observed during the copy, page by page
    assert {oct(m) for m in modes} == {"0o600"}


def test_a_refused_second_migrate_or_rollback_writes_no_backup(
    capsys: Any, sqlite_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from checkpoints.tables import lock

    make_db(sqlite_url, 10, env_keys.current, env_keys.legacy, bad_values=False)
    code, _, _ = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--no-backup",
                          "--no-progress")
    assert code == 0
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:  # a migrate running on another machine holds the lock
        conn.execute(lock.insert().values(
            name="run", token="t" * 32, run_id=None, kind="migrate", host="elsewhere",
            pid=4242, acquired_at=datetime.now(UTC), heartbeat_at=datetime.now(UTC)))
    eng.dispose()
    for cmd in ("migrate", "rollback"):
        code, out, err = run_main(capsys, cmd, "--db", sqlite_url, "--yes", "--no-progress")
        assert code == 2 and "already running" in err, (out, err)
        assert list(tmp_path.glob("coinflip.db.kms-migrate-backup-*")) == []
