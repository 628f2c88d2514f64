"""Pages: how every column loop reads its next page, and the one "is this the last
page?" rule (`last_page`).

A fetcher maps `after` (the key, or journal id, the previous page covered up to) to
(items, cursor, last page?). Its cursor strictly increases, whatever the data: every
loop ends. The size of each page is asked for when the page is read (`Size`: a number,
or a `migration.sizing.BatchSizer` that a steered or adaptive run changes).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, select

from checkpoints.rollback_journal import pending
from checkpoints.tables import journal

from .reader import BoundTarget, Row, fetch_batch, fetch_keys

__all__ = [
    "Fetcher", "JournalEntry", "Size", "journal_fetcher", "key_list_fetcher", "keyset_fetcher",
    "last_page",
]

T = TypeVar("T")
Size = int | Callable[[], int]  # a batch size, or what gives the next one (a BatchSizer)
JournalEntry = tuple[int, str, str, str]  # journal id, pk, original, migrated

# after -> (items, cursor, last page?). The cursor is the key the page covered up to: the
# next page starts after it. It comes from what was asked for, not from the rows found, so
# it advances even when a page finds no row (keys deleted since they were listed).
Fetcher = Callable[[Any], tuple[list[T], Any, bool]]


def _now(size: Size) -> int:
    return size() if callable(size) else size


def last_page(found: int, size: int, last_key: Any, upto: Any | None) -> bool:
    """The one "last page?" rule: a short page, or one that reached the range's end."""
    return found < size or (upto is not None and found > 0 and last_key == upto)


def keyset_fetcher(engine: Engine, bt: BoundTarget, column: str, size: Size,
                   upto: Any | None = None) -> Fetcher[Row]:
    """Pages of one column in key order, up to key `upto` when given."""
    def fetch(after: Any) -> tuple[list[Row], Any, bool]:
        n = _now(size)
        rows = fetch_batch(engine, bt, column, after, n, upto)
        last = rows[-1].pk if rows else None
        return rows, last if rows else after, last_page(len(rows), n, last, upto)
    return fetch


def key_list_fetcher(engine: Engine, bt: BoundTarget, column: str, keys: list[Any],
                     size: Size) -> Fetcher[Row]:
    """Pages through a sorted list of keys (--retry-failed) instead of the whole table."""
    def fetch(after: Any) -> tuple[list[Row], Any, bool]:
        n = _now(size)
        start = 0 if after is None else bisect.bisect_right(keys, after)
        page = keys[start:start + n]
        # The cursor is the page's last key, found or not: a page whose rows were all
        # deleted since still moves on (falling back to None would start over, forever).
        cursor = page[-1] if page else after
        return fetch_keys(engine, bt, column, page), cursor, start + n >= len(keys)
    return fetch


def journal_fetcher(engine: Engine, table: str, column: str, size: Size,
                    upto: int | None = None, undoes: int | None = None) -> Fetcher[JournalEntry]:
    """Pages of one column's journal entries still to roll back (of the rekey run
    `undoes`, else of the migrate layer), in journal id order (up to journal id `upto`,
    the end of a range, when given)."""
    j = journal.c

    def fetch(after: Any) -> tuple[list[JournalEntry], Any, bool]:
        n = _now(size)
        q = (select(j.id, j.pk, j.original, j.migrated)
             .where(j.table_name == table, j.column_name == column, pending(undoes),
                    j.id > (after or 0))
             .order_by(j.id).limit(n))
        if upto is not None:
            q = q.where(j.id <= upto)
        with engine.connect() as conn:
            entries = [(int(r.id), r.pk, r.original, r.migrated) for r in conn.execute(q)]
        last = entries[-1][0] if entries else None
        return entries, last if entries else after, last_page(len(entries), n, last, upto)
    return fetch
