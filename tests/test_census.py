"""The key census (issue 13): verify counts the values by format and key, records the count
in the bookkeeping (never a target table, never creating the schema), and `status` shows
the latest one, so that an operator sees "0 values under the old key" before disabling it."""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text, update

from checkpoints.tables import census
from migration.census import by_key, census_rows
from migration.codec import FernetCodec
from migration.config import Settings, load_targets
from migration.db import make_engine
from migration.sample import coinflip_metadata
from migration.verify import VerifyResult, verify
from tests.conftest import Keys, KmsHandle, kms_migrate_bin
from tests.helpers import (
    assert_clean,
    assert_no_leaks,
    bookkeeping_tables,
    dump_bookkeeping,
    make_db,
    make_kms,
    run_main,
    snapshot,
)

Tally = dict[tuple[str, str, str], int]  # (column, format, key) -> values


def _verify(url: str, client: Any, fernet_keys: tuple[str, ...], **kw: Any) -> VerifyResult:
    """verify() over `url` with these Fernet keys (none: verify needs none)."""
    kw.setdefault("batch_size", 4)
    s = Settings(db_url=url, fernet_keys=fernet_keys, concurrency=4, **kw)
    engine = make_engine(url, read_only=True)
    try:
        return verify(s, engine=engine, kms=make_kms(client, s))
    finally:
        engine.dispose()


def _tally(result: VerifyResult) -> Tally:
    return {(r.column_name, r.format, r.key): r.count for r in census_rows(result)}


def _kms_text(client: Any, key: str, plaintext: bytes) -> str:
    return base64.b64encode(client.encrypt(KeyId=key, Plaintext=plaintext)["CiphertextBlob"]
                            ).decode()


def _vault(url: str, folder: Path, secrets: list[Any], notes: list[Any]) -> str:
    """Table vault (id, secret, note) holding the values given; a --config naming both."""
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE vault (id INTEGER PRIMARY KEY, secret TEXT, note TEXT)"))
        for i, (s, n) in enumerate(zip(secrets, notes, strict=True), 1):
            conn.execute(text("INSERT INTO vault (id, secret, note) VALUES (:i, :s, :n)"),
                         {"i": i, "s": s, "n": n})
    eng.dispose()
    config = folder / "vault.toml"
    config.write_text('[[targets]]\ntable = "vault"\nprimary_key = "id"\n'
                      'columns = ["secret", "note"]\n')
    return str(config)


def _tampered(stored: str) -> str:
    blob = bytearray(base64.b64decode(stored))
    blob[-1] ^= 0xFF
    return base64.b64encode(bytes(blob)).decode()


