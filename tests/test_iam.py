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
    rekey_policy,
    resolve_key_arn,
)
from tests.conftest import Keys, KmsHandle, _make_key
from tests.helpers import assert_clean, assert_refused, run_main

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


# -- rekey ------------------------------------------------------------------------------------

DEST_ARN = "arn:aws:kms:us-east-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321"
NEXT_ALIAS = "alias/coinflip-next-key"
EXACT = {"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["table", "column", "pk"]},
         "Null": {"kms:EncryptionContext:table": "false",
                  "kms:EncryptionContext:column": "false",
                  "kms:EncryptionContext:pk": "false"}}
KEYS_ONLY = {"ForAllValues:StringEquals": {
    "kms:EncryptionContextKeys": ["table", "column", "pk"]}}
DESCRIBE_BOTH = {"Sid": "KmsRekeyDescribeKeys", "Effect": "Allow",
                 "Action": ["kms:DescribeKey"], "Resource": [KEY_ARN, DEST_ARN]}


def allow(sid: str, action_list: list[str], resource: str,
          condition: dict[str, Any] | None = None) -> dict[str, Any]:
    st: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": action_list,
                          "Resource": resource}
    if condition is not None:
        st["Condition"] = condition
    return st


def test_rekey_policy_without_contexts() -> None:
    assert rekey_policy(KEY_ARN, DEST_ARN) == {"Version": "2012-10-17", "Statement": [
        allow("KmsRekeySource", ["kms:ReEncryptFrom"], KEY_ARN),
        allow("KmsRekeyDestination", ["kms:ReEncryptTo", "kms:ReEncryptFrom"], DEST_ARN),
        DESCRIBE_BOTH,
    ]}


def test_rekey_policy_with_both_contexts_requires_the_keys_everywhere() -> None:
    policy = rekey_policy(KEY_ARN, DEST_ARN, from_context=True, to_context=True)
    assert policy["Statement"] == [
        allow("KmsRekeySourceInContext", ["kms:ReEncryptFrom"], KEY_ARN, EXACT),
        allow("KmsRekeyDestinationInContext", ["kms:ReEncryptTo", "kms:ReEncryptFrom"],
              DEST_ARN, EXACT),
        DESCRIBE_BOTH,  # DescribeKey carries no encryption context
    ]


def test_rekey_policy_adding_a_context_drops_the_null_condition_where_sides_differ() -> None:
    """Source without context, destination with: the ReEncrypt source -> destination may be
    evaluated against either context or both (AWS does not say), so its two authorizations
    get ForAllValues alone; the check destination -> destination keeps the exact one."""
    policy = rekey_policy(KEY_ARN, DEST_ARN, to_context=True)
    assert policy["Statement"] == [
        allow("KmsRekeySourceContextKeys", ["kms:ReEncryptFrom"], KEY_ARN, KEYS_ONLY),
        allow("KmsRekeyDestinationContextKeys", ["kms:ReEncryptTo"], DEST_ARN, KEYS_ONLY),
        allow("KmsRekeyDestinationInContext", ["kms:ReEncryptFrom"], DEST_ARN, EXACT),
        DESCRIBE_BOTH,
    ]


def test_rekey_policy_removing_a_context_with_verify_decrypt() -> None:
    policy = rekey_policy(KEY_ARN, DEST_ARN, from_context=True, verify_decrypt=True)
    assert policy["Statement"] == [
        allow("KmsRekeySourceContextKeys", ["kms:ReEncryptFrom"], KEY_ARN, KEYS_ONLY),
        allow("KmsRekeySourceInContext", ["kms:Decrypt"], KEY_ARN, EXACT),
        allow("KmsRekeyDestinationContextKeys", ["kms:ReEncryptTo"], DEST_ARN, KEYS_ONLY),
        allow("KmsRekeyDestination", ["kms:ReEncryptFrom", "kms:Decrypt"], DEST_ARN),
        DESCRIBE_BOTH,
    ]


def test_rekey_policy_verify_decrypt_adds_decrypt_on_both_keys() -> None:
    for ctx in (False, True):
        policy = rekey_policy(KEY_ARN, DEST_ARN, from_context=ctx, to_context=ctx,
                              verify_decrypt=True)
        by_arn: dict[str, list[str]] = {}
        for st in statements(policy):
            for arn in ([st["Resource"]] if isinstance(st["Resource"], str)
                        else st["Resource"]):
                by_arn.setdefault(arn, []).extend(st["Action"])
            if st["Sid"] != "KmsRekeyDescribeKeys":
                assert (st.get("Condition") == EXACT) is ctx, st
        assert sorted(by_arn[KEY_ARN]) == ["kms:Decrypt", "kms:DescribeKey", "kms:ReEncryptFrom"]
        assert sorted(by_arn[DEST_ARN]) == ["kms:Decrypt", "kms:DescribeKey",
                                            "kms:ReEncryptFrom", "kms:ReEncryptTo"]
    assert "kms:Encrypt" not in json.dumps(rekey_policy(KEY_ARN, DEST_ARN, verify_decrypt=True))


