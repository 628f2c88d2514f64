"""The CLI's refusal contract: exit 2, exactly one line on stderr, no traceback, no secret,
nothing written.

``main()`` ends in ``sys.exit``, so the tests call ``migration.cli.main([...])`` in-process
inside ``pytest.raises(SystemExit)`` and read stdout and stderr with capsys (and one test
runs the installed ``kms-migrate`` in a subprocess). Tests that get as far as KMS use the
``kms`` fixture: moto's in-process KMS, which the CLI's own boto3 client talks to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from tests.helpers import assert_refused, bookkeeping_tables, make_db, run_main, snapshot

GUIDE_EXAMPLE_KEY = "my-super-secret-key-12345"
AWS_SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]  # set by conftest; must never be printed


# -- helpers ----------------------------------------------------------------------------------

def empty_database(url: str) -> None:
    """Make sure the database exists (SQLite creates its file on first connect)."""
    eng = create_engine(url)
    with eng.connect() as conn:
        conn.execute(text("SELECT 1"))
    eng.dispose()


def write(tmp_path: Path, text_: str) -> str:
    p = tmp_path / "targets.toml"
    p.write_text(text_, encoding="utf-8")
    return str(p)




# -- usage errors -----------------------------------------------------------------------------

def test_non_numeric_batch_size_exits_2_with_one_line(capsys: Any, sqlite_url: str) -> None:
    code, out, err = run_main(capsys, "migrate", "--db", sqlite_url, "--batch-size", "many")
    line = assert_refused(code, out, err, "--batch-size", "'many'")
    assert "kms-migrate migrate --help" in line


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--concurrency", "0"],
                                  ["--concurrency", "1e3"], ["--no-such-flag"],
                                  ["--log-level", "loud"]])
def test_other_bad_options_exit_2_with_one_line(capsys: Any, args: list[str]) -> None:
    assert_refused(*run_main(capsys, "migrate", "--db", "sqlite:///x.db", *args))


def test_installed_command_keeps_the_contract_in_a_real_process(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "kms-migrate"
    assert exe.exists(), "kms-migrate is not installed in the test virtualenv"
    proc = subprocess.run(
        [str(exe), "migrate", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--batch-size", "abc"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
    )
    assert_refused(proc.returncode, proc.stdout, proc.stderr, "--batch-size")


def test_unknown_subcommand_points_at_a_help_command_that_works(capsys: Any) -> None:
    line = assert_refused(*run_main(capsys, "migrat"), "No such command 'migrat'")
    assert "(see kms-migrate --help)" in line
    assert "kms-migrate kms-migrate" not in line


def test_bare_command_shows_the_usage_not_a_squashed_error(capsys: Any) -> None:
    code, out, err = run_main(capsys)
    shown = out + err
    assert "Traceback" not in shown
    assert "error" not in shown
    lines = shown.splitlines()
    assert lines[0].startswith("Usage: kms-migrate")
    assert any(line.strip().startswith("migrate") for line in lines)
    assert code in (0, 2)  # click's own convention for a bare group (2 since click 8.2)


# -- configuration errors ---------------------------------------------------------------------

def test_unknown_table_in_config_exits_2_and_leaves_the_database_untouched(
    capsys: Any, db_url: str, env_keys: Any, kms: Any, tmp_path: Path
) -> None:
    make_db(db_url, 20, env_keys.current, env_keys.legacy)
    before = snapshot(db_url)
    config = write(tmp_path, '[[targets]]\ntable = "users"\nprimary_key = "user_id"\n'
                             'columns = ["encrypted_secret"]\n'
                             '[[targets]]\ntable = "no_such_table"\nprimary_key = "id"\n'
                             'columns = ["secret"]\n')
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config, "--yes")
    assert_refused(code, out, err, "table no_such_table does not exist")
    assert snapshot(db_url) == before
    assert bookkeeping_tables(db_url) == []


def test_malformed_config_toml_exits_2(capsys: Any, sqlite_url: str, env_keys: Any,
                                      tmp_path: Path) -> None:
    make_db(sqlite_url, 5, env_keys.current)
    config = write(tmp_path, "[[targets]\ntable = users\n")
    assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url, "--config", config),
                   "is not valid TOML")
    assert bookkeeping_tables(sqlite_url) == []


def test_missing_config_file_exits_2(capsys: Any, sqlite_url: str, tmp_path: Path) -> None:
    assert_refused(*run_main(capsys, "verify", "--db", sqlite_url,
                             "--config", str(tmp_path / "absent.toml")), "not found")


@pytest.mark.parametrize("command", ["migrate", "verify", "rollback", "status"])
def test_unreachable_postgres_exits_2_and_hides_the_password(capsys: Any, command: str,
                                                            env_keys: Any) -> None:
    url = "postgresql://u:pw@127.0.0.1:1/x"
    extra = ["--yes"] if command in ("migrate", "rollback") else []
    line = assert_refused(*run_main(capsys, command, "--db", url, *extra),
                          "cannot connect to", "***")
    assert "pw" not in line
    assert "u:***@127.0.0.1:1/x" in line


@pytest.mark.parametrize("command", ["migrate", "verify", "rollback", "status"])
def test_missing_db_and_database_url_exits_2(capsys: Any, command: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert_refused(*run_main(capsys, command), "no database given", "--db", "DATABASE_URL")


def test_database_url_from_the_environment_is_used(capsys: Any, sqlite_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    empty_database(sqlite_url)
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    code, out, err = run_main(capsys, "status")
    assert code == 0 and "no kms-migrate runs" in out and err == ""


def test_missing_sqlite_file_exits_2_without_creating_it(capsys: Any, tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    assert_refused(*run_main(capsys, "status", "--db", f"sqlite:///{db}"), "does not exist")
    assert not db.exists()


def test_guide_example_key_exits_2_without_showing_the_key(
    capsys: Any, sqlite_url: str, keys: Any, kms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(sqlite_url, 20, keys.current)
    before = snapshot(sqlite_url)
    monkeypatch.setenv("ENCRYPTION_KEY", GUIDE_EXAMPLE_KEY)
    for extra in ([], ["--dry-run"]):
        code, out, err = run_main(capsys, "migrate", "--db", sqlite_url, *extra)
        assert_refused(code, out, err, "ENCRYPTION_KEY is not a valid Fernet key")
        assert GUIDE_EXAMPLE_KEY not in out + err
        assert "12345" not in out + err
    assert snapshot(sqlite_url) == before
    assert bookkeeping_tables(sqlite_url) == []


def test_missing_encryption_key_exits_2(capsys: Any, sqlite_url: str, kms: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    make_db(sqlite_url, 5, Fernet.generate_key().decode())
    monkeypatch.delenv("ENCRYPTION_KEY", raising=False)
    monkeypatch.delenv("ENCRYPTION_KEY_LEGACY", raising=False)
    assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url), "ENCRYPTION_KEY is not set")
    assert bookkeeping_tables(sqlite_url) == []


def test_keys_that_open_no_token_exit_2_and_write_nothing(
    capsys: Any, db_url: str, keys: Any, kms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(db_url, 40, keys.current, keys.legacy)
    before = snapshot(db_url)
    wrong = Fernet.generate_key().decode()
    monkeypatch.setenv("ENCRYPTION_KEY", wrong)
    monkeypatch.delenv("ENCRYPTION_KEY_LEGACY", raising=False)
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--yes")
    line = assert_refused(code, out, err, "open none of the", "Fernet tokens sampled",
                          "nothing was written")
    assert wrong not in line and keys.current not in line
    assert snapshot(db_url) == before
    assert bookkeeping_tables(db_url) == []


def test_table_without_a_primary_key_exits_2(capsys: Any, sqlite_url: str, env_keys: Any,
                                             kms: Any, tmp_path: Path) -> None:
    eng = create_engine(sqlite_url)
    token = Fernet(env_keys.current.encode()).encrypt(b"s").decode()
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE ledger (id INTEGER, secret TEXT)"))
        conn.execute(text("INSERT INTO ledger VALUES (1, :t)"), {"t": token})
    eng.dispose()
    config = write(tmp_path, '[[targets]]\ntable = "ledger"\nprimary_key = "id"\n'
                             'columns = ["secret"]\n')
    assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url, "--config", config),
                   "table ledger has no primary key")
    assert bookkeeping_tables(sqlite_url) == []


@pytest.mark.parametrize("command", ["migrate", "verify"])
def test_invalid_region_exits_2(capsys: Any, sqlite_url: str, env_keys: Any,
                                command: str) -> None:
    make_db(sqlite_url, 5, env_keys.current)
    assert_refused(*run_main(capsys, command, "--db", sqlite_url, "--region", "moon-1"),
                   "'moon-1' is not an AWS region name", "--region")
    assert bookkeeping_tables(sqlite_url) == []


def test_invalid_aws_region_from_the_environment_exits_2(
    capsys: Any, sqlite_url: str, env_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(sqlite_url, 5, env_keys.current)
    monkeypatch.setenv("AWS_REGION", "moon-1")
    assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url), "'moon-1'")


# -- KMS refusals -----------------------------------------------------------------------------

def test_disabled_kms_key_exits_2_and_writes_nothing(capsys: Any, sqlite_url: str,
                                                     env_keys: Any, kms: Any) -> None:
    make_db(sqlite_url, 20, env_keys.current, env_keys.legacy)
    before = snapshot(sqlite_url)
    kms.client.disable_key(KeyId=kms.key_id)
    assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url),
                   "alias/coinflip-master-key is disabled", "aws kms enable-key")
    assert snapshot(sqlite_url) == before
    assert bookkeeping_tables(sqlite_url) == []


def test_unknown_kms_key_exits_2(capsys: Any, sqlite_url: str, env_keys: Any,
                                 kms: Any) -> None:
    make_db(sqlite_url, 10, env_keys.current)
    assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url, "--key-id", "alias/typo"),
                   "alias/typo", "NotFoundException")
    assert bookkeeping_tables(sqlite_url) == []


def test_a_good_run_exits_1_when_some_values_failed_and_0_when_none(
    capsys: Any, tmp_path: Path, env_keys: Any, kms: Any
) -> None:
    # The contrast to every refusal above: the same harness sees the other exit codes.
    with_bad = f"sqlite:///{tmp_path / 'bad.db'}"
    make_db(with_bad, 15, env_keys.current, env_keys.legacy, bad_values=True)
    code, out, err = run_main(capsys, "migrate", "--db", with_bad, "--batch-size", "4")
    assert code == 1 and "Failed values (3)" in out and "Traceback" not in err
    clean = f"sqlite:///{tmp_path / 'clean.db'}"
    make_db(clean, 15, env_keys.current, env_keys.legacy, bad_values=False)
    code, out, err = run_main(capsys, "migrate", "--db", clean, "--batch-size", "4")
    assert code == 0 and "Failed values" not in out
    assert env_keys.current not in out + err and AWS_SECRET not in out + err


@pytest.mark.postgres
def test_postgres_write_without_a_terminal_or_yes_is_refused(
    capsys: Any, pg_url: str, env_keys: Any, kms: Any
) -> None:
    make_db(pg_url, 10, env_keys.current)
    before = snapshot(pg_url)
    assert_refused(*run_main(capsys, "migrate", "--db", pg_url),
                   "without confirmation", "--yes", "nothing was written")
    assert snapshot(pg_url) == before
    assert bookkeeping_tables(pg_url) == []


# -- status and help --------------------------------------------------------------------------

def test_status_on_a_fresh_database_says_there_are_no_runs(capsys: Any, db_url: str) -> None:
    empty_database(db_url)
    code, out, err = run_main(capsys, "status", "--db", db_url)
    assert code == 0 and err == ""
    assert out.startswith("no kms-migrate runs in ")
    code, out, err = run_main(capsys, "status", "--db", db_url, "--json")
    assert code == 0 and json.loads(out) == {"runs": [], "census": None}
    assert bookkeeping_tables(db_url) == []  # status never creates the bookkeeping tables


HELP_OPTIONS = {
    "migrate": ["--db", "--config", "--key-id", "--region", "--batch-size", "--concurrency",
                "--max-kms-rps", "--dry-run", "--new-run", "--retry-failed", "--report",
                "--no-backup", "--no-progress", "--encryption-context", "--yes", "--log-level",
                "--log-format", "--log-file"],
    "verify": ["--db", "--config", "--key-id", "--region", "--batch-size", "--concurrency",
               "--max-kms-rps", "--encryption-context", "--log-level", "--log-format",
               "--log-file"],
    "rollback": ["--db", "--batch-size", "--no-backup", "--no-progress", "--yes", "--log-level",
                 "--log-format", "--log-file"],
    "status": ["--db", "--json"],
    "demo": ["--dir", "--rows"],
    "preflight": ["--db", "--config", "--key-id", "--region", "--encryption-context"],
    "iam-policy": ["--key-id", "--region", "--which", "--app-read-only", "--encryption-context"],
    "finalize": ["--db", "--config", "--key-id", "--region", "--encryption-context", "--yes"],
}


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_subcommand_help_exits_0_and_lists_its_options(
    capsys: Any, command: str, flag: str, env_keys: Any
) -> None:
    code, out, err = run_main(capsys, command, flag)
    assert code == 0 and err == ""
    assert out.startswith(f"Usage: kms-migrate {command} [OPTIONS]")
    for option in HELP_OPTIONS[command]:
        assert option in out, option
    assert env_keys.current not in out  # no option default ever echoes a secret


def test_top_level_help_and_version_exit_0(capsys: Any) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for command in HELP_OPTIONS:
        assert command in out
    assert "Exit codes: 0 done; 1 done, some values failed; 2 refused or stopped" in out
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == "kms-migrate, version 0.1.0"


# -- issue 11, defect 10: broken AWS settings and unexpected errors: one line, exit 2 ---------

AWS_BREAKAGES = {
    "profile": ("AWS_PROFILE", "no-such-profile", "AWS_PROFILE"),
    "endpoint": ("AWS_ENDPOINT_URL_KMS", "http://[::1", "AWS_ENDPOINT_URL_KMS"),
    "endpoint-text": ("AWS_ENDPOINT_URL_KMS", "not a url", "AWS_ENDPOINT_URL_KMS"),
    "endpoint-port": ("AWS_ENDPOINT_URL_KMS", "http://localhost:99999", "AWS_ENDPOINT_URL_KMS"),
    "endpoint-scheme": ("AWS_ENDPOINT_URL_KMS", "ftp://localhost", "AWS_ENDPOINT_URL_KMS"),
}
CLIENT_COMMANDS = {
    "migrate": ["migrate", "--yes", "--no-progress"],
    "dry-run": ["migrate", "--dry-run", "--no-progress"],
    "retry": ["migrate", "--retry-failed", "--yes", "--no-progress"],
    "verify": ["verify"],
    "finalize": ["finalize", "--yes"],
    "iam-policy": ["iam-policy", "--key-id", "alias/coinflip-master-key"],
}


@pytest.mark.parametrize("broken", sorted(AWS_BREAKAGES))
@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
def test_broken_aws_settings_exit_2_with_one_line_naming_the_setting(
    capsys: Any, sqlite_url: str, env_keys: Any, monkeypatch: pytest.MonkeyPatch,
    command: str, broken: str,
) -> None:
    make_db(sqlite_url, 5, env_keys.current, env_keys.legacy)
    before = snapshot(sqlite_url)
    var, value, named = AWS_BREAKAGES[broken]
    monkeypatch.setenv(var, value)
    args = CLIENT_COMMANDS[command]
    if command != "iam-policy":
        args = [*args, "--db", sqlite_url]
    line = assert_refused(*run_main(capsys, *args), named)
    assert value not in line or broken == "profile"
    assert snapshot(sqlite_url) == before
    assert not list(Path(sqlite_url.removeprefix("sqlite:///")).parent.glob("*backup*"))


@pytest.mark.parametrize("broken", sorted(AWS_BREAKAGES))
def test_preflight_reports_broken_aws_settings_as_failed_checks(
    capsys: Any, sqlite_url: str, env_keys: Any, monkeypatch: pytest.MonkeyPatch, broken: str,
) -> None:
    make_db(sqlite_url, 5, env_keys.current, env_keys.legacy)
    var, value, named = AWS_BREAKAGES[broken]
    monkeypatch.setenv(var, value)
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url)
    assert code == 2 and "Traceback" not in out + err
    assert "FAIL" in out and named in out
    assert len(err.strip().splitlines()) == 1


def test_an_unexpected_error_is_one_line_naming_its_type_never_its_message(
    capsys: Any, sqlite_url: str, env_keys: Any, kms: Any, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import migration.cli_info as info_mod  # where `status` lives
    import migration.cli_rewrite as cli_mod

    make_db(sqlite_url, 5, env_keys.current, env_keys.legacy)
    secret = "plaintext-that-must-never-show"

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError(f"could not handle {secret}") from KeyError(secret)

    monkeypatch.setattr(cli_mod, "migrate", boom)
    monkeypatch.setattr(info_mod, "collect_status", boom)
    log = tmp_path / "debug.log"
    line = assert_refused(*run_main(capsys, "migrate", "--db", sqlite_url, "--yes",
                                    "--no-progress", "--log-level", "debug",
                                    "--log-file", str(log)),
                          "unexpected RuntimeError", "--log-level debug")
    assert secret not in line
    logged = log.read_text()
    assert "unexpected_error" in logged and "RuntimeError" in logged
    assert "KeyError" in logged and "boom" in logged  # where, and what it chained
    assert secret not in logged
    line = assert_refused(*run_main(capsys, "status", "--db", sqlite_url),
                          "unexpected RuntimeError")
    assert secret not in line


def test_an_unknown_aws_profile_in_a_real_process_is_one_line_and_exit_2(
    tmp_path: Path, env_keys: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'coinflip.db'}"
    make_db(url, 5, env_keys.current)
    exe = Path(sys.executable).parent / "kms-migrate"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["AWS_PROFILE"] = "no-such-profile"
    for args in (["migrate", "--yes", "--no-progress"], ["verify"]):
        proc = subprocess.run([str(exe), *args, "--db", url], capture_output=True, text=True,
                              timeout=60, env=env)
        assert_refused(proc.returncode, proc.stdout, proc.stderr, "AWS_PROFILE")
