"""A KMS with a fixed latency, for benchmarks: a botocore ``before-send`` handler.

It sleeps L seconds and answers with a well-formed JSON response, so boto3's own
serialization, signing and response parsing stay in the measurement; only the network
and AWS's own processing are replaced by the sleep. Encrypt wraps the plaintext in a
fake blob that Decrypt unwraps, so verification really compares bytes.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

from botocore.awsrequest import AWSResponse

ARN = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-00000000bench"
NEXT_ARN = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000next"
NEXT_ALIAS = "alias/bench-next"
PREFIX = b"\x01\x02\x02\x00bench"
KEYS = (ARN, NEXT_ARN)  # a blob names its key by its index, the byte after PREFIX


def _key(key_id: str) -> int:
    """The fake's key a KeyId names: the second for its ARN or alias, else the first."""
    return 1 if key_id in (NEXT_ARN, NEXT_ALIAS) else 0


def _wrap(key: int, plaintext: bytes) -> str:
    return base64.b64encode(PREFIX + bytes([key]) + plaintext).decode()


def _unwrap(blob_b64: str) -> tuple[int, bytes]:
    blob = base64.b64decode(blob_b64)
    return blob[len(PREFIX)], blob[len(PREFIX) + 1:]


class RawBody:
    """The urllib3-like raw body botocore's AWSResponse reads (.stream(), .read()); also
    used by the tests' in-process KMS error injection."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        body, self._body = self._body, b""
        yield body

    def read(self, *_: Any, **__: Any) -> bytes:
        body, self._body = self._body, b""
        return body


class LatencyKMS:
    """Install on a client with `install(client)`; counts the calls it answered."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.calls = 0

    def install(self, client: Any) -> Any:
        client.meta.events.register_first("before-send.kms", self)
        return client

    def __call__(self, request: Any, **_: Any) -> AWSResponse:
        if self.latency:
            time.sleep(self.latency)
        self.calls += 1
        target = request.headers.get("X-Amz-Target", b"")
        op = (target.decode() if isinstance(target, bytes) else target).rsplit(".", 1)[-1]
        body = json.loads(request.body or b"{}")
        if op == "Encrypt":
            key = _key(body.get("KeyId", ""))
            out: dict[str, Any] = {
                "CiphertextBlob": _wrap(key, base64.b64decode(body["Plaintext"])),
                "KeyId": KEYS[key], "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        elif op == "Decrypt":
            key, plaintext = _unwrap(body["CiphertextBlob"])
            out = {"Plaintext": base64.b64encode(plaintext).decode(), "KeyId": KEYS[key],
                   "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        elif op == "ReEncrypt":  # the plaintext stays in here, as it stays inside KMS
            key, plaintext = _unwrap(body["CiphertextBlob"])
            dest = _key(body["DestinationKeyId"])
            out = {"CiphertextBlob": _wrap(dest, plaintext), "SourceKeyId": KEYS[key],
                   "KeyId": KEYS[dest], "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                   "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        elif op == "DescribeKey":
            arn = KEYS[_key(body.get("KeyId", ""))]
            out = {"KeyMetadata": {
                "KeyId": arn.rsplit("/", 1)[1], "Arn": arn, "KeyState": "Enabled",
                "Enabled": True, "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT",
                "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "CreationDate": 1700000000.0,
                "AWSAccountId": "111122223333", "Origin": "AWS_KMS", "KeyManager": "CUSTOMER",
            }}
        else:
            raise ValueError(f"fake KMS does not answer {op}")
        payload = json.dumps(out).encode()
        headers = {"x-amzn-RequestId": "00000000-0000-4000-8000-000000000000",
                   "Content-Type": "application/x-amz-json-1.1",
                   "Content-Length": str(len(payload))}
        return AWSResponse(request.url, 200, headers, RawBody(payload))
