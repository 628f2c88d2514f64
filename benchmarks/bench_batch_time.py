"""Adaptive batch size (`--batch-time`) against fixed sizes, across a KMS latency step.

In one run, on copies of one SQLite table of Fernet tokens, an in-process
`migration.migrator.migrate` per configuration: fixed `--batch-size` 100 and 500, and
`--batch-time` 0.5, 1 and 2 s (starting from the default `--batch-size`, 500). The fake
KMS (benchmarks/fake_kms.py) answers in 5 ms until half the run's KMS calls, then in
50 ms: a KMS that slows down mid-run. (Half: the 5 ms phase goes about 4x faster, and the
sizes need a few batches to reach its steady state.)

Each batch is recorded: the size asked for (the page read), its time commit to commit
(what the sizer is told), and its write transaction (`apply_migrate_batch`, wrapped here
only). A batch belongs to the 5 ms phase when it committed before the step, to the 50 ms
phase when its page was read (its KMS work starts right after) after the step, else it
straddles the step.

    .venv/bin/python benchmarks/bench_batch_time.py                  # about 2 minutes
    .venv/bin/python benchmarks/bench_batch_time.py --rows 10000 --step-at 0.3 \
        --sizes 500 --times 2                 # long enough for 2 s to settle at 50 ms
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migration.pages
import migration.pipeline
from benchmarks.bench_throughput import KEY, TARGET, build_db  # sets AWS_* env
from benchmarks.fake_kms import LatencyKMS
from checkpoints.store import BatchCounts
from migration.applier import apply_migrate_batch
from migration.config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, Settings
from migration.db import make_engine
from migration.kms import KMS, make_client
from migration.logs import configure_logging
from migration.migrator import migrate
from migration.reader import Row, fetch_batch
from migration.sizing import BatchSizer
from migration.steer import MAX_HEARTBEAT

PHASES = ("5 ms", "step", "50 ms")


class SteppedKMS(LatencyKMS):
    """The fake KMS, whose latency goes from `low` to `high` once `step_at` calls were
    answered; `stepped` is when (time.monotonic)."""

    def __init__(self, low: float, high: float, step_at: int) -> None:
        super().__init__(low)
        self.high, self.step_at = high, step_at
        self.stepped: float | None = None
        self._lock = threading.Lock()

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.stepped is None and self.calls >= self.step_at:
                self.latency, self.stepped = self.high, time.monotonic()
        return super().__call__(request, **kwargs)


@dataclass
class Batch:
    asked: int  # the page size asked for
    read_at: float  # when the page was read (its KMS work starts right after)
    rows: int = 0
    seconds: float = 0.0  # commit to commit, as the sizer is told
    write: float = 0.0  # the write transaction (apply_migrate_batch)
    end: float = 0.0  # when the sizer was told (just after the commit)
    next_size: int = 0  # what the sizer answered
    phase: str = ""


@dataclass
class Recorder:
    """The batches of one migrate, from probes on the pipeline's references."""

    batches: list[Batch] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    observed: list[tuple[int, float, float, int]] = field(default_factory=list)

    def assemble(self, stepped: float | None) -> list[Batch]:
        """Pages, writes and observations in order are one batch each (one column, one
        process, no pause: no page is read twice)."""
        assert len(self.batches) == len(self.writes) == len(self.observed), (
            len(self.batches), len(self.writes), len(self.observed))
        for b, w, (rows, secs, end, nxt) in zip(self.batches, self.writes, self.observed,
                                                strict=True):
            b.write, b.rows, b.seconds, b.end, b.next_size = w, rows, secs, end, nxt
            b.phase = ("5 ms" if stepped is None or b.end <= stepped
                       else "50 ms" if b.read_at >= stepped else "step")
        return self.batches


def _swap(module: ModuleType, name: str, new: Any) -> Any:
    """Replace a module's reference `name` by `new`; the one it held."""
    old = getattr(module, name)
    setattr(module, name, new)
    return old


