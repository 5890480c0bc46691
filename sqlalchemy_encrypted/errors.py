"""Exception hierarchy of sqlalchemy-encrypted.

Every exception raised on purpose by this package derives from
:class:`EncryptionError`. Messages name the table, column, tenant and key id
involved. They never contain plaintext, key bytes or passphrases, and
exceptions raised by ``cryptography`` are chained only when they carry no
secret either.

Every class mixes in SQLAlchemy's ``DontWrapMixin``: an error raised while
SQLAlchemy processes bound parameters reaches the caller as itself, not
wrapped in a ``StatementError`` whose text would list the parameters, and so
the plaintext values of the statement.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import DontWrapMixin

__all__ = [
    "ConfigurationError",
    "ConversionBatchError",
    "DecryptionError",
    "DuplicateValueError",
    "EncryptionError",
    "KeyDestroyedError",
    "KeyInUseError",
    "KeyNotFoundError",
    "KeyPendingError",
    "KeyRecentlyActiveError",
    "KeyStateError",
    "KeyUsageLimitError",
    "KeyringIntegrityError",
    "KmsAccessDeniedError",
    "KmsContextMismatchError",
    "KmsError",
    "KmsKeyDisabledError",
    "KmsKeyNotFoundError",
    "KmsThrottlingError",
    "KmsUnavailableError",
    "MigrationError",
    "MixedValuesError",
    "PlaintextTooLongError",
    "ReencryptionError",
    "StorageFormatError",
    "StoredKeyDestroyedError",
    "StoredKeyNotFoundError",
    "TenantContextError",
    "TenantMismatchError",
    "TooManyKeyVersionsError",
    "UnknownKeysError",
    "UnsupportedOperationError",
    "ValueTypeError",
]


class EncryptionError(Exception, DontWrapMixin):
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


class TooManyKeyVersionsError(UnsupportedOperationError):
    """A lookup through a bound parameter cannot cover all of a tenant's key versions.

    Such a lookup binds a fixed number of search values, one per
    decryptable key version. A tenant with more decryptable versions than
    that must finish re-encryption and retire its old versions first.
    """


class PlaintextTooLongError(EncryptionError, ValueError):
    """A value is longer than the declared length of its column, or is
    infinite or has more integer digits than its ``Numeric(precision, scale)``
    allows."""


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


class UnknownKeysError(KeyNotFoundError):
    """Stored values name key ids that are not in the keyring table.

    The keyring table and the data come from different points in time, as
    after restoring one of them from a backup. ``sqlalchemy-encrypted keys
    rotate`` raises it (exit status 8) before it creates any key.
    """


class KeyStateError(EncryptionError):
    """A key lifecycle operation is not valid in the key's current state."""


class KeyPendingError(KeyStateError):
    """A rotation found a pending version of the same tenant and purpose.

    ``tenant_id``, ``purpose`` (the :class:`~sqlalchemy_encrypted.KeyPurpose`
    value, such as ``"randomized"``) and ``version`` name that pending
    version, so a caller can word its own message.
    """

    def __init__(self, message: str, *, tenant_id: str, purpose: str, version: int) -> None:
        super().__init__(message)
        self.tenant_id = tenant_id
        self.purpose = purpose
        self.version = version

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: the default reduction passes only the message.
        return _rebuild_error, (type(self), self.args[0]), self.__dict__


class KeyRecentlyActiveError(KeyStateError):
    """A key version stopped being active too recently to be retired.

    Processes cache the active version for their ``active_key_ttl``, so they
    may still seal new values under it for that long. ``tenant_id`` and
    ``version`` name the version, ``not_before`` is the UTC time from which
    it may be retired, and ``retry_after`` the seconds until then.
    """

    def __init__(
        self,
        message: str,
        *,
        tenant_id: str,
        version: int,
        not_before: datetime.datetime,
        retry_after: float,
    ) -> None:
        super().__init__(message)
        self.tenant_id = tenant_id
        self.version = version
        self.not_before = not_before
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: the default reduction passes only the message.
        return _rebuild_error, (type(self), self.args[0]), self.__dict__


