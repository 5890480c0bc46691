"""The interface between column types and whatever holds the DEKs.

Column types ask a :class:`KeyProvider` for "the active DEK of tenant T for
purpose P" to encrypt and for "the DEK with key id K" to decrypt. The real
provider is :class:`sqlalchemy_encrypted.keyring.Keyring`; tests may use
:class:`sqlalchemy_encrypted.testing.InMemoryKeyring`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ._aead import AeadCipher
from .envelope import Algorithm
from .errors import ConfigurationError

__all__ = [
    "DataKey",
    "KeyProvider",
    "KeyPurpose",
    "get_default_key_provider",
    "set_default_key_provider",
]


class KeyPurpose(enum.StrEnum):
    """The use of a DEK. Each purpose has its own algorithm and its own keys."""

    RANDOMIZED = "randomized"
    DETERMINISTIC = "deterministic"

    @property
    def algorithm(self) -> Algorithm:
        if self is KeyPurpose.RANDOMIZED:
            return Algorithm.AES_256_GCM
        return Algorithm.AES_256_SIV


class DataKey:
    """An unwrapped DEK with its identity. ``repr`` shows ids only."""

    __slots__ = ("cipher", "key_id", "purpose", "tenant_id", "version")

    def __init__(
        self,
        key_id: uuid.UUID,
        tenant_id: str,
        purpose: KeyPurpose,
        version: int,
        cipher: AeadCipher,
    ) -> None:
        self.key_id = key_id
        self.tenant_id = tenant_id
        self.purpose = purpose
        self.version = version
        self.cipher = cipher

    def __repr__(self) -> str:
        return (
            f"<DataKey {self.key_id} tenant={self.tenant_id!r} "
            f"purpose={self.purpose.value} version={self.version}>"
        )

    def __reduce__(self) -> str:
        raise TypeError("DataKey holds key material and cannot be pickled")


@runtime_checkable
class KeyProvider(Protocol):
    """Source of DEKs for the column types."""

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        """Return the DEK new values are sealed with, creating the tenant's
        first DEK if it has none."""
        ...

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        """Return the DEK with ``key_id``.

        When ``expected_tenant`` is given and the key belongs to another
        tenant, raise :class:`TenantContextError` before any KMS call.
        Raises :class:`KeyNotFoundError` or :class:`KeyDestroyedError`.
        """
        ...

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> Sequence[DataKey]:
        """Return every DEK of the tenant that may still decrypt values,
        active first, without creating any."""
        ...


_default_provider: KeyProvider | None = None


def set_default_key_provider(provider: KeyProvider | None) -> None:
    """Make ``provider`` the key source of every encrypted column that names none."""
    global _default_provider
    _default_provider = provider


def get_default_key_provider() -> KeyProvider:
    if _default_provider is None:
        raise ConfigurationError(
            "no keyring is configured: create a Keyring (or an InMemoryKeyring in tests) "
            "and make it the default, or pass keyring= to the column type"
        )
    return _default_provider
