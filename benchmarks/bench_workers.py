"""Scale-out: `migrate --workers N` against one worker, on PostgreSQL, with a slow KMS.

KMS is the fixed-latency botocore hook of benchmarks/fake_kms.py (boto3's own
serialization, signing and parsing stay in; only the network is a sleep), installed in
each worker process. The database is a throwaway PostgreSQL server started here (the
same one the test suite starts). Side by side, in one run, on fresh copies of one table:

  (s) kms-migrate migrate in one process (no --workers)
  (1) the ranged run with 1 worker process
  (N) the ranged run with N worker processes, for each N of --workers

Every figure is values per second from the command's start to its end, process start-up,
range planning and the final bookkeeping included.

    .venv/bin/python benchmarks/bench_workers.py                 # the README figures
    .venv/bin/python benchmarks/bench_workers.py --values 20000 --workers 2,3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
for _v in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
    os.environ.pop(_v, None)

from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, insert  # noqa: E402

from benchmarks.fake_kms import LatencyKMS  # noqa: E402
from migration.config import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    Settings,
    Target,
)
from migration.db import make_engine  # noqa: E402
from migration.kms import KMS, make_client  # noqa: E402
from migration.logs import configure_logging  # noqa: E402
from migration.migrator import migrate  # noqa: E402
from migration.supervisor import Here, migrate_ranged  # noqa: E402
from migration.worker import work  # noqa: E402
from migration.worker_spec import WorkerSpec, settings_from_dict  # noqa: E402
from tests.pgserver import running_pg_server  # noqa: E402

# One Fernet key for the parent and the worker processes (in the environment, not argv).
KEY = os.environ.setdefault("ENCRYPTION_KEY", Fernet.generate_key().decode())
TARGET = Target("secrets", "id", ("secret",))
LATENCY_ENV = "KMS_BENCH_LATENCY"


def build_db(url: str, n: int) -> None:
    f = Fernet(KEY.encode())
    meta = MetaData()
    t = Table("secrets", meta, Column("id", Integer, primary_key=True), Column("secret", Text))
    eng = create_engine(url)
    meta.create_all(eng)
    with eng.begin() as conn:
        for start in range(1, n + 1, 5000):
            conn.execute(insert(t), [
                {"id": i, "secret": f.encrypt(os.urandom(44).hex().encode()).decode()}
                for i in range(start, min(n, start + 4999) + 1)
            ])
    eng.dispose()


def fake_kms(settings: Settings, latency: float) -> KMS:
    client = LatencyKMS(latency).install(make_client(settings.region, settings.concurrency))
    return KMS(client, settings.key_id, settings.region, concurrency=settings.concurrency)


def worker_main(spec_json: str) -> None:
    """A worker process: what `kms-migrate worker` does, with the fake KMS."""
    configure_logging("warning")
    spec = WorkerSpec.from_json(spec_json)
    settings = settings_from_dict(spec.settings)
    with fake_kms(settings, float(os.environ[LATENCY_ENV])) as kms:
        work(spec, settings, engine=make_engine(settings.db_url), kms=kms)


class SpawnedWorker:
    """A multiprocessing child with the little of Popen's interface the supervisor uses."""

    def __init__(self, spec: WorkerSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=worker_main, args=(spec.to_json(),))
        self.proc.start()
        assert self.proc.pid is not None
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        return self.proc.exitcode or 0


def spawn(spec: WorkerSpec, n: int) -> list[Any]:
    return [SpawnedWorker(spec) for _ in range(n)]


def run(url: str, workers: int | None, latency: float, args: argparse.Namespace) -> float:
    settings = Settings(db_url=url, targets=(TARGET,), batch_size=args.batch_size,
                        concurrency=args.concurrency, fernet_keys=(KEY,), max_kms_rps=0)
    with fake_kms(settings, latency) as kms:
        t0 = time.perf_counter()
        if workers is None:
            result = migrate(settings, engine=make_engine(url), kms=kms)
        else:
            result = migrate_ranged(settings, engine=make_engine(url), kms=kms,
                                    here=Here(workers, rows_per_range=args.rows_per_range,
                                              spawn=spawn))
        elapsed = time.perf_counter() - t0
    migrated = sum(c.migrated for c in result.columns)
    assert migrated == args.values and result.failed == 0, (migrated, result.failed)
    return migrated / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=60_000)
    ap.add_argument("--workers", default="2", help="comma-separated worker counts besides 1")
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--rows-per-range", type=int, default=5_000)
    args = ap.parse_args()
    configure_logging("warning")
    latency = args.latency_ms / 1000
    os.environ[LATENCY_ENV] = str(latency)
    counts = [int(w) for w in args.workers.split(",") if w]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; PostgreSQL on the same machine; KMS latency "
          f"{args.latency_ms:g} ms; concurrency {args.concurrency} per process; batch "
          f"{args.batch_size}; {args.values} values; {args.rows_per_range} rows per range")
    with running_pg_server() as pg:
        rates: dict[str, float] = {}
        for label, n in [("single process (no --workers)", None), ("--workers 1", 1),
                         *((f"--workers {w}", w) for w in counts)]:
            url = pg.new_database()
            build_db(url, args.values)
            rates[label] = run(url, n, latency, args)
            print(f"{label:32s} {rates[label]:9.1f} values/s")
        one = rates["--workers 1"]
        for w in counts:
            print(f"--workers {w} / --workers 1 = {rates[f'--workers {w}'] / one:.2f}"
                  + ("   (target >= 1.6)" if w == 2 else ""))


if __name__ == "__main__":
    main()