@contextlib.contextmanager
def probed(rec: Recorder) -> Iterator[None]:
    """Wrap the page read, the write transaction and the sizer's observation (the
    references pages.py and pipeline.py call, and the sizer's class) for one migrate."""
    observe = BatchSizer.observe

    def fetch_probe(engine: Any, bt: Any, column: str, after: Any, n: int,
                    upto: Any = None) -> list[Row]:
        rec.batches.append(Batch(asked=n, read_at=time.monotonic()))
        return fetch_batch(engine, bt, column, after, n, upto)

    def apply_probe(*args: Any, **kwargs: Any) -> BatchCounts:
        t0 = time.perf_counter()
        try:
            return apply_migrate_batch(*args, **kwargs)
        finally:
            rec.writes.append(time.perf_counter() - t0)

    def observe_probe(self: BatchSizer, rows: int, seconds: float) -> int:
        nxt = observe(self, rows, seconds)
        rec.observed.append((rows, seconds, time.monotonic(), nxt))
        return nxt

    swaps = ((migration.pages, "fetch_batch", fetch_probe, fetch_batch),
             (migration.pipeline, "apply_migrate_batch", apply_probe, apply_migrate_batch))
    for module, name, probe, original in swaps:
        assert _swap(module, name, probe) is original, f"{module.__name__}.{name} moved"
    BatchSizer.observe = observe_probe  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, name, _, original in swaps:
            _swap(module, name, original)
        BatchSizer.observe = observe  # type: ignore[method-assign]


@dataclass(frozen=True)
class Config:
    name: str
    batch_size: int
    batch_time: float | None = None


def configs(fixed: str, targets: str) -> tuple[Config, ...]:
    """Fixed sizes, then targets (from the default --batch-size), as comma-separated."""
    return (*(Config(f"--batch-size {n}", int(n)) for n in fixed.split(",") if n),
            *(Config(f"--batch-time {t}", DEFAULT_BATCH_SIZE, float(t))
              for t in targets.split(",") if t))


@dataclass
class Outcome:
    config: Config
    values: int
    seconds: float
    batches: list[Batch]


def run_one(db: Path, config: Config, args: argparse.Namespace) -> Outcome:
    settings = Settings(db_url=f"sqlite:///{db}", targets=(TARGET,),
                        batch_size=config.batch_size, batch_time=config.batch_time,
                        concurrency=args.concurrency, fernet_keys=(KEY,), max_kms_rps=0)
    fake = SteppedKMS(args.low_ms / 1000, args.high_ms / 1000,
                      step_at=round(2 * args.rows * args.step_at))  # 2 calls a value
    kc = fake.install(make_client("us-east-1", settings.concurrency))
    kms = KMS(kc, settings.key_id, settings.region, concurrency=settings.concurrency)
    rec = Recorder()
    engine = make_engine(settings.db_url)
    try:
        with probed(rec):
            t0 = time.perf_counter()
            result = migrate(settings, engine=engine, kms=kms)
            elapsed = time.perf_counter() - t0
    finally:
        kms.close()
        engine.dispose()
    values = sum(c.migrated for c in result.columns)
    assert result.failed == 0 and values == args.rows, (result.failed, values)
    return Outcome(config, values, elapsed, rec.assemble(fake.stepped))


def _pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile, nearest rank (p90 of few batches is their largest but one or so)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def phase_row(o: Outcome, phase: str) -> str | None:
    bs = [b for b in o.batches if b.phase == phase and b.rows > 0]
    if not bs:
        return None
    secs = [b.seconds for b in bs]
    asked = [b.asked for b in bs]
    rate = sum(b.rows for b in bs) / sum(secs)
    return (f"| {o.config.name} | {phase} | {len(bs)} | {statistics.median(secs):.2f} | "
            f"{_pct(secs, 0.9):.2f} | {max(secs):.2f} | "
            f"{sum(t > MAX_HEARTBEAT for t in secs)} | "
            f"{statistics.median(b.write for b in bs) * 1000:.0f} | "
            f"{min(asked)}/{statistics.median(asked):g}/{max(asked)} | {rate:,.0f} |")


