"""Helpers shared by the tests: build a sample database, snapshot target columns, settings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, select

from migration.config import Settings
from migration.kms import KMS, RetryPolicy
from migration.sample import (
    SampleSecrets,
    coinflip_metadata,
    create_coinflip_schema,
    fill_coinflip,
)

Cell = tuple[str, str, str]  # (table, primary key as text, column)


def make_db(url: str, rows: int, current: str, legacy: str | None = None,
            *, bad_values: bool = True, seed: int = 7) -> SampleSecrets:
    """Create the coinflip schema at `url` and fill it; return the truth about each cell."""
    eng = create_engine(url)
    create_coinflip_schema(eng)
    truth = fill_coinflip(eng, rows, current, legacy, bad_values=bad_values, seed=seed)
    eng.dispose()
    return truth


def snapshot(url: str) -> dict[Cell, Any]:
    """Every target cell's exact stored value."""
    _, users, wagers = coinflip_metadata()
    eng = create_engine(url)
    out: dict[Cell, Any] = {}
    with eng.connect() as conn:
        for t, pk in ((users, "user_id"), (wagers, "wager_id")):
            cols = [c for c in t.c if c.name.endswith("secret")]
            for row in conn.execute(select(t.c[pk], *cols)):
                for c, v in zip(cols, row[1:], strict=True):
                    out[(t.name, str(row[0]), c.name)] = v
    eng.dispose()
    return out


def settings_for(url: str, current: str, legacy: str | None = None, **kw: Any) -> Settings:
    keys = (current, legacy) if legacy else (current,)
    kw.setdefault("batch_size", 25)
    kw.setdefault("concurrency", 4)
    return Settings(db_url=url, fernet_keys=keys, **kw)


def make_kms(client: Any, settings: Settings, sleep: Any = None) -> KMS:
    return KMS(client, settings.key_id, settings.region, concurrency=settings.concurrency,
               policy=RetryPolicy(max_attempts=5), sleep=sleep or (lambda s: None))
