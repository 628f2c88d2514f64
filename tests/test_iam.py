"""`kms-migrate iam-policy`: least-privilege policies naming the key ARN, as plain JSON.

The CLI runs in-process through ``cli.main`` against moto's in-process KMS (the `kms`
fixture); the no-credentials cases run without moto and with every credential source
switched off, so boto3 fails before any network call.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from migration.errors import ConfigError
from migration.iam import (
    application_policy,
    is_key_arn,
    migration_policy,
    policies,
    resolve_key_arn,
)
from tests.conftest import Keys, KmsHandle
from tests.helpers import assert_clean, run_main

ALIAS = "alias/coinflip-master-key"
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    assert policy["Version"] == "2012-10-17"
    sts = policy["Statement"]
    assert isinstance(sts, list) and sts
    for st in sts:
        assert re.fullmatch(r"[A-Za-z0-9]+", st["Sid"]), st["Sid"]
        assert st["Effect"] == "Allow"
        assert isinstance(st["Action"], list) and st["Action"]
        assert all(a.startswith("kms:") for a in st["Action"])
    return list(sts)


def actions(policy: dict[str, Any]) -> list[str]:
    return sorted(a for st in statements(policy) for a in st["Action"])


def resources(policy: dict[str, Any]) -> set[str]:
    return {st["Resource"] for st in statements(policy)}


# -- the CLI ----------------------------------------------------------------------------------

def test_both_policies_name_the_key_arn_not_the_alias(
    kms: KmsHandle, capsys: pytest.CaptureFixture[str], keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)
    code, out, err = run_main(capsys, "iam-policy")  # default key: the alias
    assert code == 0, err
    assert err == ""
    doc = json.loads(out)  # the whole output is one JSON document
    assert set(doc) == {"migration", "application"}
    for policy in doc.values():
        assert resources(policy) == {kms.arn}
        assert "Condition" not in json.dumps(policy)
    assert ALIAS not in out and ":alias/" not in out
    assert actions(doc["migration"]) == ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt"]
    assert actions(doc["application"]) == ["kms:Decrypt", "kms:Encrypt"]
    assert_clean(out, err, keys=keys)


def test_app_read_only_gets_decrypt_only(kms: KmsHandle,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "iam-policy", "--app-read-only")
    assert code == 0
    doc = json.loads(out)
    assert actions(doc["application"]) == ["kms:Decrypt"]
    assert actions(doc["migration"]) == ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt"]


@pytest.mark.parametrize("which", ["migration", "application"])
def test_one_which_prints_a_bare_policy_document(
    which: str, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(capsys, "iam-policy", "--which", which, "--key-id", kms.key_id)
    assert code == 0
    policy = json.loads(out)
    assert set(policy) == {"Version", "Statement"}
    assert resources(policy) == {kms.arn}
    expected = (["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt"] if which == "migration"
                else ["kms:Decrypt", "kms:Encrypt"])
    assert actions(policy) == expected


def test_encryption_context_condition_only_with_the_flag(
    kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(capsys, "iam-policy")
    assert code == 0 and "Condition" not in out and "EncryptionContext" not in out
    code, out, _ = run_main(capsys, "iam-policy", "--encryption-context")
    assert code == 0
    doc = json.loads(out)
    for name, policy in doc.items():
        for st in statements(policy):
            if st["Action"] == ["kms:DescribeKey"]:
                assert "Condition" not in st  # DescribeKey carries no encryption context
                continue
            cond = st["Condition"]
            assert cond["ForAllValues:StringEquals"] == {
                "kms:EncryptionContextKeys": ["table", "column", "pk"]}
            # ForAllValues alone would also allow a request with no context: each key is
            # required to be present.
            assert cond["Null"] == {"kms:EncryptionContext:table": "false",
                                    "kms:EncryptionContext:column": "false",
                                    "kms:EncryptionContext:pk": "false"}
        assert resources(policy) == {kms.arn}, name
    # The actions are the same as without the condition.
    assert actions(doc["migration"]) == ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt"]
    assert actions(doc["application"]) == ["kms:Decrypt", "kms:Encrypt"]


def test_unresolvable_alias_without_credentials_exits_2_with_one_line(
    no_credentials: None, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(capsys, "iam-policy", "--key-id", ALIAS)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("kms-migrate: error: cannot resolve alias/coinflip-master-key")
    assert "no AWS credentials" in line and "key ARN" in line and "--key-id arn:aws:kms:" in line
    assert_clean(out, err)


def test_unknown_alias_with_credentials_exits_2(kms: KmsHandle,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "iam-policy", "--key-id", "alias/no-such-key")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "NotFoundException" in err and "pass the key ARN" in err


def test_key_arn_without_credentials_is_used_as_given(
    no_credentials: None, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(capsys, "iam-policy", "--key-id", KEY_ARN, "--which", "both")
    assert code == 0, err
    doc = json.loads(out)
    assert all(resources(p) == {KEY_ARN} for p in doc.values())
    assert err.startswith("kms-migrate: note: DescribeKey failed (no AWS credentials)")
    assert_clean(out, err)


def test_key_id_and_region_come_from_the_environment(
    kms: KmsHandle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_KMS_KEY_ID", kms.key_id)
    code, out, _ = run_main(capsys, "iam-policy", "--which", "application")
    assert code == 0 and resources(json.loads(out)) == {kms.arn}
    code, _, err = run_main(capsys, "iam-policy", "--region", "nowhere")
    assert code == 2 and "not an AWS region name" in err


def test_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "iam-policy", "--help")
    assert code == 0
    out = " ".join(out.split())  # click wraps to the terminal's width
    for w in ("least-privilege IAM policies", "key ARN", "kms:Encrypt", "kms:Decrypt",
              "kms:DescribeKey", "--key-id", "--region", "--app-writes / --app-read-only",
              "--which", "--encryption-context", "no comments"):
        assert w in out, w


# -- the functions ----------------------------------------------------------------------------

def test_is_key_arn() -> None:
    assert is_key_arn(KEY_ARN)
    assert is_key_arn("arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/mrk-1234abcd")
    assert not is_key_arn("arn:aws:kms:us-east-1:111122223333:alias/coinflip-master-key")
    assert not is_key_arn(ALIAS)
    assert not is_key_arn("1234abcd-12ab-34cd-56ef-1234567890ab")


def test_resolve_key_arn_with_and_without_describe(kms: KmsHandle) -> None:
    assert resolve_key_arn(ALIAS, "us-east-1") == (kms.arn, None)
    assert resolve_key_arn(kms.key_id, "us-east-1") == (kms.arn, None)
    with pytest.raises(ConfigError, match="pass the key ARN"):
        resolve_key_arn("alias/missing", "us-east-1")


def test_policy_builders() -> None:
    assert migration_policy(KEY_ARN) == {
        "Version": "2012-10-17",
        "Statement": [{"Sid": "KmsMigrateReEncrypt", "Effect": "Allow",
                       "Action": ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"],
                       "Resource": KEY_ARN}],
    }
    assert application_policy(KEY_ARN, writes=False)["Statement"][0]["Action"] == ["kms:Decrypt"]
    assert policies(KEY_ARN, "application") == application_policy(KEY_ARN)
    with pytest.raises(ValueError):
        policies(KEY_ARN, "everyone")