def test_verify_counts_each_value_by_format_and_key(
    db_url: str, kms: KmsHandle, keys: Keys, tmp_path: Path
) -> None:
    other = kms.client.create_key()["KeyMetadata"]["Arn"]
    cur, old = Fernet(keys.current.encode()), Fernet(keys.legacy.encode())
    nobody = Fernet(Fernet.generate_key())
    secrets = [
        *(cur.encrypt(b"c%d" % i).decode() for i in range(3)),
        *(old.encrypt(b"l%d" % i).decode() for i in range(2)),
        nobody.encrypt(b"x").decode(),                                  # a key nobody has
        cur.encrypt(b"y").decode()[:-12] + "AAAAAAAAAAA=",              # corrupt
        *(_kms_text(kms.client, kms.arn, b"k%d" % i) for i in range(4)),
        *(_kms_text(kms.client, other, b"o%d" % i) for i in range(2)),
        None, "",
        "not base64 at all!",
        _tampered(_kms_text(kms.client, kms.arn, b"t")),
    ]
    notes = [None] * len(secrets)
    notes[0], notes[1], notes[2] = _kms_text(kms.client, kms.arn, b"n"), "", \
        old.encrypt(b"m").decode()
    config = _vault(db_url, tmp_path, secrets, notes)

    res = _verify(db_url, kms.client, (keys.current, keys.legacy),
                  targets=load_targets(config))
    assert _tally(res) == {
        ("secret", "kms", kms.arn): 4, ("secret", "kms", other): 2,
        ("secret", "fernet", "current"): 3, ("secret", "fernet", "legacy #1"): 2,
        ("secret", "fernet", ""): 2,
        ("secret", "empty", ""): 2, ("secret", "unreadable", ""): 2,
        ("note", "kms", kms.arn): 1,
        ("note", "fernet", "current"): 0, ("note", "fernet", "legacy #1"): 1,
        ("note", "empty", ""): len(notes) - 2, ("note", "unreadable", ""): 0,
    }
    # The census is added information: verify's own counts and verdict are as before.
    [sec, note] = res.columns
    assert (sec.kms_ok, sec.fernet_left, sec.empty, sec.undecryptable, sec.other_key) == \
        (4, 7, 2, 2, 2)
    assert (note.kms_ok, note.fernet_left, note.empty) == (1, 1, len(notes) - 2)
    assert not res.ok and len(res.problems) == 7 + 2 + 2 + 1
    # Every row counted once: the census of a column sums to its rows.
    for c in res.columns:
        assert sum(n for (col, _, _), n in _tally(res).items() if col == c.column) == \
            len(secrets)

    # Without a Fernet key, verify still verifies, the same way; the tokens have no key.
    bare = _verify(db_url, kms.client, (), targets=load_targets(config))
    assert [(c.kms_ok, c.fernet_left, c.undecryptable, c.other_key) for c in bare.columns] \
        == [(c.kms_ok, c.fernet_left, c.undecryptable, c.other_key) for c in res.columns]
    assert bare.problems == res.problems
    tally = _tally(bare)
    assert tally[("secret", "fernet", "")] == 7 and tally[("note", "fernet", "")] == 1
    assert not any(key for (_, fmt, key) in tally if fmt == "fernet")


