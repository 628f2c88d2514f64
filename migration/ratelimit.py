"""The KMS rate limiter: a token bucket over every KMS call of a run, adapting to throttling.

One per run (or one per worker process, holding that worker's share of the run's limit),
shared by every thread that calls KMS; `migration.kms.KMS` acquires a token before each
request and reports each throttling answer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "RateLimiter"]

WAKE = 0.25  # seconds: a call waiting for its token looks at a changed rate this often


@dataclass(frozen=True)
class Backoff:
    """How a `RateLimiter` answers throttling: the rate is multiplied by `decrease` (at most
    once per `cooldown` seconds, never below `min_rate`), then grows back by `recovery` of
    the configured rate per second."""

    min_rate: float = 1.0
    decrease: float = 0.5
    recovery: float = 0.02
    cooldown: float = 1.0


class RateLimiter:
    """A token bucket over every KMS call of a run, adapting to throttling (AIMD).

    At most ``rate * t + burst`` calls start in any t seconds. When KMS throttles, the rate
    is halved (at most once per `cooldown`, since one burst of throttles is one signal) and
    then recovers additively, by `recovery` of the configured rate per second, so the run
    backs off fast from a live application's traffic and returns to it slowly.

    Callers that find no token reserve one (the bucket goes negative) and sleep outside
    the lock for exactly their deficit: fair, and no busy waiting.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.max_rate = rate
        self.burst = burst if burst is not None else max(1.0, min(rate, 32.0))
        self.min_rate = min(backoff.min_rate, rate)
        self.decrease, self.recovery = backoff.decrease, backoff.recovery
        self.cooldown = backoff.cooldown
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        now = clock()
        self._tokens = self.burst
        self._stamp = now
        self._base = rate  # the rate right after the last decrease
        self._cut_at: float | None = None  # when it happened
        self._changes = 0  # how often the configured rate was changed (`set_max_rate`)
        self.throttles = 0

    def rate_at(self, now: float) -> float:
        if self._cut_at is None:
            return self.max_rate
        grown = self._base + self.recovery * self.max_rate * (now - self._cut_at)
        return min(self.max_rate, grown)

    @property
    def rate(self) -> float:
        with self._lock:
            return self.rate_at(self._clock())

    def acquire(self) -> None:
        """Block until one call may start.

        The wait is slept in slices of at most WAKE seconds: when the configured rate
        changes meanwhile (`set --max-kms-rps` on a live run), the tokens this call still
        owes are paid at the new rate, so a rate raised after a typo takes effect at once
        rather than after the old rate's wait."""
        with self._lock:
            now = self._clock()
            rate = self.rate_at(now)
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= 1
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
            changes = self._changes
        while wait > 0:
            step = min(wait, WAKE)
            self._sleep(step)
            wait -= step
            with self._lock:
                if self._changes != changes:
                    changes = self._changes
                    new = self.rate_at(self._clock())
                    wait, rate = wait * rate / new, new

    def set_max_rate(self, rate: float) -> None:
        """Change the configured rate (a worker's share of a run's limit). Tokens earned so
        far are kept; a rate cut by throttling keeps its proportion of the new rate."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate_at(now))
            self._stamp = now
            self._base = self._base * rate / self.max_rate
            self.max_rate = rate
            self.min_rate = min(self.min_rate, rate)
            self._base = max(self.min_rate, self._base)
            self.burst = max(1.0, min(rate, 32.0))
            self._tokens = min(self._tokens, self.burst)
            self._changes += 1  # the calls waiting re-time what they owe

    def lift(self) -> None:
        """No limit any more (the caller drops this limiter): the calls waiting go now."""
        self.set_max_rate(math.inf)

    def on_throttle(self) -> None:
        """KMS said slow down: cut the rate multiplicatively."""
        with self._lock:
            now = self._clock()
            self.throttles += 1
            if self._cut_at is not None and now - self._cut_at < self.cooldown:
                return
            self._base = max(self.min_rate, self.rate_at(now) * self.decrease)
            self._cut_at = now
