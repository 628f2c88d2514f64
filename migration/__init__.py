"""kms-migrate: move Fernet-encrypted secrets in SQL columns to AWS KMS.

The application side imports from here: ``from migration import encrypt_secret,
decrypt_secret`` reads Fernet tokens and KMS ciphertexts alike (see ``migration.runtime``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .codec import encryption_context
from .errors import SecretDecryptError
from .runtime import KMSEncryption, decrypt_secret, encrypt_secret

__all__ = [
    "KMSEncryption",
    "SecretDecryptError",
    "__version__",
    "decrypt_secret",
    "encrypt_secret",
    "encryption_context",
]
