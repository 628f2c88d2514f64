"""Unit tests of migration/kms.py: the retry and classification layer, describe, round trip, map.

A real boto3 client (made by make_client, so with the run's botocore config) talks to moto's
in-process KMS. Errors are injected with botocore's own event system: a ``before-send``
handler, registered first, answers with the HTTP status and JSON body that KMS sends for
that error (AWS JSON 1.1 protocol), so botocore's real parser and our real classifier run.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.awsrequest import AWSResponse

from benchmarks.fake_kms import RawBody
from migration.errors import ConfigError, FatalKMSError
from migration.kms import KMS, RetryPolicy, make_client, validate_region
from tests.helpers import KMS_ERRORS

ALIAS = "alias/coinflip-master-key"



def kms_error_response(url: str, code: str, status: int | None = None) -> AWSResponse:
    default_status, message = KMS_ERRORS[code]
    body = json.dumps({"__type": code, "message": message}).encode()
    headers = {
        "x-amzn-RequestId": "6f1c3c5e-0000-4000-8000-000000000000",
        "Content-Type": "application/x-amz-json-1.1",
        "Content-Length": str(len(body)),
    }
    return AWSResponse(url, status or default_status, headers, RawBody(body))


class Injector:
    """A before-send handler: answers the next queued errors, then lets moto answer."""

    def __init__(self, *errors: str | BaseException, forever: str | None = None) -> None:
        self.queue: list[str | BaseException] = list(errors)
        self.forever = forever
        self.calls = 0
        self.ops: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request: Any, event_name: str = "", **_: Any) -> AWSResponse | None:
        with self._lock:
            self.calls += 1
            self.ops.append(event_name.rsplit(".", 1)[-1])
            nxt: str | BaseException | None = (
                self.queue.pop(0) if self.queue else self.forever
            )
        if nxt is None:
            return None
        if isinstance(nxt, BaseException):
            raise nxt
        return kms_error_response(request.url, nxt)


def inject(client: Any, injector: Injector, op: str = "*") -> Injector:
    # Registered first, so it answers before moto's own before-send stubber.
    client.meta.events.register_first(f"before-send.kms.{op}", injector)
    return injector


@pytest.fixture
def client(kms: Any) -> Any:
    """A client exactly as a run makes it (botocore retries off), inside moto's mock."""
    return make_client("us-east-1", 4)


def make(client: Any, waits: list[float] | None = None, *, attempts: int = 5,
         concurrency: int = 4, key_id: str = ALIAS, region: str = "us-east-1") -> KMS:
    return KMS(client, key_id, region, concurrency=concurrency,
               policy=RetryPolicy(max_attempts=attempts, max_wait=5.0, multiplier=0.05,
                                  sleep=waits.append if waits is not None else _no_sleep))


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"a retry slept {seconds} s where none was expected")


# -- botocore's own retries are off ----------------------------------------------------------

def test_make_client_switches_botocore_retries_off() -> None:
    c = make_client("eu-west-1", 64)
    assert c.meta.config.retries["total_max_attempts"] == 1
    assert c.meta.region_name == "eu-west-1"
    assert c.meta.config.max_pool_connections >= 64  # every worker thread gets a connection


def test_botocore_itself_sends_a_throttled_request_only_once(client: Any) -> None:
    inj = inject(client, Injector(forever="ThrottlingException"))
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        client.encrypt(KeyId=ALIAS, Plaintext=b"x")
    assert excinfo.value.response["Error"]["Code"] == "ThrottlingException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert inj.calls == 1  # not 3 (standard) or 5 (legacy): only our layer retries


# -- transient errors are retried -------------------------------------------------------------

@pytest.mark.parametrize(
    "code",
    ["ThrottlingException", "KMSInternalException", "DependencyTimeoutException",
     "KeyUnavailableException"],
)
def test_transient_errors_are_retried_then_succeed_and_counted(client: Any, code: str) -> None:
    inj = inject(client, Injector(code, code), "Encrypt")
    waits: list[float] = []
    k = make(client, waits)
    blob = k.encrypt(b"custodial secret")
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"custodial secret"
    assert inj.calls == 3
    assert k.retries == 2
    assert k.requests == 3
    assert len(waits) == 2


