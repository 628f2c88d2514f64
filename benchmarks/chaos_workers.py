"""Chaos run: a ranged migrate on two "machines" while workers and supervisors are frozen and
killed at random, then a count of what was lost or migrated twice (both must be 0).

Each "machine" is the real CLI (`kms-migrate migrate --workers 3`) in its own UTS namespace
(`unshare --uts`, so its hostname differs, as on another host), against a throwaway
PostgreSQL server and moto's KMS server, both started here. Every few seconds one of:

  freeze   SIGSTOP a running worker, SIGCONT it 1 to 2.5 leases later
  kill     SIGKILL a running worker
  crash    SIGKILL a machine's supervisor; the same command is started again 2-5 s later

until the run completes (or --max-seconds passes; then the chaos stops and the run is let
finish). --max-kms-rps stretches the run so the chaos lasts (120/s: about 13 minutes for
50,000 values). Needs root (unshare) and the PostgreSQL server binaries.

    .venv/bin/python benchmarks/chaos_workers.py                      # the figures in docs
    .venv/bin/python benchmarks/chaos_workers.py --rows 2000 --max-kms-rps 400 --max-seconds 120
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for _v in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS",
           "AWS_KMS_KEY_ID", "DATABASE_URL"):
    os.environ.pop(_v, None)
os.environ.update({"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos-secret",
                   "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})

import boto3  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tests.helpers import make_db, snapshot  # noqa: E402
from tests.pgserver import running_pg_server  # noqa: E402

ALIAS = "alias/coinflip-master-key"
BIN = str(Path(sys.executable).parent / "kms-migrate")


@dataclass
class Machine:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        cmd = f"hostname {self.name} && exec {shlex.join([BIN, *self.args])}"
        out = self.log.open("ab")
        self.proc = subprocess.Popen(["unshare", "--uts", "sh", "-c", cmd], env=self.env,
                                     stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        self.starts += 1
        self.restart_at = None

    def reap(self) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is not None:
            self.exits.append(rc)
            self.proc = None
        return rc


def moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).read()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto server did not start") from None
            time.sleep(0.2)


def q(eng: Any, sql: str, **kw: Any) -> list[Any]:
    with eng.connect() as conn:
        return list(conn.execute(text(sql), kw))


def q_or_none(eng: Any, sql: str) -> list[Any] | None:
    """A poll that the tool's tables may not answer yet (created by the first command)."""
    try:
        return q(eng, sql)
    except Exception:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=12_600, help="rows per table (4 columns)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--lease-seconds", type=int, default=10)
    ap.add_argument("--max-kms-rps", type=float, default=120)
    ap.add_argument("--min-interval", type=float, default=2.0)
    ap.add_argument("--max-interval", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--logs", type=Path, default=Path("/tmp/kms-migrate-chaos"))
    opts = ap.parse_args()
    rng = random.Random(opts.seed)
    opts.logs.mkdir(parents=True, exist_ok=True)

    port = free_port()
    kms_proc = moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("kms", endpoint_url=endpoint)
    key = client.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    client.create_alias(AliasName=ALIAS, TargetKeyId=key["KeyId"])
    current, legacy = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    try:
        with running_pg_server() as server:
            url = server.new_database()
            print(f"building {4 * opts.rows:,} cells ...", flush=True)
            truth = make_db(url, opts.rows, current, legacy, bad_values=True)
            before = snapshot(url)
            env = {**os.environ, "ENCRYPTION_KEY": current, "ENCRYPTION_KEY_LEGACY": legacy,
                   "AWS_ENDPOINT_URL_KMS": endpoint, "DATABASE_URL": url,
                   "PYTHONUNBUFFERED": "1"}
            args = ["migrate", "--yes", "--workers", str(opts.workers), "--batch-size", "50",
                    "--lease-seconds", str(opts.lease_seconds), "--max-kms-rps",
                    str(opts.max_kms_rps), "--rows-per-range", "2000"]
            machines = [Machine(n, args, env, opts.logs / f"{n}.log")
                        for n in ("machine-a", "machine-b")]
            for m in machines:
                m.log.write_bytes(b"")
            result = chaos(url, machines, opts, rng)
            report = check(url, before, truth, client)
            report.update(result)
            report["values"] = len(truth.plaintexts)
            print(json.dumps(report, indent=2))
            ok = report["lost"] == 0 and report["migrated_twice"] == 0 and report[
                "not_migrated"] == 0
            return 0 if ok else 1
    finally:
        kms_proc.terminate()
        kms_proc.wait(10)


def chaos(url: str, machines: list[Machine], opts: argparse.Namespace,
          rng: random.Random) -> dict[str, Any]:
    eng = create_engine(url, pool_pre_ping=True)
    counts: Counter[str] = Counter()
    frozen: dict[int, float] = {}  # pid -> when to SIGCONT it
    started = time.monotonic()
    machines[0].start()
    time.sleep(1.0)
    machines[1].start()
    next_action = time.monotonic() + rng.uniform(opts.min_interval, opts.max_interval)
    last_progress, last_done, longest_stall = time.monotonic(), -1, 0.0
    chaos_on, completed = True, False

    def state() -> str | None:
        rows = q_or_none(eng, "SELECT state FROM kms_migrate_runs WHERE kind = 'migrate' "
                              "ORDER BY id DESC LIMIT 1")
        return rows[0][0] if rows else None

    while True:
        now = time.monotonic()
        for pid, when in list(frozen.items()):
            if now >= when or not chaos_on:
                _signal(pid, signal.SIGCONT)
                del frozen[pid]
        st = state()
        completed = st == "completed"
        rows = q_or_none(eng, "SELECT (SELECT count(*) FROM kms_migrate_journal) + "
                              "(SELECT count(*) FROM kms_migrate_failures)")
        done = rows[0][0] if rows else last_done
        if done != last_done:
            last_done, last_progress = done, now
        elif not completed:
            longest_stall = max(longest_stall, now - last_progress)
        for m in machines:
            if m.reap() is not None and not completed:
                m.restart_at = m.restart_at or now + rng.uniform(2, 5)
            if m.proc is None and m.restart_at is not None and now >= m.restart_at \
                    and not completed:
                m.start()
                counts["restarts"] += 1
        if completed and all(m.proc is None for m in machines):
            break
        if chaos_on and now - started > opts.max_seconds:
            chaos_on = False
            print("chaos stopped at --max-seconds; letting the run finish", flush=True)
        if now - started > opts.max_seconds + 600:
            print("the run did not finish within 10 minutes of the chaos ending", flush=True)
            break
        if chaos_on and not completed and now >= next_action:
            next_action = now + rng.uniform(opts.min_interval, opts.max_interval)
            act = rng.choices(["freeze", "kill", "crash"], weights=[4, 3, 2])[0]
            running = q_or_none(eng, "SELECT pid FROM kms_migrate_workers WHERE "
                                     "state = 'running'") or []
            workers = [pid for (pid,) in running if pid not in frozen]
            if act == "freeze" and workers:
                pid = rng.choice(workers)
                if _signal(pid, signal.SIGSTOP):
                    frozen[pid] = now + rng.uniform(1, 2.5) * opts.lease_seconds
                    counts["freezes"] += 1
            elif act == "kill" and workers:
                if _signal(rng.choice(workers), signal.SIGKILL):
                    counts["worker_kills"] += 1
            elif act == "crash":
                alive = [m for m in machines if m.proc is not None]
                if alive:
                    m = rng.choice(alive)
                    assert m.proc is not None
                    m.proc.kill()
                    counts["supervisor_kills"] += 1
        time.sleep(0.25)
    for pid in frozen:
        _signal(pid, signal.SIGCONT)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "completed": completed,
        "longest_stall_seconds": round(longest_stall, 1),
        **counts,
        "command_starts": {m.name: m.starts for m in machines},
        "command_exit_codes": {m.name: m.exits for m in machines},
        "ranges_claimed_more_than_once": q(
            eng, "SELECT count(*) FROM kms_migrate_ranges WHERE claims > 1")[0][0],
    }


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def check(url: str, before: dict[Any, Any], truth: Any, client: Any) -> dict[str, Any]:
    """Lost: a cell that is neither its original token nor a KMS ciphertext of its own
    plaintext. Migrated twice: a cell with more than one journal row."""
    eng = create_engine(url)
    after = snapshot(url)
    changed = {cell: v for cell, v in after.items() if v != before[cell]}

    def opens(value: str) -> str | None:
        try:
            blob = base64.b64decode(value)
            return str(client.decrypt(CiphertextBlob=blob)["Plaintext"].decode())
        except Exception:
            return None

    with ThreadPoolExecutor(8) as pool:
        plain = dict(zip(changed, pool.map(opens, changed.values()), strict=True))
    lost = sum(1 for cell in changed
               if cell not in truth.plaintexts or plain[cell] != truth.plaintexts[cell])
    journal = Counter(
        (t, pk, c) for t, pk, c in q(eng, "SELECT table_name, pk, column_name "
                                          "FROM kms_migrate_journal"))
    return {
        "lost": lost,
        "migrated_twice": sum(1 for n in journal.values() if n > 1),
        "not_migrated": sum(1 for cell in truth.plaintexts if cell not in changed),
        "migrated": len(changed),
        "bad_values_untouched": all(after[c] == before[c] for c in truth.bad),
    }


if __name__ == "__main__":
    sys.exit(main())