def test_which_key_checks_the_token_and_never_decrypts_it(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    cur, old = Fernet(keys.current.encode()), Fernet(keys.legacy.encode())
    second_legacy = Fernet.generate_key().decode()
    tokens = {"current": cur.encrypt(b"a").decode(), "legacy #1": old.encrypt(b"b").decode(),
              "legacy #2": Fernet(second_legacy.encode()).encrypt(b"c").decode()}
    codec = FernetCodec([keys.current, keys.legacy, second_legacy])

    def no_decrypting(*a: Any, **k: Any) -> Any:
        raise AssertionError("which_key decrypted a token")

    monkeypatch.setattr(Fernet, "decrypt", no_decrypting)
    monkeypatch.setattr(Fernet, "_decrypt_data", no_decrypting)
    for label, token in tokens.items():
        assert codec.which_key(token) == label
    assert codec.which_key(tokens["current"][:-12] + "AAAAAAAAAAA=") == ""
    assert codec.which_key(Fernet(Fernet.generate_key()).encrypt(b"d").decode()) == ""
    assert codec.which_key("gAAAAAé non-ascii") == ""
    assert codec.which_key("gAAAAA") == ""


# -- through the command line: recorded, and shown by status ---------------------------------

def _census_rows(url: str) -> list[tuple[Any, ...]]:
    eng = create_engine(url)
    with eng.connect() as conn:
        rows = [tuple(r) for r in conn.execute(
            select(census.c.taken, census.c.table_name, census.c.column_name,
                   census.c.format, census.c.key, census.c.count).order_by(census.c.id))]
    eng.dispose()
    return rows


def _rekey_by_hand(url: str, client: Any, dest: str) -> None:
    """Put every KMS value of the coinflip targets under `dest` (what a rekey run does)."""
    _, users, wagers = coinflip_metadata()
    eng = create_engine(url)
    with eng.begin() as conn:
        for (table, pk, column), value in snapshot(url).items():
            if not value or value.startswith("gAAAAA"):
                continue
            blob = client.re_encrypt(CiphertextBlob=base64.b64decode(value),
                                     DestinationKeyId=dest)["CiphertextBlob"]
            t = users if table == "users" else wagers
            key = t.c.user_id == int(pk) if table == "users" else t.c.wager_id == pk
            conn.execute(update(t).where(key).values(
                {column: base64.b64encode(blob).decode()}))
    eng.dispose()


def test_cli_verify_records_its_census_and_status_shows_the_old_key_at_zero(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys
) -> None:
    truth = make_db(db_url, 30, env_keys.current, env_keys.legacy)
    code, _, err = run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-backup",
                            "--no-progress")
    assert code == 1, err  # the sample's three bad values
    code, out, err = run_main(capsys, "verify", "--db", db_url)
    assert code == 1 and err == "", err  # exit and verdict as before: bad values are left
    assert out.rstrip().endswith("verify: FAILED")
    first = _census_rows(db_url)
    taken = first[0][0]
    assert f"values by key (census #{taken};" in out
    assert {r[0] for r in first} == {taken}
    good = len(truth.plaintexts)
    totals = Counter[tuple[str, str]]()
    for _, _, _, fmt, key, n in first:
        totals[(fmt, key)] += n
    # The bad values: a corrupt token and one under a key nobody has (no key opens them),
    # and an oversize one under the current key (migrate left it).
    assert dict(totals) == {("kms", kms.arn): good, ("fernet", "current"): 1,
                            ("fernet", "legacy #1"): 0, ("fernet", ""): 2,
                            ("empty", ""): len(truth.empty), ("unreadable", ""): 0}
    assert f"{kms.arn} (verify's key)" in out

    # A rekey moves every value to a new key; verify with it says 0 under the old one.
    new = kms.client.create_key()["KeyMetadata"]["Arn"]
    _rekey_by_hand(db_url, kms.client, new)
    code, out, err = run_main(capsys, "verify", "--db", db_url, "--key-id", new)
    assert code == 1 and err == "", err
    old_line = next(line for line in out.splitlines() if kms.arn in line)
    assert old_line.split() == ["kms", "0", kms.arn]

    code, out, err = run_main(capsys, "status", "--db", db_url, "--json")
    assert code == 0, err
    report = json.loads(out)
    latest = report["census"]
    assert latest["taken"] > taken
    assert latest["by_key"] == {
        "kms": {new: good, kms.arn: 0},
        "fernet": {"current": 1, "legacy #1": 0, "": 2},
        "empty": {"": len(truth.empty)}, "unreadable": {"": 0}}
    assert [(c["table"], c["column"]) for c in latest["columns"]] == [
        ("users", "encrypted_secret"), ("users", "referral_payout_escrow_secret"),
        ("wagers", "creator_escrow_secret"), ("wagers", "acceptor_escrow_secret")]
    for fmt in ("kms", "fernet", "empty", "unreadable"):
        assert sum(sum(c["by_key"][fmt].values()) for c in latest["columns"]) == \
            sum(latest["by_key"][fmt].values())
    assert {"runs", "run_id", "progress", "failures", "journal"} <= set(report)

    code, out, err = run_main(capsys, "status", "--db", db_url)
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines)
              if line.startswith(f"census of verify #{latest['taken']} at "))
    assert lines[at + 1] == (f"  {good:,} KMS under {new}; 0 KMS under {kms.arn}; 3 Fernet "
                             f"(1 current, 0 legacy #1, 2 under no key given); "
                             f"{len(truth.empty)} empty; 0 unreadable")
    assert_no_leaks([out, err, json.dumps(report)], dump_bookkeeping(db_url), truth, env_keys)


def test_verify_with_no_bookkeeping_creates_nothing(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys
) -> None:
    make_db(db_url, 10, env_keys.current, env_keys.legacy)
    before = snapshot(db_url)
    code, out, err = run_main(capsys, "verify", "--db", db_url)
    assert code == 1 and err == "", err  # every value is still a Fernet token
    assert "values by key (not recorded: this database has no kms-migrate bookkeeping" in out
    assert bookkeeping_tables(db_url) == []
    assert snapshot(db_url) == before
    code, out, err = run_main(capsys, "status", "--db", db_url, "--json")
    assert code == 0 and json.loads(out) == {"runs": [], "census": None}
    assert_clean(out, err, keys=env_keys)


