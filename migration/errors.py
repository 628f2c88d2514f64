"""The error tree: every error the tool raises on purpose, with its exit code and one line.

Every message here is safe to print: none of them ever carries a plaintext, a token,
a Fernet key or an AWS secret. Code that raises them passes only names (table, column,
key id, primary key) and reasons.

The tree::

    KmsMigrateError (exit 2)            the run refused to start or stopped
      ConfigError                       settings, keys, targets, schema
      DatabaseError                     the database could not be reached or refused
      ResumeMismatchError               an unfinished run with other settings
      RunLockedError                    another run holds the run lock, or took it
      FatalKMSError                     KMS refused in a way no retry fixes
      WorkersFailed                     a worker of a ranged run stopped on an error
      DemoCheckFailed                   a step of `kms-migrate demo` did not hold
    TransientKMSError                   inside the KMS retry loop only, never to the CLI
    KMSValueError                       KMS refused one value's data (a per-value outcome)
    SecretDecryptError (ValueError)     the application-side helper (migration.runtime)

Errors raised by other layers (click, SQLAlchemy, the checkpoints package's lock and lease
errors) and unexpected ones are mapped to an exit code and one line in `migration.exits`,
the one place `main()` turns an exception into its outcome.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILURES",
    "EXIT_FATAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "ConfigError",
    "DatabaseError",
    "DemoCheckFailed",
    "FatalKMSError",
    "KMSValueError",
    "KmsMigrateError",
    "ResumeMismatchError",
    "RunLockedError",
    "SecretDecryptError",
    "TransientKMSError",
    "WorkersFailed",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_FATAL = 2
EXIT_INTERRUPTED = 130


class KmsMigrateError(Exception):
    """Base error: the run refused to start or stopped; the message is one printable line."""

    exit_code = EXIT_FATAL

    def one_line(self) -> str:
        """The line the CLI prints for this error on stderr."""
        return f"kms-migrate: error: {self}"


class ConfigError(KmsMigrateError):
    """Bad settings, keys, targets or schema: found before anything is written."""


class DatabaseError(KmsMigrateError):
    """The database could not be reached or refused an operation."""


class ResumeMismatchError(KmsMigrateError):
    """An unfinished run was started with other settings than the ones given now."""


class RunLockedError(KmsMigrateError):
    """Another migrate or rollback holds the run lock, or took it from this process."""


class FatalKMSError(KmsMigrateError):
    """KMS refused in a way no retry fixes (access, key state, key usage, region).

    `code` is KMS's error code (or the botocore error's name) when one is known, "" else;
    `key` the key the message names, when it names one.
    """

    def __init__(self, message: str, code: str = "", key: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.key = key


class WorkersFailed(KmsMigrateError):
    """Some worker stopped on an error (it printed its own line); the run is resumable."""


class DemoCheckFailed(KmsMigrateError):
    """A step of `kms-migrate demo` did not give what it should have."""


class TransientKMSError(Exception):
    """A KMS error that a retry may fix; raised inside the retry loop, never to the CLI.

    Its text is KMS's error code, or the name of the connection error (`connection`).
    """

    def __init__(self, what: str, *, connection: bool = False) -> None:
        super().__init__(what)
        self.connection = connection


class KMSValueError(Exception):
    """KMS refused the data of one value (a plaintext, a ciphertext, an encryption context):
    a per-value outcome, never a run-level stop. Its text is KMS's error code."""


class SecretDecryptError(ValueError):
    """The application-side helper could not open a stored value (migration.runtime).

    Raised for a value that is neither a Fernet token nor a KMS ciphertext, or that neither
    the Fernet keys nor KMS open (corrupt, unknown key, another encryption context). The
    message says why in general terms and never carries the value, nor any part of it.
    A ValueError, so code written for the guide's helper (which raises ValueError) still
    catches it.
    """
