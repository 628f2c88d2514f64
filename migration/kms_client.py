"""The boto3 KMS client a run uses, and the checks of the AWS settings it is built from.

botocore's own retries are switched off (``total_max_attempts=1``): `migration.kms.KMS`
is the one retry layer. Errors in the AWS settings (a profile that does not exist, an
endpoint URL that is not one) become a ConfigError naming the setting, never its value.
"""

from __future__ import annotations

import re
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from .errors import ConfigError

__all__ = ["aws_settings_problem", "make_client", "validate_region"]

_REGION_RE = re.compile(r"^[a-z]{2,4}(-[a-z]+)+-\d{1,2}$")  # eusc-de-east-1 has 4


def validate_region(region: str) -> str:
    """Refuse a region name that no AWS partition could have, before any call is made."""
    if not _REGION_RE.match(region):
        raise ConfigError(
            f"'{region}' is not an AWS region name (like us-east-1): "
            "fix --region or AWS_REGION to the region the KMS key lives in"
        )
    return region


def make_client(region: str, concurrency: int) -> Any:
    """One boto3 KMS client for the whole run, shared by every worker thread.

    Credentials and endpoint come from boto3's own resolution (environment, profile,
    IAM role; ``AWS_ENDPOINT_URL_KMS`` / ``AWS_ENDPOINT_URL``): nothing is passed here.
    """
    config = Config(
        region_name=region,
        max_pool_connections=max(concurrency, 10),
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
    )
    try:
        client = boto3.session.Session().client("kms", config=config)
        _check_endpoint(str(client.meta.endpoint_url))
    except Exception as exc:  # boto3 raises plain ValueErrors here too
        raise ConfigError(aws_settings_problem(exc)) from None
    return client


def _check_endpoint(url: str) -> None:
    """Raise ValueError for an endpoint botocore accepted but no request can use (another
    scheme, no host, a port out of range), before the first call instead of at it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    _ = parts.port  # ValueError when out of range or not a number
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("the KMS endpoint URL is not http(s)://host[:port]")


def aws_settings_problem(exc: BaseException) -> str:
    """One line for an error boto3 raised while building a client from the environment:
    what is wrong and what to fix, without the exception's own text (an endpoint URL or a
    config line may hold a credential)."""
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return ("the AWS profile in AWS_PROFILE (or AWS_DEFAULT_PROFILE) is not in the AWS "
                "config files: fix or unset it, or set AWS_CONFIG_FILE; nothing was written")
    if isinstance(exc, ValueError):  # botocore: "Invalid endpoint: ...", urllib: "... URL"
        return ("the KMS endpoint (AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL or endpoint_url in "
                "the AWS config) is not a valid URL: fix or unset it")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return (f"the AWS settings cannot be used ({type(exc).__name__}): check AWS_PROFILE, "
                "AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE, AWS_ENDPOINT_URL_KMS and the "
                "AWS_* variables")
    return (f"cannot create the KMS client from the AWS settings ({type(exc).__name__}): check "
            "AWS_PROFILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL_KMS and the AWS_* variables")
