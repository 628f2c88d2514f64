"""A throwaway PostgreSQL server: initdb in a temporary folder, started on a free port.

Used by the test suite (the `pg_server` fixture) and by the worker benchmark. As root,
the server runs as `nobody` (PostgreSQL refuses to run as root).
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


@dataclass
class PgServer:
    port: int
    admin_url: str

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
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        for p in (tmp, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    port = free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True, env=env, cwd=tmp, **run_as,
    )
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(tmp / "log"),
         "-w", "-t", "60", "start"],
        check=True, capture_output=True, env=env, cwd=tmp, **run_as,
    )
    try:
        yield PgServer(port, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, env=env, cwd=tmp, **run_as)
        shutil.rmtree(tmp, ignore_errors=True)