def test_an_unknown_5xx_error_is_retried_as_transient(client: Any) -> None:
    class Weird5xx(Injector):
        def __call__(self, request: Any, **kw: Any) -> AWSResponse | None:
            self.calls += 1
            if self.calls == 1:
                body = b'{"__type":"SomethingNewException","message":"try later"}'
                return AWSResponse(request.url, 502, {"Content-Type":
                                                      "application/x-amz-json-1.1"}, RawBody(body))
            return None

    inj = inject(client, Weird5xx(), "Encrypt")
    waits: list[float] = []
    k = make(client, waits)
    assert isinstance(k.encrypt(b"x"), bytes)
    assert (inj.calls, k.retries) == (2, 1)


@pytest.mark.parametrize(
    "exc",
    [botocore.exceptions.EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
     botocore.exceptions.ReadTimeoutError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
     botocore.exceptions.ConnectionClosedError(endpoint_url="https://kms.us-east-1.amazonaws.com")],
    ids=["endpoint-connection", "read-timeout", "connection-closed"],
)
def test_dropped_connections_are_retried(client: Any, exc: Exception) -> None:
    inj = inject(client, Injector(exc), "Encrypt")
    waits: list[float] = []
    k = make(client, waits)
    assert isinstance(k.encrypt(b"x"), bytes)
    assert (inj.calls, k.retries, len(waits)) == (2, 1, 1)


def test_retries_are_counted_across_calls_and_operations(client: Any) -> None:
    inject(client, Injector("ThrottlingException"), "Encrypt")
    inject(client, Injector("KMSInternalException", "ThrottlingException"), "Decrypt")
    waits: list[float] = []
    k = make(client, waits)
    assert isinstance(k.round_trip(b"x"), bytes)
    assert k.retries == 3
    assert k.requests == 5


# -- retries are bounded ----------------------------------------------------------------------

def test_always_throttled_stops_after_max_attempts_saying_lower_concurrency(client: Any) -> None:
    inj = inject(client, Injector(forever="ThrottlingException"))
    waits: list[float] = []
    k = make(client, waits, attempts=4)
    with pytest.raises(FatalKMSError) as excinfo:
        k.encrypt(b"x")
    msg = str(excinfo.value)
    assert inj.calls == 4
    assert k.retries == 3 and len(waits) == 3
    assert "ThrottlingException" in msg
    assert "after 4 attempts" in msg
    assert "lower --concurrency" in msg
    assert ALIAS in msg
    assert excinfo.value.exit_code == 2


def test_default_policy_is_bounded_too(client: Any) -> None:
    inj = inject(client, Injector(forever="KMSInternalException"))
    waits: list[float] = []
    k = KMS(client, ALIAS, "us-east-1", policy=RetryPolicy(sleep=waits.append))
    with pytest.raises(FatalKMSError):
        k.describe()
    assert inj.calls == RetryPolicy().max_attempts
    assert len(waits) == RetryPolicy().max_attempts - 1


def test_waits_go_to_the_injected_sleep_growing_exponentially_under_the_cap(
    client: Any,
) -> None:
    inject(client, Injector(forever="ThrottlingException"))
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=10, max_wait=0.4, multiplier=0.05, sleep=waits.append)
    k = KMS(client, ALIAS, "us-east-1", policy=policy)
    started = time.monotonic()
    with pytest.raises(FatalKMSError):
        k.encrypt(b"x")
    assert time.monotonic() - started < 5  # nothing really slept (8 waits up to 0.4 s each)
    assert len(waits) == 9
    for n, w in enumerate(waits):
        # Full jitter: uniform in [0, min(cap, multiplier * 2**n)].
        assert 0 <= w <= min(policy.max_wait, policy.multiplier * 2**n) + 1e-9, (n, w)
    assert len(set(waits)) > 1  # jittered, not a constant


# -- fatal errors stop at once -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("code", "fix"),
    [
        ("AccessDeniedException", "grant the caller kms:Encrypt"),
        ("DisabledException", f"aws kms enable-key --key-id {ALIAS}"),
        ("KMSInvalidStateException", f"aws kms cancel-key-deletion --key-id {ALIAS}"),
        ("NotFoundException", "aws kms list-aliases --region us-east-1"),
        ("UnrecognizedClientException", "aws sts get-caller-identity"),
    ],
)
def test_fatal_errors_raise_at_once_naming_the_key_and_the_fix(
    client: Any, code: str, fix: str
) -> None:
    inj = inject(client, Injector(forever=code))
    k = make(client, None)  # sleeping at all would fail the test
    with pytest.raises(FatalKMSError) as excinfo:
        k.encrypt(b"plaintext-never-in-messages")
    msg = str(excinfo.value)
    assert inj.calls == 1
    assert k.retries == 0 and k.requests == 1
    assert ALIAS in msg
    assert code in msg
    assert fix in msg
    assert "plaintext-never-in-messages" not in msg
    assert "\n" not in msg
    assert excinfo.value.__cause__ is None


