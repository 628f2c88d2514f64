"""The platform guide's own application helper (Step 3.2), kept as the guide prints it
(less the emoji in its log lines), so tests can prove that migrated values are read by the
code the application already runs."""
# ruff: noqa
import boto3
import base64
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)


class KMSEncryption:
    """AWS KMS encryption manager."""

    def __init__(self, region: str = "us-east-1"):
        self.region = region
        self.kms = boto3.client(
            'kms',
            region_name=region,
            aws_access_key_id=os.getenv("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=os.getenv("AWS_SECRET_ACCESS_KEY")
        )
        self.key_id = os.getenv("AWS_KMS_KEY_ID") or "alias/coinflip-master-key"
        logger.info(f"KMS initialized - Region: {region}, Key: {self.key_id}")

    def encrypt_secret(self, plaintext: str) -> str:
        try:
            response = self.kms.encrypt(
                KeyId=self.key_id,
                Plaintext=plaintext.encode('utf-8')
            )
            ciphertext = base64.b64encode(response['CiphertextBlob']).decode('utf-8')
            logger.debug(f"Encrypted secret using KMS (length: {len(ciphertext)})")
            return ciphertext
        except Exception as e:
            logger.error(f"KMS encryption failed: {e}")
            raise

    def decrypt_secret(self, ciphertext: str) -> str:
        try:
            ciphertext_blob = base64.b64decode(ciphertext.encode('utf-8'))
            response = self.kms.decrypt(
                CiphertextBlob=ciphertext_blob
            )
            plaintext = response['Plaintext'].decode('utf-8')
            logger.debug(f"Decrypted secret using KMS")
            return plaintext
        except Exception as e:
            logger.error(f"KMS decryption failed: {e}")
            raise


def get_kms_encryption() -> Optional[KMSEncryption]:
    if os.getenv("USE_AWS_KMS", "").lower() == "true":
        region = os.getenv("AWS_REGION", "us-east-1")
        return KMSEncryption(region=region)
    return None


def encrypt_secret(plaintext: str, encryption_key: Optional[str] = None) -> str:
    kms = get_kms_encryption()
    if kms:
        return kms.encrypt_secret(plaintext)
    else:
        from cryptography.fernet import Fernet
        if not encryption_key:
            encryption_key = os.getenv("ENCRYPTION_KEY")
            if not encryption_key:
                raise ValueError("ENCRYPTION_KEY not set")
        fernet = Fernet(encryption_key.encode())
        return fernet.encrypt(plaintext.encode()).decode()


def decrypt_secret(ciphertext: str, encryption_key: Optional[str] = None) -> str:
    kms = get_kms_encryption()
    if kms:
        return kms.decrypt_secret(ciphertext)
    else:
        from cryptography.fernet import Fernet
        if not encryption_key:
            encryption_key = os.getenv("ENCRYPTION_KEY")
            if not encryption_key:
                raise ValueError("ENCRYPTION_KEY not set")
        fernet = Fernet(encryption_key.encode())
        return fernet.decrypt(ciphertext.encode()).decode()