def _forbid_census_writes(url: str) -> str:
    """A database where the census cannot be written; the URL to verify with. PostgreSQL:
    a role that may only read (the usual verify role). SQLite: a trigger refusing inserts."""
    eng = create_engine(url)
    with eng.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname "
                              "= 'census_reader') THEN CREATE ROLE census_reader LOGIN; "
                              "END IF; END $$"))
            conn.execute(text("GRANT SELECT ON ALL TABLES IN SCHEMA public TO census_reader"))
        else:
            conn.execute(text("CREATE TRIGGER no_census BEFORE INSERT ON kms_migrate_census "
                              "BEGIN SELECT RAISE(ABORT, 'the census is read-only here'); END"))
    eng.dispose()
    return url.replace("//postgres@", "//census_reader@")


def test_a_census_that_cannot_be_recorded_is_one_warning_and_verify_exits_as_before(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys
) -> None:
    make_db(db_url, 10, env_keys.current, bad_values=False)
    code, _, err = run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-backup",
                            "--no-progress")
    assert code == 0, err
    url = _forbid_census_writes(db_url)
    code, out, err = run_main(capsys, "verify", "--db", url)
    assert code == 0, err
    assert out.rstrip().endswith("verify: OK")
    assert "values by key:" in out
    [line] = err.splitlines()
    assert line.startswith("kms-migrate: warning: verify's census was not recorded (")
    assert ("permission denied" in line) if "census_reader" in url else \
        ("the census is read-only here" in line)
    assert _census_rows(db_url) == []
    assert_clean(out, err, keys=env_keys)


