"""Throughput and memory of `kms-migrate migrate` against the guide's script and the ideal.

KMS is replaced by a fixed-latency botocore hook (benchmarks/fake_kms.py): boto3's own
serialization, signing and parsing costs stay in; only the network is a sleep.

Side by side, in one run, on one SQLite table of Fernet tokens:
  (a) the guide's approach: sequential, one Encrypt per value, no verify, commit at the end
  (b) kms-migrate migrate at its defaults (batch 500, concurrency 16), no rate limit
  (c) the bare ideal: a thread pool doing the same Encrypt+Decrypt pairs at the same
      concurrency, with no database and no Fernet
  (d) kms-migrate rekey of what (b) wrote to a second key: ReEncrypt and its checking
      ReEncrypt per value (2 calls, as (b)'s Encrypt and Decrypt), no Fernet
and the peak RSS of (b), each size in a fresh child process.

    .venv/bin/python benchmarks/bench_throughput.py                  # the README figures
    .venv/bin/python benchmarks/bench_throughput.py --values 20000 --guide-values 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
for _v in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
    os.environ.pop(_v, None)

import base64  # noqa: E402

from cryptography.fernet import Fernet  # noqa: E402

from benchmarks.fake_kms import ARN, NEXT_ALIAS, LatencyKMS  # noqa: E402
from migration.config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, Settings, Target  # noqa: E402
from migration.db import make_engine  # noqa: E402
from migration.kms import KMS, make_client  # noqa: E402
from migration.logs import configure_logging  # noqa: E402
from migration.migrator import migrate  # noqa: E402

# One key for the parent and its RSS children (passed in the environment, never in argv).
KEY = os.environ.setdefault("KMS_BENCH_FERNET_KEY", Fernet.generate_key().decode())
TARGET = Target("secrets", "id", ("secret",))


def build_db(path: Path, n: int) -> None:
    f = Fernet(KEY.encode())
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE secrets (id INTEGER PRIMARY KEY, secret TEXT)")
    rows = ((i, f.encrypt(os.urandom(44).hex().encode()).decode()) for i in range(1, n + 1))
    conn.executemany("INSERT INTO secrets VALUES (?, ?)", rows)
    conn.commit()
    conn.close()


def client(latency: float, concurrency: int) -> tuple[object, LatencyKMS]:
    fake = LatencyKMS(latency)
    return fake.install(make_client("us-east-1", concurrency)), fake


def run_guide(path: Path, latency: float, limit: int) -> tuple[int, float, int]:
    """The guide's Step 4 loop: fetch all, decrypt, encrypt, UPDATE, commit once."""
    kms, fake = client(latency, 1)
    fernet = Fernet(KEY.encode())
    conn = sqlite3.connect(path)
    cur = conn.cursor()
    t0 = time.perf_counter()
    cur.execute("SELECT id, secret FROM secrets WHERE secret IS NOT NULL LIMIT ?", (limit,))
    rows = cur.fetchall()
    for pk, token in rows:
        plaintext = fernet.decrypt(token.encode()).decode()
        resp = kms.encrypt(KeyId="alias/coinflip-master-key",  # type: ignore[attr-defined]
                           Plaintext=plaintext.encode("utf-8"))
        ct = base64.b64encode(resp["CiphertextBlob"]).decode("utf-8")
        cur.execute("UPDATE secrets SET secret = ? WHERE id = ?", (ct, pk))
    conn.commit()
    conn.close()
    return len(rows), time.perf_counter() - t0, fake.calls


def run_tool(path: Path, latency: float, concurrency: int, batch: int) -> tuple[int, float, int]:
    """(b): migrate the Fernet tokens."""
    return _timed_run(Settings(db_url=f"sqlite:///{path}", targets=(TARGET,), batch_size=batch,
                               concurrency=concurrency, fernet_keys=(KEY,), max_kms_rps=0),
                      latency)


def run_rekey(path: Path, latency: float, concurrency: int, batch: int) -> tuple[int, float, int]:
    """(d): rekey the values (b) migrated, from the first key to the second."""
    return _timed_run(Settings(db_url=f"sqlite:///{path}", targets=(TARGET,), batch_size=batch,
                               concurrency=concurrency, max_kms_rps=0, to_key_id=NEXT_ALIAS),
                      latency)


