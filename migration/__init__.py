"""kms-migrate: move Fernet-encrypted secrets in SQL columns to AWS KMS."""

from __future__ import annotations

__version__ = "0.1.0"
