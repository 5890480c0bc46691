"""The interface between column types and whatever holds the DEKs.

Column types ask a :class:`KeyProvider` for "the active DEK of tenant T for
purpose P" to encrypt and for "the DEK with key id K" to decrypt. The real
provider is :class:`sqlalchemy_encrypted.keyring.Keyring`; tests may use
:class:`sqlalchemy_encrypted.testing.InMemoryKeyring`.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from ._aead import AeadCipher
from .envelope import Algorithm
from .errors import ConfigurationError, KeyUsageLimitError

__all__ = [
    "DEFAULT_KEY_USAGE_LIMIT",
    "UNLIMITED_SEALS",
    "DataKey",
    "KeyLease",
    "KeyProvider",
    "KeyPurpose",
    "LeaseGeneration",
    "LeasingKeyProvider",
    "SealBudget",
    "check_key_usage_settings",
    "full_key_error",
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


# Values one randomized DEK may seal by default: AES-GCM with random 96-bit
# nonces keeps the chance of any nonce collision below 2^-32 up to 2^32 values
# per key (NIST SP 800-38D, section 8.3).
DEFAULT_KEY_USAGE_LIMIT = 2**32
# The keyring table stores usage counts in a BIGINT column (signed 64-bit).
MAX_KEY_USAGE_LIMIT = 2**63 - 1

# The number of seals the first reservation requests, and the maximum any
# reservation requests. Blocks double while a process keeps sealing, so a
# busy process writes its usage counter rarely, and a short-lived one leaves
# few reserved seals unused.
_FIRST_BLOCK = 4096
_MAX_BLOCK = 65536


def check_key_usage_settings(limit: object, policy: object) -> None:
    """Raise :class:`ConfigurationError` unless ``limit`` is a valid
    ``key_usage_limit`` (None, or an int from 1 to :data:`MAX_KEY_USAGE_LIMIT`)
    and ``policy`` a valid ``on_key_usage_limit`` ("rotate" or "raise")."""
    if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_KEY_USAGE_LIMIT):
        raise ConfigurationError(
            f"key_usage_limit must be an int from 1 to 2**63 - 1 (the range of the "
            f"sealed_count BIGINT column), or None, not {limit!r}"
        )
    if policy not in ("rotate", "raise"):
        raise ConfigurationError(f"on_key_usage_limit must be 'rotate' or 'raise', not {policy!r}")


def full_key_error(
    key_id: uuid.UUID,
    tenant_id: str,
    version: int,
    limit: int,
    *,
    replaced: bool,
    rotate_hint: str = "",
) -> KeyUsageLimitError:
    """Return the error for a randomized DEK that has sealed ``limit`` values.

    Without ``replaced``, the message requests a rotation, with
    ``rotate_hint`` (for example a command) in brackets.
    """
    where = f"randomized key version {version} of tenant {tenant_id!r} (key id {key_id})"
    if replaced:
        message = f"{where} has sealed its limit of {limit} values; a newer version is now active"
    else:
        hint = f" ({rotate_hint})" if rotate_hint else ""
        message = (
            f"{where} has sealed its limit of {limit} values: rotate the tenant's randomized "
            f"key to keep writing{hint}"
        )
    return KeyUsageLimitError(
        message, tenant_id=tenant_id, key_id=key_id, version=version, replaced=replaced
    )


class SealBudget:
    """How many values a DEK may still seal in this process.

    Every seal takes a ticket, an integer from a counter shared by all
    threads, so no two seals get the same one. Tickets below :attr:`end` are
    covered by reservations the key provider has already recorded, for
    example in the keyring table. A seal whose ticket is not covered calls
    :meth:`cover`, which reserves another block. The recorded usage of a key
    is therefore never lower than the number of values sealed under it, and
    higher by at most the unused part of each process's last block.

    ``reserve(n)`` records up to ``n`` more seals and returns how many it
    recorded (at least 1), or raises
    :class:`~sqlalchemy_encrypted.errors.KeyUsageLimitError` when the key
    has reached its limit. A budget without ``reserve`` is unlimited.
    ``limit``, the key's usage limit, sizes the blocks: the first is at most
    ``limit / 2**20`` and every block at most ``limit / 64`` (and at least
    1), up to 4,096 and 65,536 seals.
    """

    __slots__ = ("_block", "_exhausted", "_lock", "_max_block", "_reserve", "end", "tickets")

    def __init__(self, reserve: Callable[[int], int] | None, *, limit: int | None = None) -> None:
        self._reserve = reserve
        self._lock = threading.Lock()
        self._exhausted: KeyUsageLimitError | None = None
        # Small limits (in tests) get small blocks, so that they are reached
        # exactly; 2^32 gets the full blocks.
        self._block = _FIRST_BLOCK if limit is None else max(1, min(_FIRST_BLOCK, limit >> 20))
        self._max_block = _MAX_BLOCK if limit is None else max(1, min(_MAX_BLOCK, limit >> 6))
        # next() on the iterator is atomic under the GIL, and the cheapest
        # counter a seal can call.
        self.tickets: Iterator[int]
        if reserve is None:
            # Every ticket is 0, and 0 is always covered.
            self.tickets = itertools.repeat(0)
            self.end = 1
        else:
            self.tickets = itertools.count()
            self.end = 0

    def take(self) -> None:
        """Take one ticket, reserving more seals if it is not covered."""
        ticket = next(self.tickets)
        if ticket >= self.end:
            self.cover(ticket)

    def cover(self, ticket: int) -> None:
        """Reserve blocks until ``ticket`` is covered.

        Raises :class:`~sqlalchemy_encrypted.errors.KeyUsageLimitError` once
        the key's limit is reached. After an error with ``replaced`` set,
        every later call raises it again without asking the provider.
        """
        with self._lock:
            while ticket >= self.end:
                exhausted = self._exhausted
                if exhausted is not None:
                    # A new error each time, so that callers' notes and
                    # tracebacks do not pile up on one object.
                    raise exhausted.with_message(str(exhausted))
                assert self._reserve is not None
                try:
                    granted = self._reserve(self._block)
                except KeyUsageLimitError as exc:
                    if exc.replaced:
                        # The provider made a newer version active: every later
                        # seal under this key fails without asking it again.
                        self._exhausted = exc
                    raise
                self.end += granted
                self._block = min(self._block * 2, self._max_block)

    def __repr__(self) -> str:
        if self._reserve is None:
            return "<SealBudget unlimited>"
        return f"<SealBudget covering {self.end} seal(s)>"


# The budget of every key whose provider sets no usage limit.
UNLIMITED_SEALS = SealBudget(None)


class DataKey:
    """An unwrapped DEK with its identity. ``repr`` shows ids only.

    ``budget`` counts the values the key seals; keys of a provider without a
    usage limit share :data:`UNLIMITED_SEALS`.
    """

    __slots__ = ("budget", "cipher", "key_id", "purpose", "tenant_id", "version")

    def __init__(
        self,
        key_id: uuid.UUID,
        tenant_id: str,
        purpose: KeyPurpose,
        version: int,
        cipher: AeadCipher,
        budget: SealBudget = UNLIMITED_SEALS,
    ) -> None:
        self.key_id = key_id
        self.tenant_id = tenant_id
        self.purpose = purpose
        self.version = version
        self.cipher = cipher
        self.budget = budget

    def __repr__(self) -> str:
        return (
            f"<DataKey {self.key_id} tenant={self.tenant_id!r} "
            f"purpose={self.purpose.value} version={self.version}>"
        )

    def __reduce__(self) -> str:
        raise TypeError("DataKey holds key material and cannot be pickled")


@runtime_checkable
class KeyProvider(Protocol):
    """Source of DEKs for the column types.

    Without the lease methods of :class:`LeasingKeyProvider`, a column calls
    :meth:`active_key` for every value it writes and :meth:`key_by_id` for
    every value it reads. :meth:`decryptable_keys` is called at least once
    per execution of a deterministic lookup.
    """

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


class LeaseGeneration:
    """A counter that a key provider bumps whenever a lease it handed out may
    have become stale: on a rotation, retirement, shred or cache eviction.

    Reading :attr:`value` needs no lock. :meth:`bump` takes one, so two
    concurrent bumps never collapse into one increment.
    """

    __slots__ = ("_counter", "_lock", "value")

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self.value = 0

    def bump(self) -> None:
        """Advance :attr:`value`, making every lease stamped with an older value stale."""
        with self._lock:
            self.value = next(self._counter)

    def __repr__(self) -> str:
        return f"<LeaseGeneration {self.value}>"


class KeyLease:
    """A DEK lookup result that stays valid without asking the provider again.

    A lease is current while the provider's clock reads less than
    ``expires_at`` and ``generation`` still has the value it had before the
    lookup. Column types keep one lease per tenant for writing and one per
    stored key id for reading, so they call the provider once per lease
    rather than once per value. A provider that must be asked on every use
    (for example one whose cache is off) returns leases with ``expires_at``
    of ``-inf``.

    A lease does not cover tenant scopes, so a reader checks
    ``key.tenant_id`` against its scope on every use.
    """

    __slots__ = ("clock", "expires_at", "generation", "key", "stamp")

    def __init__(
        self,
        key: DataKey,
        expires_at: float,
        generation: LeaseGeneration,
        stamp: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.expires_at = expires_at
        self.generation = generation
        self.stamp = stamp
        self.clock = clock

    def is_current(self) -> bool:
        """Return True while the lease may be used in place of a new lookup."""
        return self.generation.value == self.stamp and self.clock() < self.expires_at

    def __repr__(self) -> str:
        return f"<KeyLease of {self.key!r}>"

    def __reduce__(self) -> str:
        raise TypeError("KeyLease contains key material and cannot be pickled")


@runtime_checkable
class LeasingKeyProvider(KeyProvider, Protocol):
    """A key provider that also hands out :class:`KeyLease` objects.

    Column types use each of these two methods when the provider has it,
    and fall back to :meth:`KeyProvider.active_key` or
    :meth:`KeyProvider.key_by_id` per value otherwise. Both methods raise
    exactly what their per-value counterparts raise. Read the stamp of a
    new lease from its :class:`LeaseGeneration` before the lookup, so that a
    bump during the lookup makes the lease stale.
    """

    def active_key_lease(self, tenant_id: str, purpose: KeyPurpose) -> KeyLease:
        """Return a lease on :meth:`active_key` for ``tenant_id`` and ``purpose``."""
        ...

    def key_lease(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> KeyLease:
        """Return a lease on :meth:`key_by_id` for ``key_id``."""
        ...


_default_provider: KeyProvider | None = None


# The state objects of every encrypted column type, whose plans contain DEKs.
# They forget all plans when the default provider changes, and expired ones
# when Keyring.purge_expired() runs.
_column_states: weakref.WeakSet[Any] = weakref.WeakSet()
# Taken to add to the set and to copy it, because iterating a WeakSet while
# another thread adds to it raises RuntimeError.
_column_states_lock = threading.Lock()


def register_column_state(state: Any) -> None:
    with _column_states_lock:
        _column_states.add(state)


def column_states() -> list[Any]:
    """Return the state objects of the live encrypted column types."""
    with _column_states_lock:
        return list(_column_states)


def set_default_key_provider(provider: KeyProvider | None) -> None:
    """Make ``provider`` the key source of every encrypted column that names none."""
    global _default_provider
    _default_provider = provider
    for state in column_states():
        state.forget_plans()


def get_default_key_provider() -> KeyProvider:
    """Return the default key provider, or raise :class:`ConfigurationError` if none is set."""
    if _default_provider is None:
        raise ConfigurationError(
            "no keyring is configured: create a Keyring (or an InMemoryKeyring in tests) "
            "and make it the default, or pass keyring= to the column type"
        )
    return _default_provider
