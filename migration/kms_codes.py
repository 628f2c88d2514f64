"""What KMS's answers mean: which error codes are transient, and the one line for each
fatal one, naming the key and the fix.

The one message table for every KMS failure, whoever made the call (a run, preflight): the
text says what is wrong and how to fix it; only what to do next differs, and a
`Wording` says it (re-run the command, which resumes; or re-run preflight). Messages
carry codes, operation names, key ids and regions only: never a value, never KMS's own
message text.
"""

from __future__ import annotations

from dataclasses import dataclass

import botocore.exceptions

from .errors import TransientKMSError

__all__ = [
    "CONNECTION_ERRORS",
    "CREDENTIAL_CODES",
    "PREFLIGHT",
    "RUN",
    "THROTTLE_CODES",
    "TRANSIENT_CODES",
    "UNDECRYPTABLE_CODES",
    "VALUE_CODES",
    "Wording",
    "boto_failure",
    "error_code",
    "fatal_message",
    "gave_up",
    "is_transient",
    "no_credentials",
]

TRANSIENT_CODES = frozenset({
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "KMSInternalException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
})
THROTTLE_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException",
                            "RequestLimitExceeded"})
CREDENTIAL_CODES = frozenset({
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
    "ExpiredToken",
    "AuthFailure",
})
# Per-value answers of Decrypt: the ciphertext is not one this key (or any) opens.
UNDECRYPTABLE_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
# Per-value answers of Encrypt or Decrypt once the key is described: the request's data (a
# plaintext, a ciphertext, an encryption context) broke a constraint. See `KMS._classify`.
VALUE_CODES = frozenset({"ValidationException"})
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


@dataclass(frozen=True)
class Wording:
    """What the operator does once the cause is fixed, said after every fatal message."""

    rerun: str  # "then re-run ...": the end of every line
    backoff: str  # what to do when KMS stays throttled or unavailable


RUN = Wording(
    rerun="then re-run (the run resumes where it stopped; nothing of the batch in flight "
          "was written)",
    backoff="lower --concurrency or wait",
)
PREFLIGHT = Wording(rerun="then re-run kms-migrate preflight", backoff="wait")


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """The error code of an AWS answer ("Unknown" when it has none)."""
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def is_transient(exc: botocore.exceptions.ClientError) -> bool:
    """Whether a retry may fix this answer: throttling, KMS internal errors, 5xx."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error_code(exc) in TRANSIENT_CODES or (isinstance(status, int) and status >= 500)


def fatal_message(code: str, op: str, key: str, region: str, wording: Wording) -> str:
    """One line: what KMS said about the key and what the operator should do about it."""
    tail = wording.rerun
    if code == "AccessDeniedException":
        return (f"KMS denied {op} on {key} in {region} (AccessDeniedException): grant the "
                f"caller kms:{op} on the key (kms-migrate iam-policy prints least-privilege "
                "policies; aws sts get-caller-identity shows the caller; "
                f"aws kms describe-key --key-id {key} --region {region} checks access), {tail}")
    if code == "NotFoundException":
        return (f"KMS key {key} was not found in region {region} (NotFoundException): check "
                "--key-id / AWS_KMS_KEY_ID and --region / AWS_REGION (aws kms list-aliases "
                f"--region {region}; aws kms list-keys --region {region}), {tail}")
    if code == "DisabledException":
        return (f"KMS key {key} is disabled (DisabledException): enable it (aws kms enable-key "
                f"--key-id {key} --region {region}), {tail}")
    if code == "KMSInvalidStateException":
        return (f"KMS key {key} is pending deletion or otherwise unusable "
                f"(KMSInvalidStateException): cancel the deletion (aws kms cancel-key-deletion "
                f"--key-id {key} --region {region}) and enable it, {tail}")
    if code == "InvalidKeyUsageException":
        return (f"KMS key {key} is not a symmetric ENCRYPT_DECRYPT key "
                f"(InvalidKeyUsageException): use a key created with --key-usage "
                f"ENCRYPT_DECRYPT, {tail}")
    if code in CREDENTIAL_CODES:
        return (f"AWS rejected the credentials ({code}) calling KMS {op} on {key}: check the "
                f"default credential chain (aws sts get-caller-identity), {tail}")
    if code == "InvalidArnException":
        return (f"{key} is not a valid KMS key id, ARN or alias (InvalidArnException): fix "
                f"--key-id / AWS_KMS_KEY_ID, {tail}")
    return f"KMS refused {op} on {key} in {region} ({code}): fix the cause, {tail}"


def gave_up(error: TransientKMSError, op: str, key: str, region: str, attempts: int,
            wording: Wording) -> str:
    """One line for a call that stayed transient through every attempt."""
    if error.connection:
        return (f"cannot reach KMS in {region} ({error}) after {attempts} attempts: check "
                f"the network, AWS_ENDPOINT_URL_KMS and --region, {wording.rerun}")
    return (f"KMS kept answering {error} to {op} on {key} after {attempts} attempts: "
            f"{wording.backoff} (if it persists, check the KMS request quotas), "
            f"{wording.rerun}")


def no_credentials(wording: Wording) -> str:
    return ("no AWS credentials found: configure the default credential chain (an IAM role, "
            "AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment), "
            f"{wording.rerun}")


def boto_failure(name: str, op: str, key: str, region: str, wording: Wording) -> str:
    """One line for a botocore error that is neither an answer nor a connection problem."""
    return (f"KMS call {op} failed ({name}) for {key} in {region}: check the endpoint and "
            f"credentials, {wording.rerun}")