def test_fatal_error_in_decrypt_names_the_decrypt_permission(client: Any) -> None:
    inject(client, Injector(forever="AccessDeniedException"), "Decrypt")
    k = make(client, None)
    with pytest.raises(FatalKMSError, match="grant the caller kms:Decrypt"):
        k.round_trip(b"x")


def test_decrypt_of_a_ciphertext_kms_cannot_open_is_none_not_an_error(client: Any) -> None:
    inj = inject(client, Injector("InvalidCiphertextException"), "Decrypt")
    k = make(client, None)
    assert k.decrypt(b"\x01\x02\x03not-a-kms-blob") is None
    assert k.retries == 0 and inj.calls == 1


def test_invalid_ciphertext_on_encrypt_is_fatal_not_swallowed(client: Any) -> None:
    inject(client, Injector("InvalidCiphertextException"), "Encrypt")
    with pytest.raises(FatalKMSError, match="InvalidCiphertextException"):
        make(client, None).encrypt(b"x")


# -- describe ---------------------------------------------------------------------------------

def test_describe_resolves_the_alias_to_the_key_arn(kms: Any, client: Any) -> None:
    info = make(client, None).describe()
    assert info.key_id == ALIAS
    assert info.arn == kms.arn


def test_describe_refuses_a_disabled_key(kms: Any, client: Any) -> None:
    kms.client.disable_key(KeyId=kms.key_id)
    k = make(client, None)
    with pytest.raises(FatalKMSError) as excinfo:
        k.describe()
    msg = str(excinfo.value)
    assert "disabled" in msg and ALIAS in msg
    assert "aws kms enable-key" in msg
    assert k.key is None


def test_describe_refuses_a_key_pending_deletion(kms: Any, client: Any) -> None:
    kms.client.schedule_key_deletion(KeyId=kms.key_id, PendingWindowInDays=7)
    with pytest.raises(FatalKMSError, match="cancel-key-deletion"):
        make(client, None).describe()


def test_describe_refuses_a_key_that_cannot_encrypt(kms: Any, client: Any) -> None:
    meta = kms.client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
    with pytest.raises(FatalKMSError, match="not a symmetric ENCRYPT_DECRYPT key"):
        make(client, None, key_id=meta["KeyId"]).describe()


def test_describe_refuses_a_key_in_another_region(kms: Any) -> None:
    west = boto3.client("kms", region_name="us-west-2")
    arn = west.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    # The operator names the other region's key but runs against us-east-1: KMS there
    # does not know it.
    with pytest.raises(FatalKMSError) as excinfo:
        make(make_client("us-east-1", 1), None, key_id=arn).describe()
    assert "not found in region us-east-1" in str(excinfo.value)
    assert "--region" in str(excinfo.value)
    # KMS resolves it (an endpoint of its region) but the run is set for us-east-1.
    with pytest.raises(FatalKMSError) as excinfo:
        make(make_client("us-west-2", 1), None, key_id=arn).describe()
    assert "lives in region us-west-2, not us-east-1" in str(excinfo.value)
    assert "--region us-west-2" in str(excinfo.value)


def test_encrypt_uses_the_resolved_arn_once_described(kms: Any, client: Any) -> None:
    k = make(client, None)
    k.describe()
    seen: list[str] = []
    client.meta.events.register_first(
        "before-parameter-build.kms.Encrypt", lambda params, **_: seen.append(params["KeyId"]))
    k.encrypt(b"x")
    assert seen == [kms.arn]


# -- round trip -------------------------------------------------------------------------------

