"""Encrypted columns for SQLAlchemy 2.x ORM models.

``Encrypted`` seals values with AES-256-GCM under a random nonce;
``DeterministicEncrypted`` uses AES-256-SIV so equal values can be searched.
Each value is bound to its table, column and tenant, and sealed under the
tenant's DEK from a key provider.
"""

from __future__ import annotations

from . import query_guard as _query_guard  # noqa: F401  (registers the SELECT check)
from . import row_tenant as _row_tenant  # noqa: F401  (registers the tenant hooks)
from . import statement_errors as _statement_errors  # noqa: F401  (registers the error hook)
from .envelope import Algorithm, EnvelopeHeader, parse_header
from .errors import (
    ConfigurationError,
    ConversionBatchError,
    DecryptionError,
    DuplicateValueError,
    EncryptionError,
    KeyDestroyedError,
    KeyInUseError,
    KeyNotFoundError,
    KeyPendingError,
    KeyRecentlyActiveError,
    KeyringIntegrityError,
    KeyStateError,
    KeyUsageLimitError,
    KmsAccessDeniedError,
    KmsContextMismatchError,
    KmsError,
    KmsKeyDisabledError,
    KmsKeyNotFoundError,
    KmsThrottlingError,
    KmsUnavailableError,
    MigrationError,
    MixedValuesError,
    PlaintextTooLongError,
    ReencryptionError,
    StorageFormatError,
    StoredKeyDestroyedError,
    StoredKeyNotFoundError,
    TenantContextError,
    TenantMismatchError,
    TooManyKeyVersionsError,
    UnknownKeysError,
    UnsupportedOperationError,
    ValueTypeError,
)
from .keys import (
    DEFAULT_KEY_USAGE_LIMIT,
    UNLIMITED_SEALS,
    DataKey,
    KeyLease,
    KeyProvider,
    KeyPurpose,
    LeaseGeneration,
    LeasingKeyProvider,
    SealBudget,
    get_default_key_provider,
    set_default_key_provider,
)
from .row_tenant import TENANT_COLUMN_INFO_KEY
from .schema_check import UndersizedColumn, find_undersized_columns
from .tenancy import copy_current_tenant_scope, current_tenant, set_default_tenant, tenant_scope
from .types import DeterministicEncrypted, Encrypted, EncryptedType, type_for_header

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_KEY_USAGE_LIMIT",
    "TENANT_COLUMN_INFO_KEY",
    "UNLIMITED_SEALS",
    "Algorithm",
    "ConfigurationError",
    "ConversionBatchError",
    "DataKey",
    "DecryptionError",
    "DeterministicEncrypted",
    "DuplicateValueError",
    "Encrypted",
    "EncryptedType",
    "EncryptionError",
    "EnvelopeHeader",
    "KeyDestroyedError",
    "KeyInUseError",
    "KeyLease",
    "KeyNotFoundError",
    "KeyPendingError",
    "KeyProvider",
    "KeyPurpose",
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
    "LeaseGeneration",
    "LeasingKeyProvider",
    "MigrationError",
    "MixedValuesError",
    "PlaintextTooLongError",
    "ReencryptionError",
    "SealBudget",
    "StorageFormatError",
    "StoredKeyDestroyedError",
    "StoredKeyNotFoundError",
    "TenantContextError",
    "TenantMismatchError",
    "TooManyKeyVersionsError",
    "UndersizedColumn",
    "UnknownKeysError",
    "UnsupportedOperationError",
    "ValueTypeError",
    "copy_current_tenant_scope",
    "current_tenant",
    "find_undersized_columns",
    "get_default_key_provider",
    "parse_header",
    "set_default_key_provider",
    "set_default_tenant",
    "tenant_scope",
    "type_for_header",
]