def _timed_run(settings: Settings, latency: float) -> tuple[int, float, int]:
    """One run of the tool (migrate, or rekey when the settings name a destination) against
    the fake KMS: (values rewritten, seconds, KMS calls)."""
    kc, fake = client(latency, settings.concurrency)
    kms = KMS(kc, settings.key_id, settings.region, concurrency=settings.concurrency)
    t0 = time.perf_counter()
    result = migrate(settings, engine=make_engine(settings.db_url), kms=kms)
    elapsed = time.perf_counter() - t0
    kms.close()
    rewritten = sum(c.migrated for c in result.columns)
    assert result.failed == 0 and rewritten > 0
    return rewritten, elapsed, fake.calls


def run_ideal(n: int, latency: float, concurrency: int) -> tuple[int, float, int]:
    kc, fake = client(latency, concurrency)
    plaintexts = [os.urandom(44).hex().encode() for _ in range(n)]

    def pair(p: bytes) -> None:
        blob = kc.encrypt(KeyId=ARN, Plaintext=p)["CiphertextBlob"]  # type: ignore[attr-defined]
        assert kc.decrypt(CiphertextBlob=blob)["Plaintext"] == p  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(pair, plaintexts))
    return n, time.perf_counter() - t0, fake.calls


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: on Linux a child started by
    fork/vfork+exec inherits its parent's high-water mark in ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_rss(path: Path, latency: float) -> int:
    """Peak RSS (KiB) of a fresh process running (b) on `path`."""
    out = subprocess.run([sys.executable, __file__, "--child", str(path),
                          "--latency-ms", str(latency * 1000)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=100_000)
    ap.add_argument("--guide-values", type=int, default=10_000,
                    help="values for (a): it is strictly sequential, so its rate does not "
                         "depend on the table size; 100000 takes ~10 minutes at 5 ms")
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--rss", default="10000,100000", help="sizes for peak RSS ('' to skip)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    configure_logging("warning")
    latency = args.latency_ms / 1000
    if args.child:
        run_tool(Path(args.child), latency, args.concurrency, args.batch_size)
        print(peak_rss_kib())
        return

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; KMS latency {args.latency_ms:g} ms; "
          f"concurrency {args.concurrency}; batch {args.batch_size}")
    work = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    try:
        template = work / "template.db"
        build_db(template, args.values)
        results = {}
        for name, fn in (
            ("a", lambda p: run_guide(p, latency, args.guide_values)),
            ("b", lambda p: run_tool(p, latency, args.concurrency, args.batch_size)),
            ("c", lambda p: run_ideal(args.values, latency, args.concurrency)),
            ("d", lambda p: run_rekey(p, latency, args.concurrency, args.batch_size)),
        ):
            db = work / f"{name}.db"
            # (d) rekeys what (b) migrated (the journal of (b) stays: as in production).
            shutil.copy(work / "b.db" if name == "d" else template, db)
            n, secs, calls = fn(db)
            results[name] = (n, secs, calls, n / secs)
            label = {"a": "(a) guide's script", "b": "(b) kms-migrate migrate",
                     "c": "(c) bare thread pool", "d": "(d) kms-migrate rekey"}[name]
            print(f"{label:26s} {n:>7} values {secs:8.2f} s {n / secs:9.1f} values/s "
                  f"{calls:>7} KMS calls")
        a, b, c, d = (results[k][3] for k in "abcd")
        print(f"b/a = {b / a:.2f}   (target >= 5; (b) makes {results['b'][2] / results['b'][0]:.2f}"
              f" KMS calls a value, (a) {results['a'][2] / results['a'][0]:.2f})")
        print(f"b/c = {b / c:.2f}   (target >= 0.8)")
        print(f"d/b = {d / b:.2f}   (rekey against migrate, both 2 KMS calls a value; (d) "
              f"makes {results['d'][2] / results['d'][0]:.2f})")
        sizes = [int(s) for s in args.rss.split(",") if s]
        rss = {}
        for size in sizes:
            db = work / f"rss{size}.db"
            build_db(db, size)
            rss[size] = child_rss(db, latency)
            print(f"peak RSS of (b) at {size:>7} values: {rss[size] / 1024:7.1f} MiB")
        if len(sizes) == 2:
            r = rss[sizes[1]] / rss[sizes[0]]
            print(f"RSS({sizes[1]}) / RSS({sizes[0]}) = {r:.3f}   (target <= 1.2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