def test_round_trip_returns_a_blob_that_decrypts_to_the_plaintext(kms: Any, client: Any) -> None:
    k = make(client, None)
    k.describe()
    blob = k.round_trip(b"escrow secret 1")
    assert isinstance(blob, bytes)
    assert kms.client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"escrow secret 1"
    assert kms.client.decrypt(CiphertextBlob=blob)["KeyId"] == kms.arn
    assert k.requests == 3  # describe, encrypt, decrypt (the verify)


def test_round_trip_verify_mismatch_is_a_reason_without_the_value(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = make(client, None)
    monkeypatch.setattr(k, "decrypt", lambda blob, context=None: b"some other plaintext")
    reason = k.round_trip(b"the-real-secret")
    assert isinstance(reason, str)
    assert "different plaintext" in reason
    assert "the-real-secret" not in reason and "some other plaintext" not in reason


def test_round_trip_of_a_blob_kms_cannot_open_is_a_reason(client: Any) -> None:
    inject(client, Injector("InvalidCiphertextException"), "Decrypt")
    reason = make(client, None).round_trip(b"x")
    assert reason == "KMS could not decrypt the ciphertext it had just produced"


def test_round_trip_decrypt_of_a_prefix_is_still_a_mismatch(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = make(client, None)
    monkeypatch.setattr(k, "decrypt", lambda blob, context=None: b"secre")
    assert isinstance(k.round_trip(b"secret"), str)


# -- map --------------------------------------------------------------------------------------

def test_map_runs_calls_concurrently_and_keeps_order(client: Any) -> None:
    k = make(client, None, concurrency=4)
    barrier = threading.Barrier(4, timeout=10)  # breaks unless 4 calls are in flight at once

    def fn(i: int) -> int:
        barrier.wait()
        return i * 10

    try:
        assert k.map(fn, [0, 1, 2, 3]) == [0, 10, 20, 30]
    finally:
        k.close()


def test_map_round_trips_a_batch_with_real_kms(kms: Any, client: Any) -> None:
    with make(client, None, concurrency=8) as k:
        k.describe()
        plaintexts = [f"secret {i}".encode() for i in range(20)]
        blobs = k.map(k.round_trip, plaintexts)
    assert all(isinstance(b, bytes) for b in blobs)
    assert [kms.client.decrypt(CiphertextBlob=b)["Plaintext"] for b in blobs] == plaintexts
    assert k.requests == 1 + 2 * 20


def test_map_propagates_a_fatal_error_and_cancels_what_has_not_started(client: Any) -> None:
    started: list[int] = []
    lock = threading.Lock()
    in_flight = threading.Event()  # the second slice's first call has started
    raised = threading.Event()  # map() has raised: that call may finish

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        if i == 0:
            in_flight.wait(10)  # fail while the other slice has a call in flight
            raise FatalKMSError("KMS denied Encrypt on key x")
        if i == 25:
            in_flight.set()
            raised.wait(10)
        return i

    with make(client, None, concurrency=2) as k:
        try:
            with pytest.raises(FatalKMSError, match="denied"):
                k.map(fn, list(range(50)))
        finally:
            raised.set()
    time.sleep(0.2)  # let the call that was in flight finish, and anything after it start
    # Two slices, items 0-24 and 25-49: the first fails on item 0 while the second has
    # item 25 in flight; neither starts anything after that.
    assert sorted(started) == [0, 25], started


def test_map_propagates_a_fatal_kms_error_from_the_workers(client: Any) -> None:
    inj = inject(client, Injector(forever="AccessDeniedException"), "Encrypt")
    with make(client, None, concurrency=4) as k, pytest.raises(FatalKMSError,
                                                               match="AccessDeniedException"):
        k.map(k.round_trip, [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"])
    # Four workers, two values each: a worker's first value fails and is not retried, and
    # the worker starts nothing after it, so at most one Encrypt per worker.
    assert 1 <= inj.calls <= 4 and k.retries == 0


def test_map_retries_transient_errors_inside_workers(client: Any) -> None:
    inject(client, Injector("ThrottlingException", "ThrottlingException",
                            "ThrottlingException"), "Encrypt")
    waits: list[float] = []
    with make(client, waits, concurrency=4) as k:
        out = k.map(k.round_trip, [b"a", b"b", b"c", b"d"])
    assert all(isinstance(b, bytes) for b in out)
    assert k.retries == 3 and len(waits) == 3


def test_map_of_nothing_and_of_one_item(client: Any) -> None:
    k = make(client, None, concurrency=4)
    assert k.map(lambda i: i, []) == []
    assert k._pool is None  # nothing to do starts no threads
    # One item still runs on the pool: submit() never blocks the caller (the pipeline
    # overlaps a batch's KMS work with the previous batch's write).
    assert k.map(lambda i: threading.current_thread().name, [1])[0].startswith("kms")


# -- validate_region --------------------------------------------------------------------------

@pytest.mark.parametrize("region", ["moon-1", "us-east", "US-EAST-1", "useast1", "",
                                    "us-east-1 ", "../us-east-1"])
def test_validate_region_refuses_names_no_partition_has(region: str) -> None:
    with pytest.raises(ConfigError, match="is not an AWS region name"):
        validate_region(region)


def test_validate_region_accepts_every_region_botocore_knows() -> None:
    import botocore.session

    endpoints = botocore.session.get_session().get_data("endpoints")
    regions = [r for p in endpoints["partitions"] for r in p["regions"]]
    assert "us-east-1" in regions and len(regions) > 20
    for region in regions:
        assert validate_region(region) == region


# -- per-value answers: one value's problem is that value's failure ----------------------------

def test_empty_plaintext_is_a_reason_without_calling_kms(kms: Any, client: Any) -> None:
    k = make(client, None)
    k.describe()
    reason = k.round_trip(b"")
    assert isinstance(reason, str)
    assert "empty" in reason
    assert k.requests == 1  # DescribeKey only: KMS Encrypt takes 1 to 4096 bytes


def test_validation_exception_on_encrypt_is_that_values_failure(kms: Any, client: Any) -> None:
    inj = inject(client, Injector("ValidationException"), "Encrypt")
    k = make(client, None)
    k.describe()
    reason = k.round_trip(b"plaintext-never-in-messages")
    assert isinstance(reason, str)
    assert "ValidationException" in reason
    assert "plaintext-never-in-messages" not in reason
    assert k.retries == 0 and inj.calls == 1 and k.requests == 2  # DescribeKey, Encrypt
    assert isinstance(k.round_trip(b"the next value"), bytes)  # and the run goes on


def test_validation_exception_before_the_key_is_described_stays_fatal(client: Any) -> None:
    # Until DescribeKey has accepted the key id, a ValidationException may be about the
    # request as a whole (a malformed key id): not a value's problem.
    inject(client, Injector("ValidationException"), "Encrypt")
    with pytest.raises(FatalKMSError, match="ValidationException"):
        make(client, None).encrypt(b"x")


@pytest.mark.parametrize("code", ["ValidationException", "InvalidCiphertextException",
                                  "IncorrectKeyException"])
def test_per_value_answers_of_the_verifying_decrypt_are_reasons(
    kms: Any, client: Any, code: str
) -> None:
    inject(client, Injector(code), "Decrypt")
    k = make(client, None)
    k.describe()
    reason = k.round_trip(b"x")
    assert isinstance(reason, str)
    assert isinstance(k.round_trip(b"y"), bytes)


def test_the_verifying_decrypt_is_pinned_to_the_run_key(kms: Any, client: Any) -> None:
    k = make(client, None)
    k.describe()
    seen: list[str | None] = []
    client.meta.events.register_first(
        "before-parameter-build.kms.Decrypt",
        lambda params, **_: seen.append(params.get("KeyId")))
    assert isinstance(k.round_trip(b"x"), bytes)
    assert seen == [kms.arn]


def test_access_denied_on_encrypt_stays_fatal_once_described(kms: Any, client: Any) -> None:
    inject(client, Injector("AccessDeniedException"), "Encrypt")
    k = make(client, None)
    k.describe()
    with pytest.raises(FatalKMSError, match="AccessDeniedException"):
        k.round_trip(b"x")


def test_moto_s_own_validation_exception_for_an_empty_plaintext_is_per_value(
    kms: Any, client: Any
) -> None:
    from migration import kms as kms_module

    k = make(client, None)
    k.describe()
    # round_trip decides an empty plaintext without calling KMS; Encrypt itself, given one,
    # gets moto's real ValidationException (1 to 4096 bytes), classified as the value's.
    with pytest.raises(kms_module._PerValue, match="ValidationException"):
        k.encrypt(b"")
    with pytest.raises(kms_module._PerValue, match="ValidationException"):
        k.encrypt(b"x" * 4097)
