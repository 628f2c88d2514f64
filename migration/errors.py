"""The few error classes the CLI turns into exit codes and one-line messages.

Every message here is safe to print: none of them ever carries a plaintext, a token,
a Fernet key or an AWS secret. Code that raises them passes only names (table, column,
key id, primary key) and reasons.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILURES",
    "EXIT_FATAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "ConfigError",
    "DatabaseError",
    "FatalKMSError",
    "KmsMigrateError",
    "ResumeMismatchError",
    "RunLockedError",
    "SecretDecryptError",
    "TransientKMSError",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_FATAL = 2
EXIT_INTERRUPTED = 130


class KmsMigrateError(Exception):
    """Base error: the run refused to start or stopped; the message is one printable line."""

    exit_code = EXIT_FATAL


class ConfigError(KmsMigrateError):
    """Bad settings, keys, targets or schema: found before anything is written."""


class DatabaseError(KmsMigrateError):
    """The database could not be reached or refused an operation."""


class ResumeMismatchError(KmsMigrateError):
    """An unfinished run was started with other settings than the ones given now."""


class RunLockedError(KmsMigrateError):
    """Another migrate or rollback holds the run lock, or took it from this process."""


class FatalKMSError(KmsMigrateError):
    """KMS refused in a way no retry fixes (access, key state, key usage, region)."""


class TransientKMSError(Exception):
    """A KMS error that a retry may fix; raised inside the retry loop, never to the CLI."""


class SecretDecryptError(ValueError):
    """The application-side helper could not open a stored value (migration.runtime).

    Raised for a value that is neither a Fernet token nor a KMS ciphertext, or that neither
    the Fernet keys nor KMS open (corrupt, unknown key, another encryption context). The
    message says why in general terms and never carries the value, nor any part of it.
    A ValueError, so code written for the guide's helper (which raises ValueError) still
    catches it.
    """
