"""Reads target columns in keyset-paginated batches (the "inspector": it never writes).

``WHERE pk > :last ORDER BY pk LIMIT :n`` costs the same for every batch, and the last
primary key of a committed batch is the checkpoint. Each batch is read in its own short
transaction so no read lock is held while KMS works (SQLite writers would wait on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    inspect,
    select,
)
from sqlalchemy.exc import NoSuchTableError

from .config import Target
from .db import max_bind_params
from .errors import ConfigError

__all__ = [
    "BoundTarget", "Row", "bind_target", "bind_targets", "count_after", "fetch_batch", "fetch_keys",
    "null_key_count", "refuse_null_keys", "spread_sample",
]


@dataclass(frozen=True)
class Row:
    pk: Any
    value: Any


@dataclass(frozen=True)
class BoundTarget:
    """A target checked against the live schema: its reflected table and key column."""

    target: Target
    table: Table
    pk_is_int: bool

    @property
    def name(self) -> str:
        return self.target.table

    @property
    def pk(self) -> Column[Any]:
        return self.table.c[self.target.primary_key]

    def col(self, column: str) -> Column[Any]:
        return self.table.c[column]

    def pk_text(self, pk: Any) -> str:
        """The primary key as stored in the bookkeeping tables."""
        return str(pk)

    def pk_value(self, text: str) -> Any:
        """The primary key as the target table compares it."""
        return int(text) if self.pk_is_int else text


def bind_target(conn: Connection, target: Target) -> BoundTarget:
    """Reflect one target and refuse it, before anything is written, unless it is usable."""
    try:
        table = Table(target.table, MetaData(), autoload_with=conn)
    except NoSuchTableError:
        raise ConfigError(
            f"table {target.table} does not exist in this database: check --db and the "
            "targets (--config)"
        ) from None
    pk_cols = list(table.primary_key.columns)
    if not pk_cols:
        raise ConfigError(
            f"table {target.table} has no primary key: kms-migrate pages by a single-column "
            "primary key; add one, or leave this table out of --config"
        )
    if len(pk_cols) > 1:
        names = ", ".join(c.name for c in pk_cols)
        raise ConfigError(
            f"table {target.table} has a composite primary key ({names}): kms-migrate needs a "
            "single-column integer or text primary key"
        )
    if pk_cols[0].name != target.primary_key:
        raise ConfigError(
            f"table {target.table}'s primary key is {pk_cols[0].name}, not "
            f"{target.primary_key}: fix primary_key in --config"
        )
    pk_type = pk_cols[0].type
    if isinstance(pk_type, Integer):
        pk_is_int = True
    elif isinstance(pk_type, String):
        pk_is_int = False
    else:
        raise ConfigError(
            f"table {target.table}'s primary key {target.primary_key} is {pk_type}, not an "
            "integer or text: kms-migrate cannot page by it"
        )
    for column in target.columns:
        if column not in table.c:
            raise ConfigError(
                f"column {target.table}.{column} does not exist: fix the columns of "
                f"{target.table} in --config"
            )
        if not isinstance(table.c[column].type, String):
            raise ConfigError(
                f"column {target.table}.{column} is {table.c[column].type}, not text: "
                "kms-migrate rewrites text columns holding Fernet tokens"
            )
    return BoundTarget(target=target, table=table, pk_is_int=pk_is_int)


def bind_targets(engine: Engine, targets: Sequence[Target]) -> list[BoundTarget]:
    """Bind every target for a command that pages through them (migrate, verify): refused,
    before anything is written, when a target has rows with a NULL primary key."""
    with engine.connect() as conn:
        bound = [bind_target(conn, t) for t in targets]
        for bt in bound:
            refuse_null_keys(conn, bt)
        return bound


def null_key_count(conn: Connection, bt: BoundTarget) -> int:
    """Rows whose primary key is NULL (SQLite allows it in a non-integer PRIMARY KEY)."""
    return int(conn.execute(
        select(func.count()).select_from(bt.table).where(bt.pk.is_(None))).scalar_one())


def refuse_null_keys(conn: Connection, bt: BoundTarget) -> None:
    """Raise ConfigError when the target has NULL-key rows.

    Keyset paging (``pk > :last``) can neither reach nor pass a NULL key, and a
    compare-and-swap (``pk = :pk``) never matches one: such rows could be neither migrated
    nor named by key, and a run over them would loop or leave them as endless conflicts.
    """
    n = null_key_count(conn, bt)
    if n:
        raise ConfigError(
            f"table {bt.name} has {n} row(s) whose primary key {bt.target.primary_key} is "
            "NULL: kms-migrate pages and rewrites rows by key; give those rows a key (or "
            "delete them) and re-run; nothing was written"
        )


def spread_sample(
    conn: Connection, bt: BoundTarget, column: str, probes: int = 20, window: int = 50
) -> list[Row]:
    """Rows of one column from `probes` places spread over the key range, up to `window`
    rows from each, in key order, each row once.

    For the Fernet key check: the oldest rows (the first ones in key or storage order) are
    the likeliest to be under a legacy or unknown key, so a sample from the front alone
    could refuse a run the keys are right for. Each probe is one short range read on the
    primary key's index (``pk >= :start ORDER BY pk LIMIT :window``), so the cost stays
    the same on a 50-million-row table: no scan, no OFFSET. The starts are spread evenly
    between the smallest and largest key (a text key: over the first character in which
    they differ), which the database finds from the index's two ends.
    """
    # One min() or max() per statement: SQLite reads an index end only for a lone one.
    lo = conn.execute(select(func.min(bt.pk))).scalar()
    hi = conn.execute(select(func.max(bt.pk))).scalar()
    if lo is None or hi is None:
        return []
    starts: list[Any] = [None]
    if bt.pk_is_int:
        starts += [int(lo) + (int(hi) - int(lo)) * i // probes for i in range(1, probes)]
    else:
        starts += _text_starts(str(lo), str(hi), probes)
    seen: set[Any] = set()
    rows: list[Row] = []
    for start in dict.fromkeys(starts):  # in order, each start once
        q = select(bt.pk, bt.col(column)).order_by(bt.pk).limit(window)
        q = q.where(bt.pk >= start) if start is not None else q.where(bt.pk.is_not(None))
        for pk, value in conn.execute(q):
            if pk not in seen:
                seen.add(pk)
                rows.append(Row(pk, value))
    return rows


def _text_starts(lo: str, hi: str, probes: int, width: int = 4) -> list[str]:
    """probes - 1 text keys spread between lo and hi.

    Past their common prefix, the next `width` characters of each are read as a number
    whose digits are the characters from the smallest to the largest that lo and hi use
    there (so '0'..'9' for decimal ids, '0'..'f' for hex ones), and the starts are spread
    evenly between the two numbers. An estimate of the key order, no more: any start is
    still a valid place to read from.
    """
    n = 0
    while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
        n += 1
    a, b = lo[n:n + width], hi[n:n + width]
    if not b:
        return []  # hi is a prefix of lo (another collation's order): the front only
    c0 = min(ord(c) for c in a + b)
    base = max(ord(c) for c in a + b) - c0 + 1

    def number(t: str) -> int:
        x = 0
        for ch in t.ljust(width, chr(c0)):
            x = x * base + ord(ch) - c0
        return x

    x_lo, x_hi = number(a), number(b)
    out: list[str] = []
    for i in range(1, probes):
        x = x_lo + (x_hi - x_lo) * i // probes
        chars: list[str] = []
        for _ in range(width):
            x, d = divmod(x, base)
            c = max(1, c0 + d)  # no NUL: PostgreSQL text cannot hold one
            chars.append(chr(0xE000 if 0xD800 <= c <= 0xDFFF else c))
        out.append(hi[:n] + "".join(reversed(chars)))
    return out


def count_after(
    engine: Engine, bt: BoundTarget, after: Any | None, upto: Any | None = None
) -> int:
    """How many rows are left after key `after` (for progress and ETA)."""
    q = select(func.count()).select_from(bt.table)
    if after is not None:
        q = q.where(bt.pk > after)
    if upto is not None:
        q = q.where(bt.pk <= upto)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def fetch_keys(engine: Engine, bt: BoundTarget, column: str, keys: list[Any]) -> list[Row]:
    """The rows of these keys (in key order; a key no longer in the table is left out)."""
    if not keys:
        return []
    rows: list[Row] = []
    with engine.connect() as conn:
        step = max_bind_params(conn)  # one parameter per key of the IN list
        for i in range(0, len(keys), step):
            q = select(bt.pk, bt.col(column)).where(bt.pk.in_(keys[i:i + step]))
            rows.extend(Row(pk, value) for pk, value in conn.execute(q))
    return sorted(rows, key=lambda r: r.pk)  # Python's order, as the key list is sorted


def fetch_batch(
    engine: Engine, bt: BoundTarget, column: str, after: Any | None, limit: int,
    upto: Any | None = None,
) -> list[Row]:
    """The next `limit` rows of one column, in primary-key order, after key `after`
    (and up to key `upto`, the end of a range, when given)."""
    q = select(bt.pk, bt.col(column)).order_by(bt.pk).limit(limit)
    # A NULL key sorts first on SQLite, and no cursor can get past it: never read one.
    q = q.where(bt.pk > after) if after is not None else q.where(bt.pk.is_not(None))
    if upto is not None:
        q = q.where(bt.pk <= upto)
    with engine.connect() as conn:
        return [Row(pk, value) for pk, value in conn.execute(q)]


def primary_key_of(engine: Engine, table: str) -> str:
    """The name of a table's one primary-key column (for a table the journal names)."""
    with engine.connect() as conn:
        insp = inspect(conn)
        if not insp.has_table(table):
            raise ConfigError(
                f"the journal names table {table}, which no longer exists: restore it or "
                "check --db; nothing was written"
            )
        cols = insp.get_pk_constraint(table).get("constrained_columns") or []
    if len(cols) != 1:
        raise ConfigError(f"table {table} no longer has a single-column primary key")
    return str(cols[0])
