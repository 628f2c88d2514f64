"""structlog set-up: console or JSON lines on stderr or a file, with a redaction guard.

Callers only ever log names, counts and primary keys. The `_redact` processor is a
second line of defence: any event field whose name suggests a secret is replaced.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["configure_from_options", "configure_logging", "get_logger"]

SENSITIVE = frozenset({
    "plaintext", "value", "values", "token", "tokens", "secret", "password", "key_material",
    "fernet_key", "encryption_key", "aws_secret_access_key", "original", "ciphertext",
})

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    from .db import scrub_known  # the credentials of the database URLs this process used

    for k in list(event):
        if k.lower() in SENSITIVE:
            event[k] = "[redacted]"
        elif isinstance(event[k], str):
            event[k] = scrub_known(event[k])
    return event


def configure_logging(
    level: str = "info", fmt: str = "console", file: TextIO | None = None
) -> None:
    """Configure structlog once per process; events go to `file` (stderr by default)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Alembic and botocore log through the standard library; keep them quiet but for warnings.
    logging.basicConfig(level=logging.WARNING, stream=file or sys.stderr)


def configure_from_options(opts: Mapping[str, Any]) -> None:
    """Logging as the command line's --log-level/--log-format/--log-file say (also how a
    worker process is told); a log file that cannot be opened is a ConfigError."""
    from .errors import ConfigError

    stream: TextIO | None = None
    path = opts.get("log_file")
    if path:
        try:
            stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot open --log-file {path}: {exc.strerror}") from None
    configure_logging(opts.get("log_level") or "warning", opts.get("log_format") or "console",
                      stream)


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("kms_migrate").bind(**bind)
