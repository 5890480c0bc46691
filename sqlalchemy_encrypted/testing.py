"""Helpers for tests: an in-memory key provider with no KMS behind it.

:class:`InMemoryKeyring` keeps DEKs in process memory only, so values it
sealed become unreadable when the process ends. Use it in unit tests and
examples, never for data you want to keep.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._aead import KEY_SIZES, AeadCipher
from .errors import (
    KeyDestroyedError,
    KeyNotFoundError,
    KeyStateError,
    TenantContextError,
)
from .keys import (
    DEFAULT_KEY_USAGE_LIMIT,
    UNLIMITED_SEALS,
    DataKey,
    KeyLease,
    KeyPurpose,
    LeaseGeneration,
    SealBudget,
    check_key_usage_settings,
    full_key_error,
)

__all__ = ["InMemoryKeyring"]


# Leases of this keyring expire only through its generation counter.
_FOREVER = float("inf")


@dataclass
class _Entry:
    key: DataKey
    state: str
    sealed: int = 0


class InMemoryKeyring:
    """A :class:`~sqlalchemy_encrypted.keys.KeyProvider` that keeps DEKs in memory.

    Supports the same lifecycle as the real keyring in simplified form:
    rotation (the previous version becomes decrypt-only), retirement and
    shredding of a tenant.

    Its leases last until the next rotation, retirement or shred, so column
    types call :meth:`active_key` and :meth:`key_by_id` once per tenant and
    key, not per value. A subclass that injects failures into those two
    methods per call must also override :meth:`active_key_lease` and
    :meth:`key_lease` to return expired leases.

    ``key_usage_limit`` and ``on_key_usage_limit`` work as in
    :class:`~sqlalchemy_encrypted.keyring.Keyring`, with the counts kept in
    memory (:meth:`sealed_count`).
    """

    def __init__(
        self,
        *,
        key_usage_limit: int | None = DEFAULT_KEY_USAGE_LIMIT,
        on_key_usage_limit: Literal["rotate", "raise"] = "rotate",
    ) -> None:
        check_key_usage_settings(key_usage_limit, on_key_usage_limit)
        self.key_usage_limit = key_usage_limit
        self.on_key_usage_limit = on_key_usage_limit
        self._lock = threading.RLock()
        self._by_id: dict[uuid.UUID, _Entry] = {}
        self._versions: dict[tuple[str, KeyPurpose], list[_Entry]] = {}
        self._shredded: set[str] = set()
        # Bumped by rotate, retire and shred; leases never expire otherwise.
        self._generation = LeaseGeneration()
        self._decryptable: dict[tuple[str, KeyPurpose], tuple[int, tuple[DataKey, ...]]] = {}

    def __repr__(self) -> str:
        return f"<InMemoryKeyring with {len(self._by_id)} key(s)>"

    def __reduce__(self) -> str:
        raise TypeError("InMemoryKeyring holds key material and cannot be pickled")

    def _create(self, tenant_id: str, purpose: KeyPurpose, version: int) -> _Entry:
        algorithm = purpose.algorithm
        cipher = AeadCipher(algorithm, os.urandom(KEY_SIZES[algorithm]))
        key_id = uuid.uuid4()
        budget = UNLIMITED_SEALS
        if self.key_usage_limit is not None and purpose is KeyPurpose.RANDOMIZED:
            budget = SealBudget(
                functools.partial(self._reserve, key_id), limit=self.key_usage_limit
            )
        key = DataKey(key_id, tenant_id, purpose, version, cipher, budget)
        entry = _Entry(key, "active")
        self._by_id[key.key_id] = entry
        self._versions.setdefault((tenant_id, purpose), []).append(entry)
        return entry

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        with self._lock:
            if tenant_id in self._shredded:
                raise KeyDestroyedError(
                    f"the keys of tenant {tenant_id!r} were destroyed, "
                    "so writes for it are rejected"
                )
            versions = self._versions.get((tenant_id, purpose))
            if not versions:
                return self._create(tenant_id, purpose, 1).key
            for entry in reversed(versions):
                if entry.state == "active":
                    return entry.key
            raise KeyNotFoundError(f"tenant {tenant_id!r} has no active {purpose.value} key")

    def sealed_count(self, key_id: uuid.UUID) -> int:
        """Return how many seals of the key were reserved (0 for a key that is not counted)."""
        with self._lock:
            entry = self._by_id.get(key_id)
            if entry is None:
                raise KeyNotFoundError(f"key id {key_id} is not in the keyring")
            return entry.sealed

    def _reserve(self, key_id: uuid.UUID, requested: int) -> int:
        limit = self.key_usage_limit
        assert limit is not None
        with self._lock:
            entry = self._by_id[key_id]
            granted = min(requested, limit - entry.sealed)
            if granted > 0:
                entry.sealed += granted
                return granted
            key = entry.key
            if entry.state == "active":
                if self.on_key_usage_limit == "raise":
                    raise full_key_error(key_id, key.tenant_id, key.version, limit, replaced=False)
                self.rotate(key.tenant_id, KeyPurpose.RANDOMIZED)
        raise full_key_error(key_id, key.tenant_id, key.version, limit, replaced=True)

    def active_key_lease(self, tenant_id: str, purpose: KeyPurpose) -> KeyLease:
        stamp = self._generation.value
        return KeyLease(self.active_key(tenant_id, purpose), _FOREVER, self._generation, stamp)

    def key_lease(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> KeyLease:
        stamp = self._generation.value
        key = self.key_by_id(key_id, expected_tenant)
        return KeyLease(key, _FOREVER, self._generation, stamp)

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        with self._lock:
            entry = self._by_id.get(key_id)
        if entry is None:
            raise KeyNotFoundError(f"key id {key_id} is not in the keyring")
        key = entry.key
        if expected_tenant is not None and key.tenant_id != expected_tenant:
            raise TenantContextError(
                f"key id {key_id} belongs to tenant {key.tenant_id!r}, "
                f"but tenant_scope is {expected_tenant!r}"
            )
        if entry.state == "destroyed":
            raise KeyDestroyedError(f"key id {key_id} of tenant {key.tenant_id!r} was destroyed")
        if entry.state == "retired":
            raise KeyNotFoundError(
                f"key id {key_id} of tenant {key.tenant_id!r} (version {key.version}) is retired"
            )
        return key

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> Sequence[DataKey]:
        # Kept until the next rotation, retirement or shred. An empty result
        # is not kept, because the tenant's first write creates its keys.
        cached = self._decryptable.get((tenant_id, purpose))
        if cached is not None and cached[0] == self._generation.value:
            return cached[1]
        stamp = self._generation.value
        with self._lock:
            if tenant_id in self._shredded:
                raise KeyDestroyedError(
                    f"the keys of tenant {tenant_id!r} were destroyed (crypto-shredded): its "
                    "values can no longer be decrypted or searched"
                )
            versions = self._versions.get((tenant_id, purpose), [])
            usable = [e.key for e in versions if e.state in ("active", "decrypt_only")]
        keys = tuple(sorted(usable, key=lambda key: -key.version))
        if keys:
            self._decryptable[(tenant_id, purpose)] = (stamp, keys)
        return keys

    def rotate(self, tenant_id: str, purpose: KeyPurpose | None = None) -> None:
        """Add a new active version for the tenant; the old one becomes decrypt-only.

        Without ``purpose``, the purposes the tenant has keys for are
        rotated, or both when it has none, as ``Keyring.rotate`` does.
        """
        with self._lock:
            if purpose is not None:
                purposes = [purpose]
            else:
                used = [each for each in KeyPurpose if self._versions.get((tenant_id, each))]
                purposes = used or list(KeyPurpose)
            for each in purposes:
                versions = self._versions.get((tenant_id, each), [])
                for entry in versions:
                    if entry.state == "active":
                        entry.state = "decrypt_only"
                self._create(tenant_id, each, len(versions) + 1)
            self._generation.bump()

    def retire(
        self,
        tenant_id: str,
        version: int,
        purpose: KeyPurpose | None = None,
        *,
        min_inactive_seconds: float | None = None,
    ) -> list[DataKey]:
        """Stop decrypting with a decrypt-only version; return the retired keys.

        Follows ``Keyring.retire``: without ``purpose``, a purpose where the
        version is active is skipped. Raises :class:`KeyNotFoundError` if the
        tenant has no such version, and :class:`KeyStateError` if it is
        active for ``purpose``, or for every purpose that has it while none
        is retired yet. ``min_inactive_seconds`` is ignored: a rotation ends
        every lease of this keyring at once, so no writer keeps the old
        version and retiring never has to wait.
        """
        purposes = [purpose] if purpose is not None else list(KeyPurpose)
        with self._lock:
            entries = [
                entry
                for each in purposes
                for entry in self._versions.get((tenant_id, each), [])
                if entry.key.version == version
            ]
            if not entries:
                raise KeyNotFoundError(f"tenant {tenant_id!r} has no key version {version}")
            active = [entry for entry in entries if entry.state == "active"]
            settled = [e for e in entries if e.state in ("decrypt_only", "retired")]
            if active and (purpose is not None or not settled):
                names = " and ".join(entry.key.purpose.value for entry in active)
                raise KeyStateError(
                    f"cannot retire key version {version} of tenant {tenant_id!r}: it is "
                    f"the active {names} version; rotate, re-encrypt, then retire it"
                )
            retired = []
            for entry in entries:
                if entry.state == "decrypt_only":
                    entry.state = "retired"
                    retired.append(entry.key)
            self._generation.bump()
        return retired

    def shred(self, tenant_id: str) -> None:
        """Destroy every key of the tenant, making its values unreadable."""
        with self._lock:
            self._shredded.add(tenant_id)
            for (tenant, _), versions in self._versions.items():
                if tenant == tenant_id:
                    for entry in versions:
                        entry.state = "destroyed"
            self._generation.bump()
