"""The guide's coinflip schema and a sample of secrets, for the demo, tests and benchmarks.

The mixture is what a real column holds after years of use: current-key tokens,
legacy-key tokens, NULLs, empty strings, a corrupt token and an oversize plaintext.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.fernet import Fernet
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Text, insert

__all__ = ["SampleSecrets", "coinflip_metadata", "create_coinflip_schema", "fill_coinflip"]

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def coinflip_metadata() -> tuple[MetaData, Table, Table]:
    md = MetaData()
    users = Table(
        "users", md,
        Column("user_id", Integer, primary_key=True, autoincrement=False),
        Column("username", String(64)),
        Column("encrypted_secret", Text),
        Column("referral_payout_escrow_secret", Text),
    )
    wagers = Table(
        "wagers", md,
        Column("wager_id", String(64), primary_key=True),
        Column("amount_lamports", Integer),
        Column("creator_escrow_secret", Text),
        Column("acceptor_escrow_secret", Text),
    )
    return md, users, wagers


def create_coinflip_schema(engine: Engine) -> None:
    md, _, _ = coinflip_metadata()
    md.create_all(engine)


@dataclass
class SampleSecrets:
    """What the sample holds: the plaintext behind every good value, and the bad cells."""

    plaintexts: dict[tuple[str, str, str], str] = field(default_factory=dict)
    bad: dict[tuple[str, str, str], str] = field(default_factory=dict)  # cell -> why it is bad
    empty: set[tuple[str, str, str]] = field(default_factory=set)


def _secret(rng: random.Random) -> str:
    return "".join(rng.choice(B58) for _ in range(88))


def fill_coinflip(  # noqa: C901
    engine: Engine,
    rows: int,
    current_key: str,
    legacy_key: str | None = None,
    *,
    seed: int = 7,
    bad_values: bool = True,
) -> SampleSecrets:
    """Insert `rows` users and `rows` wagers; return the truth to check results against."""
    rng = random.Random(seed)
    cur = Fernet(current_key.encode())
    old = Fernet(legacy_key.encode()) if legacy_key else None
    stranger = Fernet(Fernet.generate_key())
    truth = SampleSecrets()
    _, users, wagers = coinflip_metadata()

    def cell(table: str, pk: str, column: str, i: int) -> str | None:
        key = (table, pk, column)
        roll = rng.random()
        if roll < 0.06:
            truth.empty.add(key)
            return None
        if roll < 0.09:
            truth.empty.add(key)
            return ""
        plaintext = _secret(rng)
        truth.plaintexts[key] = plaintext
        f = old if (old is not None and roll < 0.25) else cur
        return f.encrypt(plaintext.encode()).decode()

    def user_rows() -> Iterator[dict[str, object]]:
        for i in range(1, rows + 1):
            pk = str(i)
            yield {
                "user_id": i,
                "username": "".join(rng.choice(string.ascii_lowercase) for _ in range(8)),
                "encrypted_secret": cell("users", pk, "encrypted_secret", i),
                "referral_payout_escrow_secret": cell(
                    "users", pk, "referral_payout_escrow_secret", i),
            }

    def wager_rows() -> Iterator[dict[str, object]]:
        for i in range(1, rows + 1):
            pk = f"wgr_{rng.getrandbits(64):016x}"
            yield {
                "wager_id": pk,
                "amount_lamports": rng.randrange(1, 10**9),
                "creator_escrow_secret": cell("wagers", pk, "creator_escrow_secret", i),
                "acceptor_escrow_secret": cell("wagers", pk, "acceptor_escrow_secret", i),
            }

    with engine.begin() as conn:
        batch: list[dict[str, object]] = []
        for table, gen in ((users, user_rows()), (wagers, wager_rows())):
            for r in gen:
                batch.append(r)
                if len(batch) == 1000:
                    conn.execute(insert(table), batch)
                    batch = []
            if batch:
                conn.execute(insert(table), batch)
                batch = []
        if bad_values and rows >= 3:
            from sqlalchemy import update

            def put(pk: int, column: str, value: str, why: str) -> None:
                conn.execute(update(users).where(users.c.user_id == pk).values({column: value}))
                key = ("users", str(pk), column)
                truth.plaintexts.pop(key, None)
                truth.empty.discard(key)
                truth.bad[key] = why

            good = cur.encrypt(_secret(rng).encode()).decode()
            put(1, "encrypted_secret", good[:-12] + "AAAAAAAAAAA=", "corrupt")
            put(2, "encrypted_secret", stranger.encrypt(b"someone else's key").decode(),
                "unknown key")
            put(3, "referral_payout_escrow_secret",
                cur.encrypt(("x" * 5000).encode()).decode(), "oversize")
    return truth
