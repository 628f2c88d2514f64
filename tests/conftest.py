"""Shared fixtures: Fernet keys, moto KMS (in-process and server mode), SQLite and a real
PostgreSQL server that the suite starts itself (initdb into a temporary folder, run as an
unprivileged user when the suite runs as root).

When no PostgreSQL binaries are found the PostgreSQL tests skip with the reason, except
under CI=true, where a missing server fails the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, settings

from tests.pgserver import (
    PgServer,
    Replica,
    free_port,
    pg_bindir,
    running_pg_server,
    running_replica,
)

# Never let a test reach real AWS: fake credentials, no profile, a fixed region.
for _var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_KMS", "AWS_KMS_KEY_ID", "AWS_KMS_KEY_ID_PREVIOUS", "DATABASE_URL",
             "ENCRYPTION_KEY", "ENCRYPTION_KEY_LEGACY"):
    os.environ.pop(_var, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
AWS_SECRET = "testing-secret-never-printed"
os.environ["AWS_SECRET_ACCESS_KEY"] = AWS_SECRET
os.environ["AWS_REGION"] = "us-east-1"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull

REPO = Path(__file__).resolve().parent.parent
ALIAS = "alias/coinflip-master-key"


@pytest.fixture(autouse=True)
def _logging_to_stderr() -> None:
    """Each test starts with logging on stderr: a command run in-process by an earlier test
    may have pointed it at a --log-file that is closed by now."""
    from migration.logs import configure_logging

    configure_logging("warning")


@pytest.fixture(autouse=True)
def _environment_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test leaves os.environ as it found it: a variable set by hand (not through
    monkeypatch) outlives the test and changes what later tests' subprocesses run with
    (a leaked AWS_KMS_KEY_ID once made eleven unrelated tests name a missing key)."""
    before = dict(os.environ)
    yield
    changed = sorted(k for k in before.keys() | os.environ.keys()
                     if before.get(k) != os.environ.get(k) and k != "PYTEST_CURRENT_TEST")
    if changed:
        os.environ.clear()
        os.environ.update(before)
        pytest.fail(f"{request.node.nodeid} left the environment changed: {changed}")


@pytest.fixture(autouse=True)
def _engines_disposed() -> Iterator[None]:
    """Every engine a test connected through is disposed when the test ends: its own, and
    the ones handed to the code under test (`migrate(s, engine=make_engine(url), ...)`),
    which the code does not dispose since the caller owns them. Left to the garbage
    collector, each keeps its pooled connections, PostgreSQL sessions, open until then."""
    import weakref

    from sqlalchemy import Connection, Engine, event

    # Weak references: an engine the code dropped is collected (its connections closed) as
    # it would be without this fixture; a test that runs thousands of commands (the state
    # machine) must not keep every engine, and its PostgreSQL sessions, alive to its end.
    engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    def connected(conn: Connection) -> None:
        engines.add(conn.engine)

    event.listen(Engine, "engine_connect", connected)
    try:
        yield
    finally:
        event.remove(Engine, "engine_connect", connected)
        for engine in list(engines):
            engine.dispose()


# -- Fernet ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    current: str
    legacy: str

    def env(self) -> dict[str, str]:
        return {"ENCRYPTION_KEY": self.current, "ENCRYPTION_KEY_LEGACY": self.legacy}


@pytest.fixture
def keys() -> Keys:
    return Keys(Fernet.generate_key().decode(), Fernet.generate_key().decode())


@pytest.fixture
def env_keys(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """The keys, exported as the CLI reads them (ENCRYPTION_KEY, ENCRYPTION_KEY_LEGACY)."""
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return keys


# -- KMS in-process (moto) ------------------------------------------------------------------

@dataclass
class KmsHandle:
    client: Any
    key_id: str
    arn: str
    region: str = "us-east-1"

    def decrypt_text(self, stored: str) -> str:
        import base64

        blob = base64.b64decode(stored.encode())
        return str(self.client.decrypt(CiphertextBlob=blob)["Plaintext"].decode())


def _make_key(client: Any, alias: str = ALIAS) -> KmsHandle:
    meta = client.create_key(Description="kms-migrate test key",
                             KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    client.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
    return KmsHandle(client, meta["KeyId"], meta["Arn"])


def _mocked_kms() -> Iterator[KmsHandle]:
    from moto import mock_aws

    with mock_aws():
        yield _make_key(boto3.client("kms", region_name="us-east-1"))


@pytest.fixture
def kms() -> Iterator[KmsHandle]:
    """moto's KMS in this process, with alias/coinflip-master-key ready."""
    yield from _mocked_kms()


@pytest.fixture(scope="module")
def module_kms() -> Iterator[KmsHandle]:
    """The same, one for the whole module: hypothesis tests share it across examples."""
    yield from _mocked_kms()


# -- KMS server mode (moto_server in a subprocess), for CLI subprocess tests --------------

@dataclass
class MotoServer:
    url: str

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def client(self) -> Any:
        return boto3.client("kms", region_name="us-east-1", endpoint_url=self.url)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    try:
        yield MotoServer(url)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def server_kms(moto_server: MotoServer) -> KmsHandle:
    """A fresh key (alias/coinflip-master-key) on the moto server."""
    moto_server.reset()
    return _make_key(moto_server.client())


@pytest.fixture
def cli_env(moto_server: MotoServer, keys: Keys) -> dict[str, str]:
    """Environment for running the real CLI against the moto server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(keys.env())
    env["AWS_ENDPOINT_URL_KMS"] = moto_server.url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kms_migrate_bin() -> str:
    exe = Path(sys.executable).parent / "kms-migrate"
    return str(exe) if exe.exists() else "kms-migrate"


# -- PostgreSQL -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if pg_bindir() is None:
        msg = "no PostgreSQL server binaries (initdb, pg_ctl) found"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg}; CI requires them (.ci/run installs postgresql)")
        pytest.skip(msg)
    with running_pg_server() as server:
        yield server


@pytest.fixture(scope="session")
def pg_replica() -> Iterator[Replica]:
    """A streaming replica (hot standby) and its primary (`pg_replica.primary`), started only
    for the tests that ask for it. The primary is a server of its own, not `pg_server`:
    pg_basebackup would copy every database the suite made so far (a gigabyte late in a
    full run), and a test that pauses replay or counts sessions stays out of other tests' way.
    """
    bindir = pg_bindir()
    if bindir is None or not (bindir / "pg_basebackup").exists():
        msg = "no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) found"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg}; CI requires them (.ci/run installs postgresql)")
        pytest.skip(msg)
    with running_pg_server() as primary, running_replica(primary) as replica:
        yield replica


# -- databases ------------------------------------------------------------------------------

@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coinflip.db'}"


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a SQLite file and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coinflip.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


# -- hypothesis profiles --------------------------------------------------------------------
# The state machine (tests/test_stateful.py) runs the "stateful" profile in `make test`;
# HYPOTHESIS_PROFILE=long runs it (and every @given without its own settings) much longer.
_SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
            HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("stateful", max_examples=12, stateful_step_count=12, deadline=None,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=400, stateful_step_count=40, deadline=None,
                          suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "default")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Any]:
    """An engine on an empty SQLite file (the steering tests' control rows)."""
    from sqlalchemy import create_engine

    eng = create_engine(f"sqlite:///{tmp_path / 'steer.db'}")
    yield eng
    eng.dispose()
