"""Database credentials never reach output (issue 11, defects 7 and 15).

A password may sit in the URL's user info (``user:pw@host``) or in its query string
(``?password=...``, ``?sslpassword=...``, a token...): wherever the tool shows a URL (errors,
``status``, ``preflight``, the ``--report`` JSON, logs) every such value is hidden. And a
password on the command line (``--db``) is visible to ``ps``: the tool says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from migration.db import safe_url
from tests.conftest import Keys, KmsHandle, free_port
from tests.helpers import make_db, run_main

SECRETS = ("Hunter2-in-the-query", "Ssl-Key-Pass-77", "Tok3n-abc", "UserInfo-Pw-9")


@pytest.mark.parametrize("url", [
    "postgresql://app@db.example/prod?password=Hunter2-in-the-query",
    "postgresql://app@db.example/prod?PASSWORD=Hunter2-in-the-query&sslmode=require",
    "postgresql+psycopg://app@db.example/prod?sslpassword=Ssl-Key-Pass-77",
    "postgresql://app@db.example/prod?application_name=x&passwd=Hunter2-in-the-query",
    "postgresql://app@db.example/prod?Pwd=Hunter2-in-the-query",
    "postgresql://app@db.example/prod?secret=Hunter2-in-the-query",
    "postgresql://app@db.example/prod?auth_token=Tok3n-abc&api_key=Tok3n-abc",
    "postgresql://app:UserInfo-Pw-9@db.example/prod?password=Hunter2-in-the-query"
    "&password=Ssl-Key-Pass-77",
    "mysql+pymysql://app:UserInfo-Pw-9@db.example/prod?ssl_key_password=Ssl-Key-Pass-77",
])
def test_safe_url_hides_every_credential_in_the_url(url: str) -> None:
    shown = safe_url(url)
    for s in SECRETS:
        assert s not in shown, shown
    assert "db.example/prod" in shown and "***" in shown


def test_safe_url_keeps_harmless_query_parameters() -> None:
    shown = safe_url("postgresql://app@h/db?sslmode=require&application_name=kms-migrate")
    assert "sslmode=require" in shown and "application_name=kms-migrate" in shown


def _no_secret(*texts: str) -> None:
    for t in texts:
        for s in ("Hunter2-in-the-query", "Ssl-Key-Pass-77"):
            assert s not in t, t


@pytest.mark.postgres
def test_a_password_in_the_query_string_is_never_printed(
    pg_url: str, kms: KmsHandle, env_keys: Keys, capsys: pytest.CaptureFixture[str],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(pg_url, 10, env_keys.current, env_keys.legacy, bad_values=False)
    # The suite's server trusts local connections: the password is carried, not checked.
    url = f"{pg_url}?password=Hunter2-in-the-query&sslpassword=Ssl-Key-Pass-77"
    monkeypatch.setenv("DATABASE_URL", url)  # as the runbook says: not on the command line
    texts: list[str] = []

    def run(*args: str) -> tuple[int, str, str]:
        code, out, err = run_main(capsys, *args)
        texts.extend((out, err))
        return code, out, err

    code, out, _ = run("status")
    assert code == 0 and "no kms-migrate runs in postgresql+psycopg://postgres@" in out
    code, out, _ = run("preflight")
    assert "postgresql+psycopg://postgres@" in out
    report = tmp_path / "report.json"
    code, out, err = run("migrate", "--yes", "--no-progress", "--report", str(report),
                         "--log-level", "debug")
    assert code == 0, err
    assert "password=***" in out
    texts.append(report.read_text())
    assert "password=***" in json.loads(report.read_text())["database"]
    code, out, _ = run("status")
    assert code == 0
    code, out, _ = run("finalize")  # refuses without a terminal, naming the database
    assert code == 2
    # A server that does not answer: the connection error names the database.
    dead = url.replace(url.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{free_port()}")
    for cmd in (("status",), ("migrate", "--yes"), ("rollback", "--yes"), ("preflight",)):
        code, out, err = run(*cmd, "--db", dead)
        assert code == 2, (cmd, out, err)
    _no_secret(*texts)


def test_a_password_on_the_command_line_draws_a_warning(
    sqlite_url: str, pg_url: str, capsys: pytest.CaptureFixture[str], kms: Any,
    env_keys: Keys, monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(sqlite_url, 5, env_keys.current, bad_values=False)
    code, out, err = run_main(capsys, "status", "--db", sqlite_url)
    assert code == 0 and err == ""  # no password: no warning
    with_pw = pg_url.replace("postgres@", "postgres:UserInfo-Pw-9@")
    for url in (with_pw, f"{pg_url}?password=Hunter2-in-the-query"):
        code, out, err = run_main(capsys, "status", "--db", url)
        assert code == 0, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kms-migrate: warning: --db carries "
                                                       "a password"), err
        assert "DATABASE_URL" in lines[0]
        _no_secret(out, err)
        assert "UserInfo-Pw-9" not in out + err
        monkeypatch.setenv("DATABASE_URL", url)
        code, out, err = run_main(capsys, "status")
        assert code == 0 and err == ""
        monkeypatch.delenv("DATABASE_URL")


def test_the_runbook_never_puts_the_database_url_in_argv() -> None:
    import re

    from tests.conftest import REPO

    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        # A URL from a variable on the command line: `--db "$DATABASE_URL"`, `--db $URL`...
        hits = re.findall(r"--db[ =]+\"?\$\{?\w+", text)
        assert hits == [], (doc.name, hits)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "export DATABASE_URL" in readme and "/proc/*/cmdline" in readme


def test_the_db_option_help_says_to_prefer_database_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(capsys, "migrate", "--help")
    assert code == 0
    assert "ps shows" in " ".join(out.split())


def test_settings_repr_never_shows_the_database_url() -> None:
    from migration.config import Settings

    s = Settings(db_url="postgresql://app:UserInfo-Pw-9@h/db?password=Hunter2-in-the-query",
                 fernet_keys=("k",))
    _no_secret(repr(s), str(s))
    assert "UserInfo-Pw-9" not in repr(s)
