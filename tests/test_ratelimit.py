"""--max-kms-rps: a token bucket over every KMS call of a run, adapting to throttling."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from migration.db import make_engine
from migration.kms import KMS, RateLimiter, RetryPolicy
from migration.migrator import migrate
from migration.ratelimit import Backoff
from tests.conftest import Keys, KmsHandle
from tests.helpers import make_db, settings_for
from tests.test_kms import kms_error_response


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def assert_within_limit(
    starts: list[float], rate: float, burst: float, jitter: float = 0.0
) -> None:
    """No window [t_i, t_j] holds more than rate * (t_j - t_i) + burst call starts.

    `jitter` allows for the scheduling delay between a thread taking its token and the
    moment a hook sees its request (measured on the real clock, that delay can bunch
    requests up); the limiter's own guarantee is on the tokens.
    """
    starts = sorted(starts)
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            n = j - i + 1
            assert n <= rate * (starts[j] - starts[i] + jitter) + burst + 1e-6, (i, j, n)


def test_bucket_admits_a_burst_then_exactly_the_rate() -> None:
    ft = FakeTime()
    lim = RateLimiter(50, burst=10, clock=ft.clock, sleep=ft.sleep)
    starts = []
    for _ in range(200):
        lim.acquire()
        starts.append(ft.now)
    assert starts[:10] == [0.0] * 10  # the burst goes at once
    assert starts[-1] == pytest.approx((200 - 10) / 50)  # then 50/s exactly
    assert_within_limit(starts, 50, 10)


def test_throttling_halves_the_rate_once_per_cooldown_then_it_recovers_slowly() -> None:
    ft = FakeTime()
    lim = RateLimiter(1000, clock=ft.clock, sleep=ft.sleep,
                      backoff=Backoff(recovery=0.02, cooldown=1.0))
    lim.on_throttle()
    assert lim.rate == 500
    lim.on_throttle()  # same burst of throttles: one signal
    assert lim.rate == 500
    ft.now += 1.0
    assert lim.rate == pytest.approx(520)  # +2% of the configured rate a second
    lim.on_throttle()
    assert lim.rate == pytest.approx(260)
    ft.now += 100
    assert lim.rate == 1000  # never above the configured rate
    for _ in range(40):
        ft.now += 1.1
        lim.on_throttle()
    assert lim.rate >= lim.min_rate > 0  # never down to zero


def test_threads_sharing_the_bucket_stay_within_the_limit() -> None:
    lim = RateLimiter(200, burst=8)
    starts: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            lim.acquire()
            with lock:
                starts.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(starts) == 200
    assert_within_limit(starts, 200, 8, jitter=0.02)
    assert starts[-1] - min(starts) >= (200 - 8) / 200 * 0.95  # and it really waited


def test_a_capped_migration_makes_no_more_than_r_t_plus_burst_calls(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(sqlite_url, 40, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, concurrency=8, max_kms_rps=100)
    starts: list[float] = []
    kms.client.meta.events.register("before-call.kms", lambda **kw: starts.append(
        time.monotonic()))
    limiter = RateLimiter(settings.max_kms_rps)
    k = KMS(kms.client, settings.key_id, settings.region, concurrency=8, limiter=limiter)
    t0 = time.monotonic()
    result = migrate(settings, engine=make_engine(sqlite_url), kms=k)
    elapsed = time.monotonic() - t0
    calls = 2 * len(truth.plaintexts) + 1
    assert len(starts) == calls == result.kms_requests
    assert_within_limit(starts, 100, limiter.burst, jitter=0.02)
    assert elapsed >= (calls - limiter.burst) / 100 * 0.95


def test_the_rate_adapts_down_when_kms_throttles(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(sqlite_url, 30, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, concurrency=4, max_kms_rps=400)
    rng = random.Random(5)

    def throttle_a_third(request: Any, **_: Any) -> Any:
        if b"DescribeKey" not in request.headers.get("X-Amz-Target", b"") and rng.random() < 0.3:
            return kms_error_response(request.url, "ThrottlingException")
        return None

    kms.client.meta.events.register_first("before-send.kms", throttle_a_third)
    limiter = RateLimiter(settings.max_kms_rps, backoff=Backoff(cooldown=0.05))
    k = KMS(kms.client, settings.key_id, settings.region, concurrency=4, limiter=limiter,
            policy=RetryPolicy(max_attempts=12, sleep=lambda s: None))
    result = migrate(settings, engine=make_engine(sqlite_url), kms=k)
    assert result.failed == 0
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert result.throttles == result.retries > 0
    assert result.rate_now is not None and result.rate_now < 400
