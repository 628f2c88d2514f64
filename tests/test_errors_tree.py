"""The error tree (migration.errors) and the one place exceptions become exit codes
(migration.exits): every error carries its exit code and one line; main() maps every
exception, the unexpected ones and the checkpoints package's own included, to one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from sqlalchemy.exc import OperationalError

from checkpoints.leases import LeaseLost
from checkpoints.lock import LockHeld, LockLost
from migration import errors
from migration.errors import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    ConfigError,
    DemoCheckFailed,
    FatalKMSError,
    KmsMigrateError,
    WorkersFailed,
)
from migration.exits import BOOKKEEPING_ERRORS, outcome
from tests.helpers import run_main

SECRET = "plaintext-that-must-never-show"


def _tree() -> list[type[KmsMigrateError]]:
    return [c for c in vars(errors).values()
            if isinstance(c, type) and issubclass(c, KmsMigrateError)]


def test_every_error_of_the_tree_carries_its_exit_code_and_one_line() -> None:
    tree = _tree()
    assert {WorkersFailed, DemoCheckFailed, ConfigError, FatalKMSError} <= set(tree)
    for cls in tree:
        exc = cls("what went wrong, and the fix")
        assert exc.exit_code == EXIT_FATAL
        assert exc.one_line() == "kms-migrate: error: what went wrong, and the fix"
        assert outcome(exc).code == EXIT_FATAL
        assert outcome(exc).line == exc.one_line()


def test_the_moved_errors_are_the_ones_their_modules_raise() -> None:
    from migration import demo, supervisor

    assert supervisor.WorkersFailed is WorkersFailed
    assert demo.DemoCheckFailed is DemoCheckFailed


def test_a_fatal_kms_error_keeps_its_code() -> None:
    assert FatalKMSError("denied", "AccessDeniedException").code == "AccessDeniedException"
    assert FatalKMSError("denied").code == ""


@pytest.mark.parametrize("exc", [
    LockHeld("migrate run 7 is already running (host h, pid 1)"),
    LockLost("the run lock was taken over by another process"),
    LeaseLost("range 3 of run 7 was taken over by another worker"),
])
def test_lock_and_lease_errors_are_one_line_exit_2(exc: Exception) -> None:
    assert isinstance(exc, BOOKKEEPING_ERRORS)
    got = outcome(exc)
    assert got.code == EXIT_FATAL
    assert got.line == f"kms-migrate: error: {exc}"


def test_interrupts_and_click_outcomes() -> None:
    for exc in (KeyboardInterrupt(), click.exceptions.Abort()):
        got = outcome(exc)
        assert got.code == EXIT_INTERRUPTED and got.line is not None
        assert "re-run the same command to resume" in got.line
    assert outcome(click.exceptions.Exit(3)) == outcome(click.exceptions.Exit(3))
    assert outcome(click.exceptions.Exit(3)).line is None
    assert outcome(click.ClickException("bad")).line == "kms-migrate: error: bad"


def test_a_database_error_shows_the_driver_s_first_line_never_the_statement() -> None:
    exc = OperationalError(f"UPDATE t SET v = '{SECRET}'", {"v": SECRET},
                           Exception("database is locked\nmore"))
    got = outcome(exc)
    assert got.code == EXIT_FATAL and got.line is not None
    assert SECRET not in got.line and "locked by another writer" in got.line


def test_an_unexpected_error_is_named_by_its_type_only() -> None:
    got = outcome(RuntimeError(f"cannot store {SECRET}"))
    assert got.code == EXIT_FATAL and got.line is not None
    assert "unexpected RuntimeError" in got.line and SECRET not in got.line


@pytest.mark.parametrize("exc", [
    LockLost("the run lock was taken over by another process"),
    RuntimeError(f"record_batch could not store {SECRET}"),
    WorkersFailed("1 of 2 worker(s) stopped on an error"),
])
def test_main_prints_one_line_for_any_exception_a_command_raises(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    exc: Exception,
) -> None:
    import migration.cli_info as info_mod  # where `status` lives

    def boom(*_: Any, **__: Any) -> Any:
        raise exc

    monkeypatch.setattr(info_mod, "collect_status", boom)
    (tmp_path / "x.db").touch()  # an empty file is an empty SQLite database
    code, out, err = run_main(capsys, "status", "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == EXIT_FATAL and out == ""
    assert "Traceback" not in err and SECRET not in err
    assert err.count("\n") == 1 and err.startswith("kms-migrate: ")
    if not isinstance(exc, RuntimeError):
        assert str(exc) in err


# -- codec.classify: the one decision of what a stored value is --------------------------------

@pytest.mark.parametrize(("value", "kind"), [
    (None, "EMPTY"), ("", "EMPTY"), (b"", "EMPTY"),
    ("gAAAAABfernet-shaped", "FERNET"),
    ("AQIDBA==", "KMS"),  # strict standard base64 of a blob: the stored KMS format
    ("AQID\nBA==", "OTHER"),  # the guide's lenient base64 is not the stored format
    ("hello", "OTHER"), ("   ", "OTHER"), ("not-base64!", "OTHER"),
    (b"AQIDBA==", "OTHER"), (42, "OTHER"),
])
def test_classify_tells_kms_text_from_other_values(value: object, kind: str) -> None:
    from migration.codec import ValueKind, classify

    assert classify(value) is ValueKind[kind]


def test_every_kms_kind_decodes_as_a_kms_blob() -> None:
    import os

    from migration.codec import ValueKind, classify, decode_kms, encode_kms

    for n in (1, 3, 100, 300):
        text = encode_kms(b"\x01" + os.urandom(n))
        assert classify(text) is ValueKind.KMS and decode_kms(text) is not None


# -- Fernet keys: one parser for the tool and the application helper ----------------------------

def test_named_fernet_keys_names_each_key_by_where_it_comes_from() -> None:
    from migration.config import fernet_keys_from_env, named_fernet_keys

    env = {"ENCRYPTION_KEY": " cur ", "ENCRYPTION_KEY_LEGACY": "old1, ,old2 "}
    assert named_fernet_keys(env) == (
        ("ENCRYPTION_KEY", "cur"), ("ENCRYPTION_KEY_LEGACY key #1", "old1"),
        ("ENCRYPTION_KEY_LEGACY key #2", "old2"))
    assert named_fernet_keys(env, " arg ")[0] == ("the encryption_key argument", "arg")
    assert named_fernet_keys({"ENCRYPTION_KEY_LEGACY": "old1"}) == (
        ("ENCRYPTION_KEY_LEGACY key #1", "old1"),)
    assert fernet_keys_from_env(env) == ("cur", "old1", "old2")


def test_the_tool_and_the_helper_refuse_the_same_malformed_key_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cryptography.fernet import Fernet

    from migration import runtime
    from migration.codec import BadFernetKey, FernetCodec, multi_fernet

    good, bad = Fernet.generate_key().decode(), "my-super-secret-key-12345"
    with pytest.raises(BadFernetKey) as caught:
        multi_fernet([("ENCRYPTION_KEY", good), ("ENCRYPTION_KEY_LEGACY key #1", bad)])
    assert caught.value.name == "ENCRYPTION_KEY_LEGACY key #1" and bad not in repr(caught.value)
    assert caught.value.__context__ is None
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY_LEGACY key #1") as tool:
        FernetCodec([good, bad])
    monkeypatch.setenv("ENCRYPTION_KEY", good)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", bad)
    runtime.reset_cache()
    token = Fernet(good.encode()).encrypt(b"x").decode()
    with pytest.raises(ValueError, match="ENCRYPTION_KEY_LEGACY key #1") as helper:
        runtime.decrypt_secret(token)
    for err in (tool.value, helper.value):
        assert bad not in str(err) and err.__context__ is None


# -- KMS: one classification, one message table, one retry policy -------------------------------

class _FailingClient:
    """A KMS client whose every call raises what `make` builds, counting the calls."""

    def __init__(self, make: Any) -> None:
        self.make, self.calls = make, 0

    def _fail(self, **_: Any) -> Any:
        self.calls += 1
        raise self.make()

    encrypt = decrypt = describe_key = _fail


def _client_error(code: str) -> Exception:
    import botocore.exceptions

    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": SECRET}},
                                           "Encrypt")


def test_one_message_table_worded_for_the_caller() -> None:
    from migration.kms_codes import PREFLIGHT, RUN, fatal_message

    run = fatal_message("DisabledException", "Encrypt", "alias/k", "us-east-1", RUN)
    pre = fatal_message("DisabledException", "Encrypt", "alias/k", "us-east-1", PREFLIGHT)
    assert run.endswith(RUN.rerun) and pre.endswith(PREFLIGHT.rerun)
    assert run.removesuffix(RUN.rerun) == pre.removesuffix(PREFLIGHT.rerun)
    assert "aws kms enable-key --key-id alias/k --region us-east-1" in run


def test_preflight_calls_kms_through_kms_with_its_own_wording_and_attempts() -> None:
    from migration.kms import KMS
    from migration.preflight_kms import ATTEMPTS, preflight_kms

    client = _FailingClient(lambda: _client_error("ThrottlingException"))
    waits: list[float] = []
    kms = preflight_kms(client, "alias/k", "us-east-1", waits.append)
    assert isinstance(kms, KMS)
    with pytest.raises(FatalKMSError) as caught:
        kms.key_metadata()
    assert client.calls == ATTEMPTS and len(waits) == ATTEMPTS - 1
    line = str(caught.value)
    assert caught.value.code == "ThrottlingException" and SECRET not in line
    assert f"after {ATTEMPTS} attempts" in line and line.endswith("re-run kms-migrate preflight")


def test_a_kms_that_stays_unreachable_is_named_so() -> None:
    import botocore.exceptions

    from migration.kms import KMS, RetryPolicy

    client = _FailingClient(lambda: botocore.exceptions.EndpointConnectionError(
        endpoint_url="https://kms.example"))
    kms = KMS(client, "alias/k", "us-east-1",
              policy=RetryPolicy(max_attempts=2, sleep=lambda _: None))
    with pytest.raises(FatalKMSError) as caught:
        kms.encrypt(b"x")
    assert client.calls == 2 and caught.value.code == "EndpointConnectionError"
    assert str(caught.value).startswith(
        "cannot reach KMS in us-east-1 (EndpointConnectionError) after 2 attempts")


def test_a_per_value_refusal_is_a_kms_value_error_never_fatal() -> None:
    from migration.errors import KMSValueError
    from migration.kms import KMS, KeyInfo, RetryPolicy

    client = _FailingClient(lambda: _client_error("InvalidCiphertextException"))
    kms = KMS(client, "alias/k", "us-east-1", policy=RetryPolicy(sleep=lambda _: None))
    kms.key = KeyInfo("alias/k", "arn:aws:kms:us-east-1:111122223333:key/k")
    with pytest.raises(KMSValueError, match="InvalidCiphertextException"):
        kms.call("Decrypt", CiphertextBlob=b"\x01blob")
    assert kms.decrypt(b"\x01blob") is None and kms.retries == 0
