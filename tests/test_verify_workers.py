"""verify --workers: key ranges verified by a pool of processes give what one process gives.

The pool's processes cannot see moto's in-process mock, so these tests use moto in server
mode (AWS_ENDPOINT_URL_KMS), which the children inherit from the environment.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import boto3
import pytest
from sqlalchemy import create_engine, update

from migration import verify as verify_module
from migration.census import census_rows
from migration.config import Settings
from migration.db import make_engine
from migration.errors import ConfigError, FatalKMSError
from migration.sample import coinflip_metadata
from migration.verify import VerifyResult, verify
from tests.conftest import Keys, KmsHandle, MotoServer, kms_migrate_bin
from tests.helpers import (
    assert_no_leaks,
    dump_bookkeeping,
    make_db,
    make_kms,
    run_migrate,
    settings_for,
)
from tests.helpers import snapshot as take_snapshot
from tests.kms_proxy import Rule, kms_proxy

ROWS = 80  # users and wagers each: 320 target cells
CENSUS = ("kms_migrate_census",)  # the one bookkeeping table verify writes


def _counts(result: VerifyResult) -> list[tuple[str, str, int, int, int, int, int]]:
    return [(c.table, c.column, c.kms_ok, c.fernet_left, c.empty, c.undecryptable, c.other_key)
            for c in result.columns]


def _verify(settings: Settings, client: Any, **kw: Any) -> VerifyResult:
    return verify(settings, engine=make_engine(settings.db_url, read_only=True),
                  kms=make_kms(client, settings), **kw)


class _SpyPool(ProcessPoolExecutor):
    """The real pool, remembering how it was made (to check what the children are sent)."""

    made: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kw: Any) -> None:
        _SpyPool.made.append(kw)
        super().__init__(**kw)


def test_parallel_verify_matches_one_process(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_server.url)
    truth = make_db(db_url, ROWS, keys.current, keys.legacy, bad_values=True)
    assert truth.bad and truth.empty
    assert run_migrate(settings_for(db_url, keys.current, keys.legacy, concurrency=16),
                       server_kms.client).columns
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=10)

    one = _verify(settings, server_kms.client)
    _SpyPool.made.clear()
    monkeypatch.setattr(verify_module, "ProcessPoolExecutor", _SpyPool)
    log = tmp_path / "verify.log"
    par = _verify(settings, server_kms.client, workers=3, rows_per_range=25,
                  log_opts={"log_level": "info", "log_format": "json", "log_file": str(log)})

    # The bad values are there and found, the same way by both.
    assert {(t, pk, c) for t, c, pk, _ in one.problems} == set(truth.bad)
    assert sum(c.kms_ok for c in one.columns) == len(truth.plaintexts)
    assert _counts(par) == _counts(one)
    assert par.problems == one.problems  # same problems, in the same order
    assert par.kms_requests == one.kms_requests  # every child's Decrypts counted, once
    assert not par.ok and not one.ok
    # The same census: the bad values are Fernet tokens, each under the key that opens it.
    assert census_rows(par) == census_rows(one)
    assert sum(c.fernet_left for c in par.columns) == sum(
        n for c in par.columns for n in c.fernet_keys.values()) == len(truth.bad)

    # It really ran in a spawned pool of 3, with ranges of ~25 rows; the children have the
    # Fernet keys only to name the key of each Fernet token.
    [made] = _SpyPool.made
    assert made["max_workers"] == 3
    assert made["mp_context"].get_start_method() == "spawn"
    child_settings = made["initargs"][0]
    assert child_settings.fernet_keys == settings.fernet_keys
    assert child_settings.db_url == settings.db_url
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    batches = [e for e in events if e.get("event") == "batch_verified"]
    per_column: dict[tuple[str, str], int] = {}
    for e in batches:
        per_column[(e["table"], e["column"])] = per_column.get(
            (e["table"], e["column"]), 0) + e["rows"]
    assert per_column == {(c.table, c.column): ROWS for c in one.columns}
    # 8 ranges a column: 80 rows at 25 a range would be 4, but each of the 3 workers gets
    # 4 ranges a column as long as each keeps a batch (10 rows); each range is read in one
    # batch of 10, ending at its last key, but the last, open-ended one, which needs an
    # empty batch to find its end.
    assert len(batches) == (8 + 1) * 4
    assert_no_leaks([log.read_text()], dump_bookkeeping(db_url), truth, keys)


def test_parallel_verify_reports_tampered_values(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_server.url)
    truth = make_db(db_url, 60, keys.current, bad_values=False)
    settings = settings_for(db_url, keys.current, encryption_context=True, concurrency=16)
    assert run_migrate(settings, server_kms.client).columns

    cells = sorted((c for c in truth.plaintexts if c[0] == "users"
                    and c[2] == "encrypted_secret"), key=lambda c: int(c[1]))
    first, second, last = cells[0], cells[len(cells) // 2], cells[-1]
    stored = take_snapshot(db_url)
    _, users, _ = coinflip_metadata()
    eng = create_engine(db_url)
    with eng.begin() as conn:  # swap two rows' ciphertexts; garbage into the last row
        for cell, value in ((first, stored[second]), (second, stored[first]),
                            (last, "not-base64!")):
            conn.execute(update(users).where(users.c.user_id == int(cell[1]))
                         .values(encrypted_secret=value))
    eng.dispose()

    bad = _verify(settings, server_kms.client, workers=2, rows_per_range=20)
    assert not bad.ok
    flagged = {(t, pk, c): why for t, c, pk, why in bad.problems}
    assert flagged == {
        first: "KMS cannot decrypt it with this row's encryption context",
        second: "KMS cannot decrypt it with this row's encryption context",
        last: "neither a Fernet token nor base64",
    }
    assert sum(c.undecryptable for c in bad.columns) == 3
    assert sum(c.kms_ok for c in bad.columns) == len(truth.plaintexts) - 3
    assert _counts(bad) == _counts(_verify(settings, server_kms.client))


def test_fatal_kms_error_in_a_child_reaches_the_caller(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch, cli_env: dict[str, str],
) -> None:
    err = pickle.loads(pickle.dumps(FatalKMSError("one line")))
    assert type(err) is FatalKMSError and str(err) == "one line"

    make_db(sqlite_url, 30, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current)
    assert run_migrate(settings, server_kms.client).columns
    with kms_proxy(moto_server.url) as (url, state):
        state.rules.append(Rule("AccessDeniedException", target="Decrypt"))
        monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", url)
        parent = boto3.client("kms", region_name="us-east-1", endpoint_url=url)
        with pytest.raises(FatalKMSError) as excinfo:
            _verify(settings, parent, workers=2, rows_per_range=10)
        assert state.forwarded["DescribeKey"] == 1  # the parent described the key
        assert state.injected["Decrypt:AccessDeniedException"] >= 1  # children decrypted
        assert "AccessDeniedException" in str(excinfo.value)

        res = subprocess.run(
            [kms_migrate_bin(), "verify", "--db", sqlite_url, "--workers", "2",
             "--rows-per-range", "10"],
            env={**cli_env, "AWS_ENDPOINT_URL_KMS": url}, capture_output=True, text=True,
            timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kms-migrate: error: ") and "AccessDeniedException" in lines[0]
    assert "Traceback" not in res.stdout + res.stderr


def test_cli_verify_workers_ok_and_writes_only_its_census(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    truth = make_db(sqlite_url, 50, keys.current, keys.legacy, bad_values=False)
    mig = subprocess.run([kms_migrate_bin(), "migrate", "--db", sqlite_url, "--yes",
                          "--no-progress", "--no-backup", "--batch-size", "50"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert mig.returncode == 0, (mig.stdout, mig.stderr)
    db_file = Path(sqlite_url.removeprefix("sqlite:///"))
    files_before = sorted(p.name for p in db_file.parent.iterdir())
    targets_before = take_snapshot(sqlite_url)
    bookkeeping_before = dump_bookkeeping(sqlite_url, skip=CENSUS)

    res = subprocess.run([kms_migrate_bin(), "verify", "--db", sqlite_url, "--workers", "2",
                          "--rows-per-range", "30", "--batch-size", "20"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.stdout.rstrip().endswith("verify: OK"), res.stdout
    assert "Problems" not in res.stdout
    for table, column in (("users", "encrypted_secret"), ("wagers", "acceptor_escrow_secret")):
        n = sum(1 for c in truth.plaintexts if c[0] == table and c[2] == column)
        assert any(line.split()[:2] == [f"{table}.{column}", str(n)]
                   for line in res.stdout.splitlines()), res.stdout
    # KMS requests: one DescribeKey and one Decrypt per value.
    assert f"KMS requests: {len(truth.plaintexts) + 1};" in res.stdout
    assert res.stderr == ""
    # The targets are untouched; of the bookkeeping, only the census table gained rows.
    assert take_snapshot(sqlite_url) == targets_before
    assert dump_bookkeeping(sqlite_url, skip=CENSUS) == bookkeeping_before
    assert "== kms_migrate_census\n" in dump_bookkeeping(sqlite_url)
    assert "values by key (census #" in res.stdout
    assert sorted(p.name for p in db_file.parent.iterdir()) == files_before
    assert_no_leaks([res.stdout, res.stderr, mig.stdout, mig.stderr],
                    dump_bookkeeping(sqlite_url), truth, keys)
    # Sanity: the stored values really are KMS ciphertexts.
    stored = take_snapshot(sqlite_url)
    cell = next(iter(truth.plaintexts))
    assert base64.b64decode(stored[cell])
    assert server_kms.decrypt_text(stored[cell]) == truth.plaintexts[cell]


def test_each_child_gets_a_share_of_the_rate(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool initializer, run in this process: its KMS takes max_kms_rps / workers."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_server.url)
    make_db(sqlite_url, 5, keys.current, bad_values=False)
    monkeypatch.setattr(verify_module, "_child", None)
    monkeypatch.setattr(verify_module, "_child_error", None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the initializer ignores SIGINT
    monkeypatch.setattr(verify_module, "configure_from_options", lambda *a: None)
    for rps, workers, share in ((300.0, 4, 75.0), (0.0, 4, None)):
        s = settings_for(sqlite_url, keys.current, max_kms_rps=rps)
        verify_module._init_child(s, workers, server_kms.arn, {})
        assert verify_module._child_error is None
        child = verify_module._child
        assert child is not None
        limiter = child.kms.limiter
        assert (limiter.max_rate if limiter else None) == share
        assert child.kms.concurrency == s.concurrency
        child.engine.dispose()

    monkeypatch.setattr(verify_module, "_child", None)
    verify_module._init_child(settings_for(f"{sqlite_url}.missing", keys.current),
                              2, server_kms.arn, {})
    task = verify_module._Task(0, "users", "encrypted_secret", None, None)
    with pytest.raises(ConfigError, match="does not exist"):
        verify_module._verify_range(task)  # an initializer's error is each task's error


def _children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc (no psutil here)."""
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry.name))
    return kids


