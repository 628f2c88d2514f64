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
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    update,
)

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


def fill_coinflip(
    engine: Engine,
    rows: int,
    current_key: str,
    legacy_key: str | None = None,
    *,
    seed: int = 7,
    bad_values: bool = True,
) -> SampleSecrets:
    """Insert `rows` users and `rows` wagers; return the truth to check results against."""
    filler = _Filler(random.Random(seed), Fernet(current_key.encode()),
                     Fernet(legacy_key.encode()) if legacy_key else None)
    _, users, wagers = coinflip_metadata()
    with engine.begin() as conn:
        for table, gen in ((users, filler.user_rows(rows)), (wagers, filler.wager_rows(rows))):
            batch: list[dict[str, object]] = []
            for r in gen:
                batch.append(r)
                if len(batch) == 1000:
                    conn.execute(insert(table), batch)
                    batch = []
            if batch:
                conn.execute(insert(table), batch)
        if bad_values and rows >= 3:
            filler.spoil(conn, users)
    return filler.truth


@dataclass
class _Filler:
    """The sample's values, drawn from one seeded generator, and the truth about them."""

    rng: random.Random
    cur: Fernet
    old: Fernet | None
    truth: SampleSecrets = field(default_factory=SampleSecrets)

    def cell(self, table: str, pk: str, column: str) -> str | None:
        key = (table, pk, column)
        roll = self.rng.random()
        if roll < 0.06:
            self.truth.empty.add(key)
            return None
        if roll < 0.09:
            self.truth.empty.add(key)
            return ""
        plaintext = _secret(self.rng)
        self.truth.plaintexts[key] = plaintext
        f = self.old if (self.old is not None and roll < 0.25) else self.cur
        return f.encrypt(plaintext.encode()).decode()

    def user_rows(self, rows: int) -> Iterator[dict[str, object]]:
        for i in range(1, rows + 1):
            pk = str(i)
            yield {
                "user_id": i,
                "username": "".join(self.rng.choice(string.ascii_lowercase) for _ in range(8)),
                "encrypted_secret": self.cell("users", pk, "encrypted_secret"),
                "referral_payout_escrow_secret": self.cell(
                    "users", pk, "referral_payout_escrow_secret"),
            }

    def wager_rows(self, rows: int) -> Iterator[dict[str, object]]:
        for _ in range(rows):
            pk = f"wgr_{self.rng.getrandbits(64):016x}"
            yield {
                "wager_id": pk,
                "amount_lamports": self.rng.randrange(1, 10**9),
                "creator_escrow_secret": self.cell("wagers", pk, "creator_escrow_secret"),
                "acceptor_escrow_secret": self.cell("wagers", pk, "acceptor_escrow_secret"),
            }

    def spoil(self, conn: Connection, users: Table) -> None:
        """Three bad values in users 1-3: a corrupt token, one under a key nobody has, and
        one whose plaintext is over KMS's limit."""
        def put(pk: int, column: str, value: str, why: str) -> None:
            conn.execute(update(users).where(users.c.user_id == pk).values({column: value}))
            key = ("users", str(pk), column)
            self.truth.plaintexts.pop(key, None)
            self.truth.empty.discard(key)
            self.truth.bad[key] = why

        good = self.cur.encrypt(_secret(self.rng).encode()).decode()
        put(1, "encrypted_secret", good[:-12] + "AAAAAAAAAAA=", "corrupt")
        put(2, "encrypted_secret",
            Fernet(Fernet.generate_key()).encrypt(b"someone else's key").decode(), "unknown key")
        put(3, "referral_payout_escrow_secret",
            self.cur.encrypt(("x" * 5000).encode()).decode(), "oversize")