def around_step(o: Outcome, before: int = 3, after: int = 12) -> tuple[str, str] | None:
    """The sizes asked and the batch times around the step ('|' marks the first batch
    that is not wholly in the 5 ms phase)."""
    first = next((i for i, b in enumerate(o.batches) if b.phase != "5 ms"), None)
    if first is None:
        return None
    lo, hi = max(0, first - before), min(len(o.batches), first + after)
    sizes = [("| " if i == first else "") + str(o.batches[i].asked) for i in range(lo, hi)]
    times = [("| " if i == first else "") + f"{o.batches[i].seconds:.2f}" for i in range(lo, hi)]
    return " ".join(sizes), " ".join(times)


def report(outcomes: Sequence[Outcome], label: Callable[[Outcome], str]) -> None:
    print()
    print(f"| configuration | phase | batches | median s | p90 s | max s | > {MAX_HEARTBEAT:g} s "
          "| median write ms | size min/median/max | values/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for o in outcomes:
        for phase in PHASES:
            row = phase_row(o, phase)
            if row is not None:
                print(row.replace(o.config.name, label(o), 1))
    print()
    print("| configuration | values | seconds | values/s (whole run) |")
    print("|---|---:|---:|---:|")
    for o in outcomes:
        print(f"| {label(o)} | {o.values:,} | {o.seconds:.1f} | {o.values / o.seconds:,.0f} |")
    print()
    for o in outcomes:
        if o.config.batch_time is None:
            continue
        seq = around_step(o)
        first = [b.asked for b in o.batches[:6]]
        print(f"{label(o)}: first sizes {' '.join(map(str, first))}")
        if seq is not None:
            print(f"  sizes around the step: {seq[0]}")
            print(f"  batch s around the step: {seq[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    ap.add_argument("--low-ms", type=float, default=5.0)
    ap.add_argument("--high-ms", type=float, default=50.0)
    ap.add_argument("--step-at", type=float, default=0.5,
                    help="the fraction of the run's KMS calls after which the latency steps up")
    ap.add_argument("--sizes", default="100,500", help="fixed --batch-size configurations")
    ap.add_argument("--times", default="0.5,1,2", help="--batch-time configurations")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; each runs every configuration, in a rotated order")
    args = ap.parse_args()
    configure_logging("warning")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.rows} values; KMS latency "
          f"{args.low_ms:g} ms -> {args.high_ms:g} ms after {args.step_at:.0%} of the calls; "
          f"concurrency {args.concurrency}")
    work = Path(tempfile.mkdtemp(prefix="kms-bench-bt-"))
    outcomes: list[tuple[int, Outcome]] = []
    todo = configs(args.sizes, args.times)
    try:
        template = work / "template.db"
        build_db(template, args.rows)
        for r in range(args.repeat):
            order = todo[r % len(todo):] + todo[:r % len(todo)]
            for config in order:
                db = work / "run.db"
                shutil.copy(template, db)
                o = run_one(db, config, args)
                outcomes.append((r, o))
                print(f"  round {r + 1} {config.name:18s} {o.seconds:6.1f} s "
                      f"{o.values / o.seconds:7.1f} values/s {len(o.batches)} batches",
                      flush=True)
                db.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rounds = {id(o): r for r, o in outcomes}
    ordered = sorted((o for _, o in outcomes), key=lambda o: (todo.index(o.config),
                                                             rounds[id(o)]))
    report(ordered, (lambda o: f"{o.config.name} (round {rounds[id(o)] + 1})")
           if args.repeat > 1 else (lambda o: o.config.name))


if __name__ == "__main__":
    main()