class KeyUsageLimitError(EncryptionError):
    """A randomized DEK has sealed as many values as its usage limit allows.

    AES-GCM with random 96-bit nonces stays safe only while a key seals at
    most about 2^32 values (NIST SP 800-38D, section 8.3). ``tenant_id``,
    ``key_id`` and ``version`` name the DEK. ``replaced`` is True when the
    key provider has already made a newer version active, so that the
    caller may seal again under the tenant's active DEK.
    """

    def __init__(
        self,
        message: str,
        *,
        tenant_id: str,
        key_id: uuid.UUID,
        version: int,
        replaced: bool = False,
    ) -> None:
        super().__init__(message)
        self.tenant_id = tenant_id
        self.key_id = key_id
        self.version = version
        self.replaced = replaced

    def with_message(self, message: str) -> KeyUsageLimitError:
        """Return a new error about the same DEK with ``message``."""
        return KeyUsageLimitError(
            message,
            tenant_id=self.tenant_id,
            key_id=self.key_id,
            version=self.version,
            replaced=self.replaced,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: the default reduction passes only the message.
        return _rebuild_error, (type(self), self.args[0]), self.__dict__


class StoredKeyNotFoundError(KeyNotFoundError, DecryptionError):
    """The key id in a stored value names no key that can open it.

    The value is damaged, comes from another keyring, or its key version was
    retired. Being a :class:`DecryptionError` too, it is caught by code that
    handles unreadable values.
    """


class StoredKeyDestroyedError(KeyDestroyedError, StoredKeyNotFoundError):
    """The key that sealed a stored value was destroyed (crypto-shredded)."""


class KeyInUseError(EncryptionError):
    """A key version cannot be retired because stored values still use it.

    ``references`` maps each ``table.column`` that still holds values under
    the key to the number of those values.
    """

    def __init__(self, message: str, references: Mapping[str, int] | None = None) -> None:
        super().__init__(message)
        self.references: dict[str, int] = dict(references or {})


class TenantContextError(EncryptionError):
    """No tenant is set, or the tenant in scope does not match the row's tenant."""


class TenantMismatchError(TenantContextError, DecryptionError):
    """A stored value was sealed under another tenant's key than the tenant
    of the active :func:`~sqlalchemy_encrypted.tenant_scope`."""


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


class ReencryptionError(EncryptionError):
    """A re-encryption run failed rows or left values under an old key version."""


class DuplicateValueError(EncryptionError):
    """A unique deterministic column would hold one value twice, sealed under
    two key versions of the same tenant, which the database index cannot see."""


class MigrationError(EncryptionError):
    """A migration operation on an encrypted column cannot run or complete.

    Raised, for example, in offline (``--sql``) mode, for a table without a
    primary key, or when the column cannot be swapped. The table is left as it
    was or in a state that running the same operation again completes.

    When the database rejects a schema step of a conversion (adding the
    temporary column, locking the table, the census or the swap), the message
    names the table, column and step, and quotes only the database's primary
    message and SQLSTATE. The database error is not chained, because its
    parameters and PostgreSQL's DETAIL line can quote stored values.
    """


class ConversionBatchError(MigrationError):
    """The database rejected a batch while a column conversion read or wrote it.

    ``table`` and ``column`` name the column being converted. ``first_key``
    and ``last_key`` are the primary keys of the first and last row of the
    failed batch, or None when the batch was not read yet. ``rows_done``
    counts the rows of the earlier batches. The message quotes the database's
    primary message and SQLSTATE, and the database error is not chained.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str,
        column: str,
        first_key: tuple[object, ...] | None,
        last_key: tuple[object, ...] | None,
        rows_done: int,
    ) -> None:
        super().__init__(message)
        self.table = table
        self.column = column
        self.first_key = first_key
        self.last_key = last_key
        self.rows_done = rows_done

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: the default reduction passes only the message.
        return _rebuild_error, (type(self), self.args[0]), self.__dict__


class MixedValuesError(MigrationError):
    """A column holds values in both forms and the operation was run with ``strict=True``.

    ``primary_keys`` lists up to 10 rows already in the target form, and
    ``count`` how many there are in total.
    """

    def __init__(self, message: str, *, count: int, primary_keys: list[tuple[object, ...]]) -> None:
        super().__init__(message)
        self.count = count
        self.primary_keys = primary_keys


def _rebuild_error(cls: type[EncryptionError], message: str) -> EncryptionError:
    """Create an error of ``cls`` without its keyword arguments, for unpickling;
    pickle then restores its attributes and notes."""
    error = cls.__new__(cls, message)
    Exception.__init__(error, message)
    return error