def _is_pool_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"multiprocessing.spawn" in b" ".join(cmd) or any(
        b"spawn_main" in part for part in cmd)


@pytest.mark.postgres
def test_a_pool_process_killed_during_verify_is_one_line_and_exit_2(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch, cli_env: dict[str, str],
) -> None:
    """A verify pool process SIGKILLed (OOM killer, an operator) mid-run: not a traceback
    and exit 1 ("values are left or broken"), but one line, exit 2, and what to do."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_server.url)
    truth = make_db(pg_url, 150, keys.current, bad_values=False)
    assert run_migrate(settings_for(pg_url, keys.current, concurrency=16),
                       server_kms.client).columns
    proc = subprocess.Popen(
        [kms_migrate_bin(), "verify", "--db", pg_url, "--workers", "2",
         "--rows-per-range", "10", "--batch-size", "5", "--max-kms-rps", "40"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: int | None = None
    deadline = time.monotonic() + 60
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            workers = [p for p in _children(proc.pid) if _is_pool_worker(p)]
            if len(workers) == 2:
                time.sleep(1.5)  # well into the ranges: initialised and decrypting
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
            else:
                time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "the pool processes were never seen"
    assert proc.returncode == 2, (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kms-migrate: error: "), err
    assert "verify process" in lines[0] and "run verify again" in lines[0], err
    assert "Traceback" not in out + err
    assert "verify: OK" not in out
    assert_no_leaks([out, err], dump_bookkeeping(pg_url), truth, keys)
