"""Key metadata for the census: which tenant, purpose, version and state a key id has.

A provider with ``list_keys()`` (the keyring) reads it from its metadata
table, with no KMS call and no DEK unwrapped. Any other
:class:`~sqlalchemy_encrypted.keys.KeyProvider` is asked through the
protocol, which may unwrap DEKs but never decrypts a stored value.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import sqlalchemy as sa

from ..errors import KeyDestroyedError, KeyNotFoundError
from ..keyring.schema import keyring_table
from ..keyring.store import KeyStore
from ..keys import KeyProvider, KeyPurpose

__all__ = ["KeyCatalog", "KeyLister", "KeyRecord", "KeyStateName", "KeyringMetadata"]


@runtime_checkable
class KeyLister(Protocol):
    """Anything that lists key metadata without unwrapping: a Keyring or a
    :class:`KeyringMetadata`."""

    def list_keys(self, tenant_id: str | None = None) -> Iterable[Any]: ...


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
    """The metadata of one key id. ``tenant_id``, ``purpose`` and ``version``
    are None only for a key id that is not in the keyring."""

    key_id: uuid.UUID
    tenant_id: str | None
    purpose: KeyPurpose | None
    version: int | None
    state: str


def _state_name(state: Any) -> str:
    value = getattr(state, "value", state)
    return str(value)


@dataclass(frozen=True)
class _ListedKey:
    key_id: uuid.UUID
    tenant_id: str
    purpose: KeyPurpose
    version: int
    state: str


class KeyringMetadata:
    """Reads key metadata straight from a keyring table, with no KMS at all.

    It lets a census run where only the database is reachable, for example
    the ``status`` command without ``--kms``.
    """

    def __init__(
        self, engine: sa.Engine, table_name: str = "encryption_keys", schema: str | None = None
    ) -> None:
        self.engine = engine
        self.table = keyring_table(sa.MetaData(), table_name, schema)

    def list_keys(self, tenant_id: str | None = None) -> list[_ListedKey]:
        c = self.table.c
        query = sa.select(c.key_id, c.tenant_id, c.purpose, c.key_version, c.state)
        if tenant_id is not None:
            query = query.where(c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            try:
                rows = conn.execute(query).all()
            except (sa.exc.OperationalError, sa.exc.ProgrammingError):
                KeyStore(self.engine, self.table)._raise_if_table_missing()
                raise
        return [
            _ListedKey(
                row.key_id, row.tenant_id, KeyPurpose(row.purpose), row.key_version, row.state
            )
            for row in rows
        ]


class KeyCatalog:
    """Looks up key metadata, once per key id, for one key provider."""

    def __init__(self, provider: KeyProvider | KeyLister) -> None:
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
        if self._listed or not isinstance(self._provider, KeyProvider):
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
            if self._listed or not isinstance(self._provider, KeyProvider):
                self._active[slot] = None
            else:
                try:
                    keys = self._provider.decryptable_keys(tenant_id, purpose)
                except KeyDestroyedError:
                    keys = ()
                self._active[slot] = keys[0].version if keys else None
        return self._active[slot]