def test_a_malformed_fernet_key_is_a_warning_and_verify_goes_on(
    capsys: Any, sqlite_url: str, kms: KmsHandle, env_keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(sqlite_url, 10, env_keys.current, env_keys.legacy)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", "not-a-fernet-key")
    code, out, err = run_main(capsys, "verify", "--db", sqlite_url)
    assert code == 1  # the Fernet tokens are left, as before
    [line] = err.splitlines()
    assert line.startswith("kms-migrate: warning: ENCRYPTION_KEY_LEGACY key #1 is not a "
                           "valid Fernet key")
    assert "not-a-fernet-key" not in out + err
    tokens = len([v for v in snapshot(sqlite_url).values() if v])
    assert ["fernet", f"{tokens:,}", "no", "key", "given"] in [
        line.split() for line in out.splitlines()], out
    assert_clean(out, err, keys=env_keys)


# -- verify --workers, through the real CLI: the same census, recorded once --------------

def test_cli_verify_workers_records_the_census_one_process_gives(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, cli_env: dict[str, str],
) -> None:
    truth = make_db(sqlite_url, 40, keys.current, keys.legacy)
    cmd = [kms_migrate_bin(), "verify", "--db", sqlite_url, "--batch-size", "10"]
    mig = subprocess.run([kms_migrate_bin(), "migrate", "--db", sqlite_url, "--yes",
                          "--no-progress", "--no-backup"], env=cli_env, capture_output=True,
                         text=True, timeout=120)
    assert mig.returncode == 1, mig.stderr
    one = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    par = subprocess.run([*cmd, "--workers", "2", "--rows-per-range", "15"], env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == par.returncode == 1, (one.stderr, par.stderr)
    status = subprocess.run([kms_migrate_bin(), "status", "--db", sqlite_url, "--json"],
                            env=cli_env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    latest = json.loads(status.stdout)["census"]
    rows = _census_rows(sqlite_url)
    takens = sorted({r[0] for r in rows})
    assert len(takens) == 2 and latest["taken"] == takens[1]
    assert [r[1:] for r in rows if r[0] == takens[0]] == \
        [r[1:] for r in rows if r[0] == takens[1]]
    assert sum(n for keys_ in latest["by_key"].values() for n in keys_.values()) == \
        4 * 40
    assert latest["by_key"]["kms"] == {server_kms.arn: len(truth.plaintexts)}
    for res in (one, par, status, mig):
        assert_clean(res.stdout, res.stderr, keys=keys)
    assert_no_leaks([one.stdout, par.stdout, status.stdout], dump_bookkeeping(sqlite_url),
                    truth, keys)


# -- property: for any mix of values, the census is the truth ------------------------------

KINDS = ("current", "legacy", "nobody", "corrupt", "kms", "other", "null", "blank",
         "garbage", "tampered")


@pytest.fixture(scope="module")
def pools(module_kms: KmsHandle) -> dict[str, Any]:
    """A few KMS texts under the configured key and under another, made once."""
    other = module_kms.client.create_key()["KeyMetadata"]["Arn"]
    mine = [_kms_text(module_kms.client, module_kms.arn, b"p%d" % i) for i in range(3)]
    return {"other_arn": other, "kms": mine, "tampered": [_tampered(t) for t in mine],
            "other": [_kms_text(module_kms.client, other, b"q%d" % i) for i in range(3)],
            "keys": Keys(Fernet.generate_key().decode(), Fernet.generate_key().decode())}


def _value(kind: str, i: int, keys: Keys, pools: dict[str, Any]) -> str | None:
    cur, old = Fernet(keys.current.encode()), Fernet(keys.legacy.encode())
    if kind in ("kms", "other", "tampered"):
        return str(pools[kind][i % 3])
    made = {"current": lambda: cur.encrypt(b"v").decode(),
            "legacy": lambda: old.encrypt(b"v").decode(),
            "nobody": lambda: Fernet(Fernet.generate_key()).encrypt(b"v").decode(),
            "corrupt": lambda: cur.encrypt(b"v").decode()[:-12] + "AAAAAAAAAAA=",
            "null": lambda: None, "blank": lambda: "", "garbage": lambda: "not ~ base64"}
    return made[kind]()


EXPECTED = {"current": ("fernet", "current"), "legacy": ("fernet", "legacy #1"),
            "nobody": ("fernet", ""), "corrupt": ("fernet", ""), "null": ("empty", ""),
            "blank": ("empty", ""), "garbage": ("unreadable", ""),
            "tampered": ("unreadable", "")}


@hsettings(max_examples=15, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=14),
       batch=st.integers(1, 5), with_keys=st.booleans())
def test_the_census_of_any_mix_is_the_truth(
    module_kms: KmsHandle, pools: dict[str, Any], kinds: list[str], batch: int,
    with_keys: bool,
) -> None:
    keys: Keys = pools["keys"]
    values = [_value(kind, i, keys, pools) for i, kind in enumerate(kinds)]
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/mix.db"
        config = _vault(url, Path(folder), values, [None] * len(values))
        res = _verify(url, module_kms.client, (keys.current, keys.legacy) if with_keys else (),
                      batch_size=batch, targets=load_targets(config))
    truth = Counter[tuple[str, str]]()
    for kind in kinds:
        fmt, key = {"kms": ("kms", module_kms.arn), "other": ("kms", pools["other_arn"])
                    }.get(kind) or EXPECTED[kind]
        truth[(fmt, key if with_keys or fmt != "fernet" else "")] += 1
    secret = by_key(r for r in census_rows(res) if r.column_name == "secret")
    got = {(fmt, key): n for fmt, keys_ in secret.items() for key, n in keys_.items() if n}
    assert got == dict(truth)
    assert sum(n for keys_ in secret.values() for n in keys_.values()) == len(values)
    # Every key given and the configured one are named, at 0 when nothing is under them.
    assert module_kms.arn in secret["kms"]
    assert set(secret["fernet"]) >= ({"current", "legacy #1"} if with_keys else {""})
