"""Property tests: for random mixtures of values, keys, primary-key types and batch sizes,
migrate then rollback gives byte-identical tables, and migrate then verify passes for every
good value and reports every bad one."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, create_engine, insert, select

from migration.codec import encode_kms
from migration.config import Settings, Target
from migration.db import make_engine
from migration.errors import ConfigError
from migration.rollback import rollback
from migration.verify import verify
from tests.conftest import ALIAS, KmsHandle
from tests.helpers import make_kms, run_migrate

CURRENT, LEGACY, STRANGER = (Fernet.generate_key().decode() for _ in range(3))
KINDS = ["null", "empty", "current", "legacy", "unknown", "corrupt", "oversize", "kms", "unicode"]
GOOD = {"current", "legacy", "unicode"}
BAD = {"unknown", "corrupt", "oversize"}

cell_st = st.tuples(st.sampled_from(KINDS), st.text(min_size=1, max_size=40))
table_st = st.fixed_dictionaries({
    "int_pk": st.booleans(),
    "rows": st.lists(st.tuples(cell_st, cell_st), max_size=30),
    "batch_size": st.integers(1, 50),
})


def _value(kind: str, text: str, client: Any) -> tuple[str | None, str | None]:
    """The stored value for a drawn kind, and the plaintext a good value must decrypt to."""
    cur, old, stranger = (Fernet(k.encode()) for k in (CURRENT, LEGACY, STRANGER))
    if kind == "null":
        return None, None
    if kind == "empty":
        return "", None
    if kind == "current":
        return cur.encrypt(text.encode()).decode(), text
    if kind == "legacy":
        return old.encrypt(text.encode()).decode(), text
    if kind == "unicode":
        t = f"ключ-{text}-秘密-🔑"
        return cur.encrypt(t.encode()).decode(), t
    if kind == "unknown":
        return stranger.encrypt(text.encode()).decode(), None
    if kind == "corrupt":
        tok = cur.encrypt(text.encode()).decode()
        return tok[:-8] + ("A" if tok[-8] != "A" else "B") + tok[-7:], None
    if kind == "oversize":
        return cur.encrypt((text * 5000)[:4097 + len(text)].encode()).decode(), None
    blob = client.encrypt(KeyId=ALIAS, Plaintext=text.encode())["CiphertextBlob"]
    return encode_kms(blob), text


def _check(url: str, spec: dict[str, Any], client: Any) -> None:
    md = MetaData()
    pk_type = Integer if spec["int_pk"] else String(40)
    t = Table("secrets", md, Column("id", pk_type, primary_key=True, autoincrement=False),
              Column("a", Text), Column("b", Text))
    eng = create_engine(url)
    md.create_all(eng)
    expect: dict[tuple[Any, str], tuple[str, str | None]] = {}
    rows = []
    for i, (ca, cb) in enumerate(spec["rows"]):
        pk: Any = i * 7 + 3 if spec["int_pk"] else f"k{(i * 7919) % 1000:03d}-{i}"
        row: dict[str, Any] = {"id": pk}
        for col, (kind, text) in (("a", ca), ("b", cb)):
            row[col], plain = _value(kind, text, client)
            expect[(pk, col)] = (kind, plain)
        rows.append(row)
    with eng.begin() as conn:
        if rows:
            conn.execute(insert(t), rows)

    def dump() -> list[tuple[Any, ...]]:
        with eng.connect() as conn:
            return [tuple(r) for r in conn.execute(select(t).order_by(t.c.id))]

    before = dump()
    s = Settings(db_url=url, targets=(Target("secrets", "id", ("a", "b")),),
                 batch_size=spec["batch_size"], concurrency=4, fernet_keys=(CURRENT, LEGACY))
    kinds = [k for k, _ in expect.values()]
    if not any(k in GOOD or k == "oversize" for k in kinds) and any(k in BAD for k in kinds):
        # Every Fernet value is unopenable: the run must refuse rather than fail them all.
        with pytest.raises(ConfigError, match="open none"):
            run_migrate(s, client)
        assert dump() == before
        eng.dispose()
        return
    result = run_migrate(s, client)
    assert {(f.pk, f.column_name) for f in result.failures} == {
        (str(pk), col) for (pk, col), (k, _) in expect.items() if k in BAD}
    assert sum(c.migrated for c in result.columns) == sum(k in GOOD for k in kinds)

    v = verify(s, engine=make_engine(url, read_only=True), kms=make_kms(client, s))
    assert sum(c.kms_ok for c in v.columns) == sum(k in GOOD or k == "kms" for k in kinds)
    assert {(pk, col) for _, col, pk, _ in v.problems} == {
        (str(pk), col) for (pk, col), (k, _) in expect.items() if k in BAD}
    with eng.connect() as conn:
        for pk, a, b in conn.execute(select(t)):
            for col, stored in (("a", a), ("b", b)):
                kind, plain = expect[(pk, col)]
                if plain is not None:
                    import base64

                    got = client.decrypt(CiphertextBlob=base64.b64decode(stored))["Plaintext"]
                    assert got.decode() == plain

    rollback(make_engine(url), batch_size=spec["batch_size"])
    assert dump() == before
    eng.dispose()


COMMON = settings(max_examples=30, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])


@COMMON
@given(spec=table_st)
def test_migrate_verify_rollback_properties_sqlite(
    module_kms: KmsHandle, spec: dict[str, Any]
) -> None:
    d = Path(tempfile.mkdtemp(prefix="kms-migrate-prop-"))
    try:
        url = f"sqlite:///{d / 'p.db'}"
        create_engine(url).connect().close()
        _check(url, spec, module_kms.client)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.postgres
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=table_st)
def test_migrate_verify_rollback_properties_postgres(
    module_kms: KmsHandle, pg_server: Any, spec: dict[str, Any]
) -> None:
    _check(pg_server.new_database(), spec, module_kms.client)
