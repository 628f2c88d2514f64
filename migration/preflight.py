"""Preflight: check, without writing anything, that a migration can start.

The guide's Troubleshooting section, made executable: each check gives one line, ok or
the failure with its fix. Checks keep going after a failure wherever the later ones still
make sense (a KMS failure does not stop the database checks; an unreachable database
turns the target checks into "skipped").

Nothing here ever holds a secret it prints: Fernet keys are only said to be valid or not
(by name), the round trip uses a random 32-byte test value that is never shown, and KMS
and STS errors are reported by their code, never by their message or request.

The checks live in `preflight_db` (database, targets, Fernet keys, column fit, bookkeeping)
and `preflight_kms` (KMS through `migration.kms.KMS`, STS), a rekey's in `preflight_rekey`;
their lines in `preflight_lines`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .config import Settings
from .preflight_db import (
    check_bookkeeping,
    check_database,
    check_fernet_keys,
    check_fit,
    check_samples,
    check_targets,
)
from .preflight_kms import check_caller, check_kms
from .preflight_lines import Check, format_check, summary
from .preflight_rekey import check_rekey

__all__ = ["Check", "format_check", "preflight", "summary"]


def preflight(
    settings: Settings,
    *,
    kms_client: Any = None,
    sts_client: Any = None,
    env: Mapping[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Check]:
    """Run every check that can run and return one Check per line, in order.

    With `settings.to_key_id` the checks are a rekey's (`preflight_rekey`): no Fernet
    keys, the source and the destination keys, a ReEncrypt round trip. `env`, when given
    (the CLI passes os.environ), is also checked for ENCRYPTION_KEY itself: keys from
    ENCRYPTION_KEY_LEGACY alone would otherwise look valid. Reads only: the database engine
    is read-only at the database level.
    """
    checks: list[Check] = []
    engine = check_database(settings, checks)
    try:
        bound = check_targets(engine, settings, checks)
        if settings.to_key_id:  # a rekey: KMS to KMS, no Fernet key involved
            checks.append(Check("Fernet keys", None, "not needed: a rekey moves KMS values "
                                "from one KMS key or context to another"))
            arn = check_rekey(engine, settings, bound, kms_client, checks, sleep)
        else:
            codec = check_fernet_keys(settings, env, checks)
            check_samples(engine, settings, bound, codec, checks)
            check_fit(engine, settings, bound, codec, checks)
            arn = check_kms(settings, kms_client, checks, sleep)
        check_caller(settings, sts_client, arn, checks)
        check_bookkeeping(engine, settings, arn, checks)
    finally:
        if engine is not None:
            engine.dispose()
    return checks
