"""The KMS thread pool: `CallPool` runs a function over items with a bounded number of
calls in flight (`KMS` is one), and `Pending` is the work handed to it, waited for in
order or stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from typing import Generic, Self, TypeVar

__all__ = ["CallPool", "Pending"]

T = TypeVar("T")
R = TypeVar("R")


class Pending(Generic[R]):
    """Work handed to the KMS pool: wait for it in order, or stop what has not started."""

    def __init__(self) -> None:
        self.futures: list[Future[list[R]]] = []
        self._stop = threading.Event()

    def run(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        out: list[R] = []
        for item in items:
            if self._stop.is_set():
                raise CancelledError
            out.append(fn(item))
        return out

    def result(self) -> list[R]:
        """The results in item order; the first exception stops the rest and is raised."""
        if not self.futures:
            return []
        done, _ = wait(self.futures, return_when=FIRST_EXCEPTION)
        for f in done:
            exc = f.exception()
            if exc is not None:
                self.cancel()
                raise exc
        return [r for f in self.futures for r in f.result()]

    def cancel(self) -> None:
        """Stop what has not started (a call in flight finishes on its own)."""
        self._stop.set()
        for f in self.futures:
            f.cancel()


class CallPool:
    """Up to `concurrency` calls in flight on a pool of threads started on first use."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Run fn over items with up to `concurrency` calls in flight, results in order.

        The first exception (a fatal KMS error) stops what has not started and is raised:
        the caller then writes nothing of this batch.
        """
        return self.submit(fn, items).result()

    def submit(self, fn: Callable[[T], R], items: Sequence[T]) -> Pending[R]:
        """Start fn over items on the shared pool and return at once.

        The items are cut into `concurrency` contiguous slices, one pool task each, run in
        order within the slice: a handful of tasks per batch instead of one per value (per
        value, handing work to the pool cost the main thread more than the database writes).
        The pool has `concurrency` threads, so however much work is queued, no more than
        `concurrency` KMS calls are ever in flight.
        """
        pending: Pending[R] = Pending()
        if not items:
            return pending
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kms")
        n = min(self.concurrency, len(items))
        size, extra = divmod(len(items), n)
        start = 0
        for k in range(n):
            end = start + size + (1 if k < extra else 0)
            pending.futures.append(self._pool.submit(pending.run, fn, items[start:end]))
            start = end
        return pending
