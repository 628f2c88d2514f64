"""A throwaway PostgreSQL server: initdb in a temporary folder, started on a free port.

Used by the test suite (the `pg_server` fixture) and by the worker benchmark. As root,
the server runs as `nobody` (PostgreSQL refuses to run as root).

`running_replica` starts a streaming replica of such a server (pg_basebackup -R) on another
free port: the `pg_replica` fixture, for the database guard's replica-lag tests.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    candidates: list[str] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb") or "").resolve().parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _run_as() -> dict[str, Any]:
    """subprocess arguments that run a server command as `nobody` when this process is root."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("nobody")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _give(*paths: Path) -> None:
    """Hand folders to the user the server runs as (`nobody` when root)."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        for p in paths:
            os.chown(p, user.pw_uid, user.pw_gid)


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "LANG": "C"}


def _pg_ctl_start(bindir: Path, data: Path, port: int, tmp: Path) -> None:
    """Start the cluster in `data` on 127.0.0.1:`port`, its socket in `tmp`/sock."""
    sock = tmp / "sock"
    sock.mkdir(exist_ok=True)
    _give(tmp, sock)
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(tmp / "log"),
         "-w", "-t", "60", "start"],
        check=True, capture_output=True, env=_env(), cwd=tmp, **_run_as(),
    )


def _pg_ctl_stop(bindir: Path, data: Path, tmp: Path) -> None:
    subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                   capture_output=True, env=_env(), cwd=tmp, **_run_as())


@dataclass
class PgServer:
    port: int
    admin_url: str
    # Where the cluster lives (`data` under it): what `running_replica` copies.
    tmp: Path | None = None

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        eng = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@contextmanager
def running_pg_server() -> Iterator[PgServer]:
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
    tmp = Path(tempfile.mkdtemp(prefix="kms-migrate-pg-"))
    data = tmp / "data"
    _give(tmp)
    port = free_port()
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True, env=_env(), cwd=tmp, **_run_as(),
    )
    _pg_ctl_start(bindir, data, port, tmp)
    try:
        yield PgServer(port, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", tmp)
    finally:
        _pg_ctl_stop(bindir, data, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class Replica:
    """A streaming replica (hot standby) of a `PgServer`: read-only, in recovery."""

    port: int
    url: str  # its `postgres` database, as the superuser `postgres` (trust: no password)
    primary: PgServer  # the server it streams from

    def url_for(self, database_url: str) -> str:
        """The replica's URL for a database of the primary (`primary.new_database()`)."""
        return database_url.replace(f"@127.0.0.1:{self.primary.port}/",
                                    f"@127.0.0.1:{self.port}/")


REPLICATION_HBA = "host replication all 127.0.0.1/32 trust"


def _allow_replication(server: PgServer, data: Path) -> None:
    """The primary accepts replication connections from 127.0.0.1 (initdb -A trust already
    writes that line; it is added, and the configuration reloaded, when it is missing)."""
    hba = data / "pg_hba.conf"
    lines = [" ".join(line.split()) for line in hba.read_text().splitlines()]
    if REPLICATION_HBA in lines:
        return
    with hba.open("a") as f:
        f.write(f"\n{REPLICATION_HBA}\n")
    eng = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text("SELECT pg_reload_conf()"))
    eng.dispose()


@contextmanager
def running_replica(server: PgServer) -> Iterator[Replica]:
    """A streaming replica of `server`: pg_basebackup -R (standby.signal, primary_conninfo)
    into a temporary folder, started on another free port as the primary is."""
    bindir = pg_bindir()
    if bindir is None or server.tmp is None:
        raise RuntimeError("a replica needs the server binaries and a running_pg_server()")
    _allow_replication(server, server.tmp / "data")
    tmp = Path(tempfile.mkdtemp(prefix="kms-migrate-pg-replica-"))
    data = tmp / "data"
    _give(tmp)
    subprocess.run(
        [str(bindir / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream", "--no-sync",
         "-c", "fast", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"],
        check=True, capture_output=True, env=_env(), cwd=tmp, **_run_as(),
    )
    port = free_port()
    _pg_ctl_start(bindir, data, port, tmp)
    try:
        yield Replica(port, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", server)
    finally:
        _pg_ctl_stop(bindir, data, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
