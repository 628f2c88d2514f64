"""Minimal sequences the rekey state machine (tests/test_stateful_rekey.py) shrank to, kept
as plain tests through the real CLI. Each says the sequence and what it broke."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from tests.conftest import ALIAS, Keys, KmsHandle, _make_key
from tests.helpers import run_main
from tests.test_stateful_regressions import _vault

NEXT = "alias/coinflip-next-key"


def test_rekey_with_a_denied_value_and_nothing_left_at_the_source_can_finish(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path,
) -> None:
    """Machine sequence: values already under the destination (a rekey that finished, or
    the application writing under the new key) and one base64 value KMS denies (moto
    answers so for base64 that is no ciphertext, KMS for a ciphertext under another
    account's key); `rekey` to the destination, twice. Expected: exit 1 naming the denied
    value (a per-value problem), the run completed; got: exit 2 ("re-run, the run resumes"),
    and the same again on the re-run, the rekey run unfinished. Fixed: a value found under
    the destination settles a denial as that value's (`rewrap.Rekey.settled`)."""
    nxt = _make_key(kms.client, NEXT)
    moved = base64.b64encode(kms.client.encrypt(KeyId=nxt.arn, Plaintext=b"secret")
                             ["CiphertextBlob"]).decode()
    stray = base64.b64encode(b"\x01" + b"p" * 200).decode()
    config = _vault(db_url, tmp_path, {"a": stray, "b": moved})
    args = ["rekey", "--db", db_url, "--config", config, "--key-id", ALIAS, "--to-key", NEXT,
            "--yes", "--no-backup", "--no-progress"]
    run_main(capsys, *args)
    code, out, err = run_main(capsys, *args)  # the operator re-runs, as told
    assert code == 1, (code, out, err)
    assert "vault pk=a s:" in out and "vault pk=b s:" not in out
