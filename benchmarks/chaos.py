"""Chaos run for ranged runs: `migrate --workers 3` on two "machines", under fire.

Two commands (the same `kms-migrate migrate --workers 3`, as two machines would run it)
work one run on a throwaway PostgreSQL server, against a local fake KMS over HTTP (Encrypt
wraps the plaintext in a marked blob, Decrypt unwraps it: a value's plaintext is checked
here without any KMS). Every few seconds, at random: a worker is frozen (SIGSTOP) for up
to 20 s and continued, a worker is SIGKILLed, or a command (a supervisor) is SIGKILLed
and started again a moment later (its workers notice their parent is gone and stop).
After --minutes of that, the chaos stops and the two commands run the run to its end.

Then every target value is checked: its original Fernet token, or a KMS ciphertext of
that very plaintext with one journal row holding the original. Printed: kills, freezes,
values migrated, values lost (must be 0), values migrated twice (must be 0), and the
longest stall (the longest time, during the chaos, without a batch committed).

    .venv/bin/python benchmarks/chaos.py                         # 50,000 values, 10 min
    .venv/bin/python benchmarks/chaos.py --rows 1500 --minutes 2 # a short rehearsal

Not collected by pytest (it lives in benchmarks/).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from migration.sample import create_coinflip_schema, fill_coinflip
from tests.helpers import snapshot
from tests.pgserver import running_pg_server

ARN = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-0000000chaos"
PREFIX = b"\x01\x02\x02\x00chaos"
BIN = str(Path(sys.executable).parent / "kms-migrate")


# -- a fake KMS over HTTP (the commands are separate processes) -----------------------------

class _KMS(BaseHTTPRequestHandler):
    calls: ClassVar[Counter[str]] = Counter()

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        op = (self.headers.get("X-Amz-Target") or "").rsplit(".", 1)[-1]
        _KMS.calls[op] += 1
        if op == "Encrypt":
            blob = PREFIX + base64.b64decode(body["Plaintext"])
            out: dict[str, Any] = {"CiphertextBlob": base64.b64encode(blob).decode(),
                                   "KeyId": ARN, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        elif op == "Decrypt":
            blob = base64.b64decode(body["CiphertextBlob"])
            out = {"Plaintext": base64.b64encode(blob[len(PREFIX):]).decode(), "KeyId": ARN,
                   "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        elif op == "DescribeKey":
            out = {"KeyMetadata": {
                "KeyId": ARN.rsplit("/", 1)[1], "Arn": ARN, "KeyState": "Enabled",
                "Enabled": True, "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT",
                "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "CreationDate": 1700000000.0,
                "AWSAccountId": "111122223333", "Origin": "AWS_KMS", "KeyManager": "CUSTOMER",
            }}
        else:
            out = {}
        payload = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("x-amzn-RequestId", "00000000-0000-4000-8000-000000000000")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def plaintext_of(stored: str) -> str | None:
    try:
        blob = base64.b64decode(stored.encode(), validate=True)
    except ValueError:
        return None
    return blob[len(PREFIX):].decode() if blob.startswith(PREFIX) else None


# -- the two machines -------------------------------------------------------------------------

class Machine:
    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.args, self.env, self.logdir = name, args, env, logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"{self.name}-{self.starts}.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([BIN, *self.args], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        self.exits.append(rc)
        self.proc = None
        return rc

    def workers(self) -> list[int]:
        """This command's worker processes (its children), from /proc."""
        if self.proc is None:
            return []
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rfind(")") + 2:].split()
                if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                    out.append(int(d.name))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=15_000,
                    help="users and wagers each; 4 target columns, ~85%% of cells secrets")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lease-seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--max-kms-rps", type=float, default=None,
                    help="the run's limit (default: one that makes the run last the chaos)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    current, legacy = Fernet.generate_key().decode(), Fernet.generate_key().decode()

    kms = ThreadingHTTPServer(("127.0.0.1", 0), _KMS)
    kms.daemon_threads = True
    threading.Thread(target=kms.serve_forever, daemon=True).start()
    logdir = Path(os.environ.get("CHAOS_LOGS", "/tmp/kms-migrate-chaos"))
    logdir.mkdir(parents=True, exist_ok=True)

    with running_pg_server() as pg:
        url = pg.new_database()
        eng = create_engine(url, poolclass=NullPool)
        create_coinflip_schema(eng)
        truth = fill_coinflip(eng, args.rows, current, legacy, bad_values=False)
        before = snapshot(url)
        print(f"{len(truth.plaintexts)} values to migrate ({len(before)} cells)", flush=True)
        env = {**os.environ, "ENCRYPTION_KEY": current, "ENCRYPTION_KEY_LEGACY": legacy,
               "AWS_ENDPOINT_URL_KMS": f"http://127.0.0.1:{kms.server_address[1]}",
               "AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos-secret",
               "AWS_REGION": "us-east-1", "AWS_KMS_KEY_ID": ARN}
        # Slow enough that the run lasts the chaos (two calls a value, Encrypt and Decrypt).
        rps = args.max_kms_rps or max(20.0, 2 * len(truth.plaintexts) / (60 * args.minutes))
        cmd = ["migrate", "--db", url, "--yes", "--workers", "3", "--batch-size", "100",
               "--max-kms-rps", f"{rps:g}",
               "--rows-per-range", "2000", "--lease-seconds", str(args.lease_seconds),
               "--no-progress", "--log-level", "warning"]
        machines = [Machine(n, cmd, env, logdir) for n in ("machine-a", "machine-b")]
        for m in machines:
            m.start()
            time.sleep(1.0)

        def journal() -> int:
            with eng.connect() as conn:
                return int(conn.execute(text(
                    "SELECT count(*) FROM kms_migrate_journal")).scalar_one())

        def run_state() -> str | None:
            try:
                with eng.connect() as conn:
                    return conn.execute(text(
                        "SELECT state FROM kms_migrate_runs ORDER BY id DESC LIMIT 1")).scalar()
            except Exception:
                return None

        counts: Counter[str] = Counter()
        frozen: dict[int, float] = {}  # pid -> when to continue it
        t0 = time.monotonic()
        chaos_until = t0 + 60 * args.minutes
        next_hit = t0 + rng.uniform(2, 6)
        last_n, last_change, longest_stall = -1, t0, 0.0
        while True:
            now = time.monotonic()
            try:
                n = journal()
            except Exception:
                n = last_n
            if n != last_n:
                last_n, last_change = n, now
            elif now < chaos_until:
                longest_stall = max(longest_stall, now - last_change)
            for pid, until in list(frozen.items()):
                if now >= until:
                    with_suppress(os.kill, pid, signal.SIGCONT)
                    del frozen[pid]
            state = run_state()
            for m in machines:
                rc = m.reap()
                if rc is not None and state != "completed":
                    counts[f"{m.name} exit {rc}"] += 1
                    m.start()  # what an operator (or systemd) does: the same command again
            if state == "completed" and not any(m.running() for m in machines):
                break
            if now < chaos_until and now >= next_hit:
                next_hit = now + rng.uniform(2, 6)
                m = rng.choice(machines)
                pids = [p for p in m.workers() if p not in frozen]
                roll = rng.random()
                if roll < 0.45 and pids:
                    pid = rng.choice(pids)
                    with_suppress(os.kill, pid, signal.SIGSTOP)
                    frozen[pid] = now + rng.uniform(1, 20)
                    counts["worker SIGSTOP"] += 1
                elif roll < 0.85 and pids:
                    with_suppress(os.kill, rng.choice(pids), signal.SIGKILL)
                    counts["worker SIGKILL"] += 1
                elif m.proc is not None:
                    with_suppress(os.kill, m.proc.pid, signal.SIGKILL)
                    counts["supervisor SIGKILL"] += 1
            if now > chaos_until + 1800:
                print("did not complete within 30 minutes of the chaos' end", flush=True)
                break
            time.sleep(0.25)
        for pid in frozen:
            with_suppress(os.kill, pid, signal.SIGCONT)
        elapsed = time.monotonic() - t0

        after = snapshot(url)
        with eng.connect() as conn:
            rows = conn.execute(text(
                "SELECT table_name, pk, column_name, original, migrated "
                "FROM kms_migrate_journal")).all()
            runs = conn.execute(text("SELECT id, state FROM kms_migrate_runs")).all()
        per_cell = Counter((t, pk, c) for t, pk, c, _, _ in rows)
        twice = sum(1 for v in per_cell.values() if v > 1)
        journal_of = {(t, pk, c): (o, m) for t, pk, c, o, m in rows}
        lost = migrated = untouched = 0
        for cell, value in after.items():
            if value == before[cell]:
                untouched += 1
                continue
            ok = (cell in truth.plaintexts and isinstance(value, str)
                  and plaintext_of(value) == truth.plaintexts[cell]
                  and journal_of.get(cell) == (before[cell], value))
            if ok:
                migrated += 1
            else:
                lost += 1
        left = sum(1 for cell in truth.plaintexts if after[cell] == before[cell])
        print(json.dumps({
            "values": len(truth.plaintexts), "chaos_minutes": args.minutes,
            "seconds_total": round(elapsed, 1), "runs": [list(r) for r in runs],
            "events": dict(counts), "kms_calls": dict(_KMS.calls),
            "values_migrated": migrated, "values_left": left, "values_lost": lost,
            "values_migrated_twice": twice,
            "longest_stall_s": round(longest_stall, 1),
            "machine_exits": {m.name: m.exits for m in machines},
        }, indent=2), flush=True)
        for m in machines:
            if m.proc is not None:
                m.proc.kill()
        eng.dispose()
    kms.shutdown()
    sys.exit(0 if lost == 0 and twice == 0 and left == 0 else 1)


def with_suppress(fn: Any, *a: Any) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        fn(*a)


if __name__ == "__main__":
    main()
