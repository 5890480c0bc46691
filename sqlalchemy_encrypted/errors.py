"""Exception hierarchy of sqlalchemy-encrypted.

Every exception raised on purpose by this package derives from
:class:`EncryptionError`. Messages name the table, column, tenant and key id
involved. They never contain plaintext, key bytes or passphrases, and
exceptions raised by ``cryptography`` are chained only when they carry no
secret either.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DecryptionError",
    "EncryptionError",
    "KeyDestroyedError",
    "KeyInUseError",
    "KeyNotFoundError",
    "KeyStateError",
    "KeyringIntegrityError",
    "KmsAccessDeniedError",
    "KmsContextMismatchError",
    "KmsError",
    "KmsKeyDisabledError",
    "KmsKeyNotFoundError",
    "KmsThrottlingError",
    "KmsUnavailableError",
    "PlaintextTooLongError",
    "StorageFormatError",
    "TenantContextError",
    "UnsupportedOperationError",
    "ValueTypeError",
]


class EncryptionError(Exception):
    """Base class of every error raised by sqlalchemy-encrypted."""


class ConfigurationError(EncryptionError):
    """A column type, keyring or KMS provider is configured wrongly."""


class DecryptionError(EncryptionError):
    """A stored value could not be authenticated or decoded.

    One opaque error covers every authentication failure (a flipped bit, a
    truncated value, a wrong key, a value moved from another column or
    tenant), so the message never tells an attacker which check failed.
    """


class StorageFormatError(DecryptionError):
    """A stored value is not an envelope of this library at all.

    Raised for empty values, values that look like plaintext, or a driver
    that returned text where the column should hold bytes.
    """


class UnsupportedOperationError(EncryptionError):
    """A SQL operation cannot work on ciphertext, such as LIKE or ORDER BY."""


class PlaintextTooLongError(EncryptionError, ValueError):
    """A value is longer than the declared length of its column."""


class ValueTypeError(EncryptionError, TypeError):
    """A Python value has the wrong type for its encrypted column."""


class KeyringIntegrityError(DecryptionError):
    """A keyring row does not match the DEK its KMS returned.

    Raised when the unwrapped DEK fails the row's key check value, for
    example because the row was restored from another environment or
    edited by hand.
    """


class KeyNotFoundError(EncryptionError):
    """No data encryption key with the requested key id or tenant exists."""


class KeyDestroyedError(KeyNotFoundError):
    """The data encryption key was destroyed (crypto-shredded)."""


class KeyStateError(EncryptionError):
    """A key lifecycle operation is not valid in the key's current state."""


class KeyInUseError(EncryptionError):
    """A key version cannot be retired because stored values still use it."""


class TenantContextError(EncryptionError):
    """No tenant is set, or the tenant in scope does not match the row's tenant."""


class KmsError(EncryptionError):
    """A call to the key management service failed."""


class KmsUnavailableError(KmsError):
    """The KMS could not be reached or timed out."""


class KmsThrottlingError(KmsError):
    """The KMS rejected the request because of its rate limit."""


class KmsKeyDisabledError(KmsError):
    """The key encryption key is disabled or pending deletion."""


class KmsKeyNotFoundError(KmsError):
    """No configured KMS provider holds the KEK that wrapped a DEK."""


class KmsAccessDeniedError(KmsError):
    """The caller is not allowed to use the key encryption key."""


class KmsContextMismatchError(KmsError):
    """The KMS could not unwrap the DEK, usually because the context or KEK differs."""
