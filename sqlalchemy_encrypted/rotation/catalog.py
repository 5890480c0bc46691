"""Key metadata for the census: which tenant, purpose, version and state a key id has.

A provider with ``list_keys()`` (the keyring) answers from its metadata
table, with no KMS call and no DEK unwrapped. Any other
:class:`~sqlalchemy_encrypted.keys.KeyProvider` is asked through the
protocol, which may unwrap DEKs but never decrypts a stored value.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import KeyDestroyedError, KeyNotFoundError
from ..keys import KeyProvider, KeyPurpose

__all__ = ["KeyCatalog", "KeyRecord", "KeyStateName"]


class KeyStateName:
    """The key states the census reports, as plain strings."""

    PENDING = "pending"
    ACTIVE = "active"
    DECRYPT_ONLY = "decrypt_only"
    RETIRED = "retired"
    DESTROYED = "destroyed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class KeyRecord:
    """What the census knows about one key id. ``tenant_id``, ``purpose`` and
    ``version`` are None only for a key id the keyring does not know."""

    key_id: uuid.UUID
    tenant_id: str | None
    purpose: KeyPurpose | None
    version: int | None
    state: str


def _state_name(state: Any) -> str:
    value = getattr(state, "value", state)
    return str(value)


class KeyCatalog:
    """Looks up key metadata, once per key id, for one key provider."""

    def __init__(self, provider: KeyProvider) -> None:
        self._provider = provider
        self._records: dict[uuid.UUID, KeyRecord] = {}
        self._active: dict[tuple[str, KeyPurpose], int | None] = {}
        self._listed = False
        list_keys = getattr(provider, "list_keys", None)
        if callable(list_keys):
            self._load(list_keys())
            self._listed = True

    def _load(self, infos: Iterable[Any]) -> None:
        for info in infos:
            record = KeyRecord(
                key_id=info.key_id,
                tenant_id=info.tenant_id,
                purpose=KeyPurpose(info.purpose),
                version=int(info.version),
                state=_state_name(info.state),
            )
            self._records[record.key_id] = record
            if record.state == KeyStateName.ACTIVE:
                assert record.purpose is not None and record.tenant_id is not None
                self._active[(record.tenant_id, record.purpose)] = record.version

    def lookup(self, key_id: uuid.UUID) -> KeyRecord:
        """Return the metadata of ``key_id``; state ``unknown`` if no key has it."""
        record = self._records.get(key_id)
        if record is None:
            record = self._ask_provider(key_id)
            self._records[key_id] = record
        return record

    def _ask_provider(self, key_id: uuid.UUID) -> KeyRecord:
        if self._listed:
            return KeyRecord(key_id, None, None, None, KeyStateName.UNKNOWN)
        try:
            key = self._provider.key_by_id(key_id)
        except KeyDestroyedError:
            return KeyRecord(key_id, None, None, None, KeyStateName.DESTROYED)
        except KeyNotFoundError:
            return KeyRecord(key_id, None, None, None, KeyStateName.UNKNOWN)
        active = self.active_version(key.tenant_id, key.purpose)
        state = KeyStateName.ACTIVE if active == key.version else KeyStateName.DECRYPT_ONLY
        return KeyRecord(key_id, key.tenant_id, key.purpose, key.version, state)

    def active_version(self, tenant_id: str, purpose: KeyPurpose) -> int | None:
        """Return the version new values of the tenant are sealed with, or None."""
        slot = (tenant_id, purpose)
        if slot not in self._active:
            if self._listed:
                self._active[slot] = None
            else:
                keys = self._provider.decryptable_keys(tenant_id, purpose)
                self._active[slot] = keys[0].version if keys else None
        return self._active[slot]