def test_rekey_policy_one_key_for_both_sides() -> None:
    """A rekey that only adds the context keeps the key: DescribeKey names it once."""
    policy = rekey_policy(KEY_ARN, KEY_ARN, to_context=True)
    assert policy["Statement"][-1] == allow("KmsRekeyDescribeKeys", ["kms:DescribeKey"], KEY_ARN)


def rekey_resources(policy: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for st in statements(policy):
        out.update([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])
    return out


def test_rekey_cli_resolves_both_aliases_to_key_arns(
    kms: KmsHandle, capsys: pytest.CaptureFixture[str], keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)
    dest = _make_key(kms.client, NEXT_ALIAS)
    code, out, err = run_main(capsys, "iam-policy", "--which", "rekey", "--to-key", NEXT_ALIAS,
                              "--to-encryption-context", "--from-encryption-context")
    assert code == 0, err
    assert err == ""
    policy = json.loads(out)  # one bare policy document
    assert set(policy) == {"Version", "Statement"}
    assert policy == rekey_policy(kms.arn, dest.arn, from_context=True, to_context=True)
    assert rekey_resources(policy) == {kms.arn, dest.arn}
    assert ":alias/" not in out and "alias/" not in out
    assert_clean(out, err, keys=keys)
    # --from-key names the source instead of --key-id / $AWS_KMS_KEY_ID.
    code, out, err = run_main(capsys, "iam-policy", "--which", "rekey", "--from-key", NEXT_ALIAS,
                              "--to-key", kms.key_id, "--verify-decrypt")
    assert code == 0, err
    assert json.loads(out) == rekey_policy(dest.arn, kms.arn, verify_decrypt=True)


def test_rekey_without_to_key_is_refused_in_one_line(
    kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(capsys, "iam-policy", "--which", "rekey")
    assert_refused(code, out, err, "--which rekey needs --to-key KEY")


@pytest.mark.parametrize(("args", "expected"), [
    (["--to-key", ALIAS], "--to-key is for a rekey: add --which rekey"),
    (["--which", "migration", "--verify-decrypt", "--from-encryption-context"],
     "--from-encryption-context, --verify-decrypt are for a rekey"),
    (["--which", "rekey", "--to-key", ALIAS, "--encryption-context"],
     "--from-encryption-context"),
    (["--which", "rekey", "--to-key", ALIAS, "--from-key", "alias/a", "--key-id", "alias/b"],
     "name two source keys"),
])
def test_rekey_options_out_of_place_are_refused(
    args: list[str], expected: str, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(capsys, "iam-policy", *args)
    assert_refused(code, out, err, expected)


def test_rekey_without_credentials(no_credentials: None,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "iam-policy", "--which", "rekey", "--key-id", KEY_ARN,
                              "--to-key", DEST_ARN)
    assert code == 0, err
    assert json.loads(out) == rekey_policy(KEY_ARN, DEST_ARN)
    notes = err.strip().splitlines()
    assert notes == [
        f"kms-migrate: note: DescribeKey failed (no AWS credentials); using --key-id {KEY_ARN} "
        "as the key ARN without checking it",
        f"kms-migrate: note: DescribeKey failed (no AWS credentials); using --to-key {DEST_ARN} "
        "as the key ARN without checking it",
    ]
    code, out, err = run_main(capsys, "iam-policy", "--which", "rekey", "--key-id", KEY_ARN,
                              "--to-key", NEXT_ALIAS)
    line = assert_refused(code, out, err, f"cannot resolve {NEXT_ALIAS}",
                          "--to-key arn:aws:kms:")
    assert_clean(line)


def test_help_describes_the_rekey_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "iam-policy", "--help")
    assert code == 0
    out = " ".join(out.split())
    for w in ("--which rekey", "kms:ReEncryptFrom", "kms:ReEncryptTo", "--to-key", "--from-key",
              "--from-encryption-context", "--to-encryption-context", "--verify-decrypt"):
        assert w in out, w
