"""Faults the tool must survive, end to end: the real CLI in a subprocess, KMS from moto's
server mode behind a fault-injecting proxy (throttling, dead keys, keys disabled mid-run).

moto has no throttling and serves disabled or pending-deletion keys as enabled, so those
errors are injected by tests/kms_proxy.py with KMS's real error codes and HTTP statuses.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from checkpoints.tables import checkpoints, runs
from migration.kms import RetryPolicy
from tests.conftest import Keys, KmsHandle, MotoServer
from tests.helpers import (
    assert_no_leaks,
    dump_bookkeeping,
    journal_cells,
    make_db,
    run_cli,
    snapshot,
)
from tests.kms_proxy import Rule, kms_proxy

pytestmark = pytest.mark.e2e


def _changed(before: dict[Any, Any], after: dict[Any, Any]) -> set[Any]:
    return {c for c in before if before[c] != after[c]}


def test_throttling_30_percent_completes_with_bounded_retries(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str], tmp_path: Path,
) -> None:
    truth = make_db(db_url, 50, keys.current, keys.legacy, bad_values=False)
    with kms_proxy(moto_server.url) as (url, state):
        state.rules.append(Rule("ThrottlingException", p=0.3))
        env = {**cli_env, "AWS_ENDPOINT_URL_KMS": url}
        log = tmp_path / "migrate.log"
        res = run_cli(["migrate", "--db", db_url, "--yes", "--batch-size", "20",
                       "--log-level", "debug", "--log-format", "json", "--log-file", str(log)],
                      env)
    assert res.returncode == 0, res.stderr
    logged = log.read_text()
    assert '"event": "batch_committed"' in logged  # the log file really has the debug events
    assert_no_leaks([res.stdout, res.stderr, logged], dump_bookkeeping(db_url), truth, keys)
    retries = int(re.search(r"retries: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]
    injected = sum(state.injected.values())
    assert injected > 0.2 * (2 * len(truth.plaintexts))  # the proxy really throttled ~30%
    causes = Counter(json.loads(line).get("cause") for line in logged.splitlines()
                     if '"event": "kms_retry"' in line)
    assert sum(causes.values()) == retries
    # Every throttle retried once. On a loaded machine the local proxy may also drop a
    # connection now and then: retried too, and named by its transport error, never a
    # KMS code.
    assert causes["ThrottlingException"] == injected, causes
    assert all(not c or not c.endswith("Exception") for c in causes
               if c != "ThrottlingException"), causes
    calls = sum(state.forwarded.values())
    assert calls == 2 * len(truth.plaintexts) + 1  # each call succeeded exactly once
    assert retries <= calls * (RetryPolicy().max_attempts - 1)  # bounded
    after = snapshot(db_url)
    assert all(server_kms.decrypt_text(after[c]) == p for c, p in truth.plaintexts.items())


DEAD_KEY_CASES = [
    # (name, proxy rule or None, extra args, moto action, expected words on stderr)
    ("access denied", Rule("AccessDeniedException", target="Encrypt"), [], None,
     ["AccessDeniedException", "kms:Encrypt"]),
    ("disabled (injected)", Rule("DisabledException", target="Encrypt"), [], None,
     ["disabled", "enable-key"]),
    ("pending deletion (injected)", Rule("KMSInvalidStateException", target="Encrypt"), [],
     None, ["pending deletion", "cancel-key-deletion"]),
    ("disabled (describe)", None, [], "disable", ["disabled", "enable-key"]),
    ("pending deletion (describe)", None, [], "schedule_deletion",
     ["pending deletion", "cancel-key-deletion"]),
    ("alias not found", None, ["--key-id", "alias/no-such-key"], None,
     ["alias/no-such-key", "not found", "list-aliases"]),
    ("wrong region", None, ["--region", "eu-west-1"], None, ["eu-west-1", "not found"]),
]


@pytest.mark.parametrize("name,rule,extra,action,words", DEAD_KEY_CASES,
                         ids=[c[0] for c in DEAD_KEY_CASES])
def test_dead_or_wrong_key_stops_fast_and_writes_nothing(
    name: str, rule: Rule | None, extra: list[str], action: str | None, words: list[str],
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str],
) -> None:
    truth = make_db(db_url, 30, keys.current, keys.legacy, bad_values=False)
    before = snapshot(db_url)
    if action == "disable":
        server_kms.client.disable_key(KeyId=server_kms.key_id)
    elif action == "schedule_deletion":
        server_kms.client.schedule_key_deletion(KeyId=server_kms.key_id, PendingWindowInDays=7)
    with kms_proxy(moto_server.url) as (url, state):
        if rule:
            state.rules.append(rule)
        env = {**cli_env, "AWS_ENDPOINT_URL_KMS": url}
        t0 = time.monotonic()
        res = run_cli(["migrate", "--db", db_url, "--yes", "--log-level", "debug", *extra],
                      env)
        elapsed = time.monotonic() - t0
        assert_no_leaks([res.stdout, res.stderr], "", truth, keys)
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert elapsed < 15
        # Debug log events go to stderr too; the refusal itself is one line of its own.
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("kms-migrate:")]
        assert len(lines) == 1 and "Traceback" not in res.stderr
        assert res.stderr.rstrip().endswith(lines[0])
        for w in words:
            assert w.lower() in lines[0].lower(), lines[0]
        named = "alias/no-such-key" if "alias/no-such-key" in extra else "alias/coinflip-master-key"
        assert named in lines[0]
        assert snapshot(db_url) == before  # no batch half-written
        assert set(journal_cells(db_url)) == set()
        # After the fix, re-running completes (resuming the stopped run where one exists).
        state.rules.clear()
        if action == "disable":
            server_kms.client.enable_key(KeyId=server_kms.key_id)
        elif action == "schedule_deletion":
            server_kms.client.cancel_key_deletion(KeyId=server_kms.key_id)
            server_kms.client.enable_key(KeyId=server_kms.key_id)
        res2 = run_cli(["migrate", "--db", db_url, "--yes"], env)
    assert res2.returncode == 0, res2.stderr
    if rule is not None:
        assert "(resumed)" in res2.stdout  # the stopped run was resumed, not restarted
    assert set(journal_cells(db_url)) == set(truth.plaintexts)


def test_key_disabled_mid_run_stops_at_the_failing_batch_then_resumes(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str],
) -> None:
    truth = make_db(db_url, 60, keys.current, keys.legacy, bad_values=False)
    before = snapshot(db_url)
    with kms_proxy(moto_server.url) as (url, state):
        state.rules.append(Rule("DisabledException", target="Encrypt", after=45))
        env = {**cli_env, "AWS_ENDPOINT_URL_KMS": url}
        res = run_cli(["migrate", "--db", db_url, "--yes", "--batch-size", "10",
                       "--concurrency", "4", "--log-level", "debug"], env)
        assert_no_leaks([res.stdout, res.stderr], dump_bookkeeping(db_url), truth, keys)
        assert res.returncode == 2, res.stderr
        assert "disabled" in res.stderr and "Traceback" not in res.stderr
        mid = snapshot(db_url)
        changed = _changed(before, mid)
        # Whole batches only: every changed cell is journaled, the checkpoint sits on a
        # batch boundary, and every value up to it (and none after) was migrated.
        assert changed == set(journal_cells(db_url))
        eng = create_engine(db_url)
        with eng.connect() as conn:
            run = conn.execute(select(runs)).one()
            ck = conn.execute(select(checkpoints).where(
                checkpoints.c.table_name == "users",
                checkpoints.c.column_name == "encrypted_secret")).one()
        eng.dispose()
        assert run.state == "stopped"
        assert ck.last_pk is not None and int(ck.last_pk) % 10 == 0 and not ck.done
        expected = {c for c in truth.plaintexts
                    if c[0] == "users" and c[2] == "encrypted_secret"
                    and int(c[1]) <= int(ck.last_pk)}
        assert changed == expected
        assert 0 < len(changed) <= 45
        state.rules.clear()
        res2 = run_cli(["migrate", "--db", db_url, "--yes", "--batch-size", "10"], env)
    assert res2.returncode == 0, res2.stderr
    assert "(resumed)" in res2.stdout
    after = snapshot(db_url)
    assert set(journal_cells(db_url)) == set(truth.plaintexts)
    assert all(server_kms.decrypt_text(after[c]) == p for c, p in truth.plaintexts.items())
    assert all(after[c] == mid[c] for c in changed)  # committed values not re-encrypted
