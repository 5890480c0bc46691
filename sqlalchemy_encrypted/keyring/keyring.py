"""The keyring: per-tenant DEKs stored wrapped in a table, unwrapped through a KMS.

:class:`Keyring` is the key provider the column types use. It finds the
active DEK of a tenant and purpose (creating it on the tenant's first
write) and finds a DEK by the key id stored in a value. Unwrapped DEKs stay
in a bounded TTL cache, so a read of many rows unwraps each DEK once.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import shlex
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import sqlalchemy as sa

from .. import keys as _keys
from .._aead import KEY_SIZES, AeadCipher
from ..errors import (
    ConfigurationError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyringIntegrityError,
    KeyStateError,
    KeyUsageLimitError,
    KmsError,
    KmsKeyNotFoundError,
    TenantContextError,
)
from ..keys import (
    DEFAULT_KEY_USAGE_LIMIT,
    UNLIMITED_SEALS,
    DataKey,
    KeyLease,
    KeyPurpose,
    LeaseGeneration,
    SealBudget,
    check_key_usage_settings,
    full_key_error,
    set_default_key_provider,
)
from ..kms.base import GeneratedDataKey, KmsProvider, WrapContext
from . import lifecycle
from .audit import audit_event, row_fields
from .cache import TtlCache
from .check import key_check_matches, key_check_value
from .schema import TENANT_ID_LENGTH, KeyState, keyring_table
from .store import KeyInfo, KeyRow, KeyStore, utcnow

__all__ = ["Keyring"]

logger = logging.getLogger("sqlalchemy_encrypted.keyring")

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DECRYPTABLE_STATES = (KeyState.ACTIVE, KeyState.PENDING, KeyState.DECRYPT_ONLY)
_ENDED_STATES = (KeyState.RETIRED, KeyState.DESTROYED)
# The number of keyring rows whose KEKs are compared with this keyring's
# providers before it creates a tenant's first key.
_KEK_SAMPLE_SIZE = 50
# The minimum number of usage budgets a keyring keeps, whatever its cache
# size, because each one dropped wastes the rest of its key's reserved block
# (up to 65,536 seals).
_MIN_BUDGETS = 10_000

# Expiry of a lease that must not be reused, because the caching it depends on is off.
_EXPIRED = float("-inf")


def _shredded_search(tenant: str) -> str:
    return (
        f"the keys of tenant {tenant!r} were destroyed (crypto-shredded): its values can no "
        "longer be decrypted or searched"
    )


class _StaleRow(Exception):
    """A cached keyring row whose key was retired or destroyed since it was read."""


def _check_tenant(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not tenant_id:
        raise TenantContextError(
            f"invalid tenant id of type {type(tenant_id).__name__}: a tenant id is a non-empty str"
        )
    if len(tenant_id) > TENANT_ID_LENGTH:
        raise TenantContextError(
            f"invalid tenant id {tenant_id[:40]!r}...: it has {len(tenant_id)} characters, "
            f"but the keyring table stores at most {TENANT_ID_LENGTH}"
        )
    return tenant_id


def _engine_error(engine: object) -> str:
    if isinstance(getattr(engine, "sync_engine", None), sa.Engine):
        # AsyncEngine and AsyncConnection: the keyring's code is synchronous.
        return (
            f"Keyring needs a sync Engine, not an {type(engine).__name__}: pass "
            "async_engine.sync_engine, or a separate engine from sqlalchemy.create_engine() "
            "on the same database. On a DEK cache miss, the keyring query and the KMS call "
            "then run in the event loop thread; see 'Async applications' in "
            "docs/getting-started.md"
        )
    return f"Keyring needs a sqlalchemy Engine for its keyring table, not {type(engine).__name__}"


class Keyring:
    """Per-tenant DEKs in a keyring table, wrapped by KEKs of a KMS provider.

    :param engine: the database holding the keyring table; it may differ
        from the database holding the encrypted data. It must be a sync
        ``Engine``; with ``create_async_engine``, pass its ``sync_engine`` or
        a separate sync engine.
    :param kms: the provider whose KEK wraps new DEKs.
    :param previous_kms: further providers used only to unwrap DEKs whose
        rows name their KEKs, for example the local KMS after moving new
        keys to AWS KMS.
    :param cache_ttl: seconds an unwrapped DEK stays cached; 0 disables the
        cache. This is also how long a process keeps using a DEK after its
        KEK was revoked or its tenant was shredded by another process.
    :param cache_size: maximum number of cached DEKs; it also bounds the
        two caches of table lookups and the keyring's own lease copies.
    :param active_key_ttl: seconds a "which key is active" lookup is
        cached. A rotated key stays pending at least this long before it
        becomes active, so every process has loaded it before any process
        encrypts with it.
    :param set_default: make this keyring the key provider of every
        encrypted column that names none.
    :param key_usage_limit: values a randomized (AES-GCM) DEK may seal, counted
        across processes in the keyring table's ``sealed_count`` column;
        None turns counting off. Deterministic (AES-SIV) keys use no nonce
        and are not counted.
    :param on_key_usage_limit: ``"rotate"`` makes a new randomized version
        active at once when a key reaches the limit, and the value is sealed
        under it; ``"raise"`` raises :class:`KeyUsageLimitError` instead.
    :param clock: monotonic clock for the cache TTLs (injectable for tests).
    :param wall_clock: source of the UTC timestamps stored in the table.
    """

    def __init__(
        self,
        engine: sa.Engine,
        kms: KmsProvider,
        *,
        table_name: str = "encryption_keys",
        schema: str | None = None,
        cache_ttl: float = 300.0,
        cache_size: int = 1000,
        active_key_ttl: float = 60.0,
        set_default: bool = True,
        previous_kms: Sequence[KmsProvider] = (),
        key_usage_limit: int | None = DEFAULT_KEY_USAGE_LIMIT,
        on_key_usage_limit: Literal["rotate", "raise"] = "rotate",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        if not isinstance(engine, sa.Engine):
            raise ConfigurationError(_engine_error(engine))
        for provider in (kms, *previous_kms):
            if not isinstance(provider, KmsProvider):
                raise ConfigurationError(
                    f"{type(provider).__name__} is not a KMS provider: pass a LocalKms, an "
                    "AwsKms or another KmsProvider subclass"
                )
        if not _TABLE_NAME.match(table_name):
            raise ConfigurationError(
                f"invalid keyring table name {table_name!r}: use letters, digits and '_'"
            )
        if cache_ttl < 0 or active_key_ttl < 0:
            raise ConfigurationError("cache_ttl and active_key_ttl must be 0 or more seconds")
        if cache_size < 1:
            raise ConfigurationError("cache_size must be at least 1")
        check_key_usage_settings(key_usage_limit, on_key_usage_limit)
        self.key_usage_limit = key_usage_limit
        self.on_key_usage_limit = on_key_usage_limit
        # key id -> the usage budget of that randomized DEK in this process. It
        # outlives the cached DEK, so an unwrap after the TTL or an eviction
        # keeps the seals this process already reserved. Least recently
        # unwrapped first.
        self._budgets: OrderedDict[uuid.UUID, SealBudget] = OrderedDict()
        self._max_budgets = max(4 * cache_size, _MIN_BUDGETS)
        self._budgets_lock = threading.Lock()
        # key id -> seals handed out while a SQLite keyring file was locked by
        # the application's own transaction, not yet added to the table.
        self._unrecorded: dict[uuid.UUID, int] = {}
        # Keys whose key.usage_limit_reached event this process has logged.
        self._limit_reported: set[uuid.UUID] = set()
        self.engine = engine
        self.metadata = sa.MetaData()
        self.table = keyring_table(self.metadata, table_name, schema)
        self.active_key_ttl = active_key_ttl
        self._store = KeyStore(engine, self.table)
        self._wall_clock = wall_clock
        self._providers_lock = threading.Lock()
        self._kms = kms
        self._providers: list[KmsProvider] = [kms, *previous_kms]
        # Set once a first key's creation found a KEK of this keyring in the table.
        self._kms_matches_table = False
        # Bumped by the three caches below whenever an entry leaves early,
        # so that every lease this keyring handed out goes stale.
        self._lease_generation = LeaseGeneration()
        self.cache: TtlCache[uuid.UUID, DataKey] = TtlCache(
            cache_size, cache_ttl, clock, name="DEK cache", removals=self._lease_generation
        )
        self._active: TtlCache[tuple[str, KeyPurpose], KeyRow] = TtlCache(
            cache_size,
            active_key_ttl,
            clock,
            name="active key lookups",
            removals=self._lease_generation,
        )
        self._decryptable: TtlCache[tuple[str, KeyPurpose], tuple[KeyRow, ...]] = TtlCache(
            cache_size,
            active_key_ttl,
            clock,
            name="decryptable key lookups",
            removals=self._lease_generation,
        )
        # The current leases, read without locks: (tenant, purpose) -> lease
        # on the active DEK, and key id (as an int) -> lease on that DEK.
        self._clock = clock
        self._active_leases: dict[tuple[str, str], KeyLease] = {}
        self._id_leases: dict[int, KeyLease] = {}
        # (tenant, purpose) -> (expiry, generation stamp, decryptable DEKs).
        self._decryptable_leases: dict[tuple[str, str], tuple[float, int, tuple[DataKey, ...]]] = {}
        if set_default:
            set_default_key_provider(self)

    def __repr__(self) -> str:
        return f"<Keyring table={self.table.fullname} kms={self._kms!r}>"

    def __reduce__(self) -> str:
        raise TypeError("Keyring holds key material and cannot be pickled")

    # -- configuration --------------------------------------------------------

    @property
    def kms(self) -> KmsProvider:
        """The provider whose KEK wraps new DEKs."""
        return self._kms

    @property
    def providers(self) -> list[KmsProvider]:
        """Every provider that may unwrap, :attr:`kms` first."""
        with self._providers_lock:
            return list(self._providers)

    def _use_provider(self, provider: KmsProvider, *, for_new_keys: bool) -> None:
        with self._providers_lock:
            if provider not in self._providers:
                self._providers.insert(0, provider)
            if for_new_keys:
                self._kms = provider
                self._providers.remove(provider)
                self._providers.insert(0, provider)

    def create_table(self) -> None:
        """Create the keyring table and its indexes if they do not exist."""
        with self._store.begin() as conn:
            self.metadata.create_all(conn, tables=[self.table], checkfirst=True)

    def _now(self) -> datetime.datetime:
        return self._wall_clock()

    # -- KMS calls ------------------------------------------------------------

    def _provider_for(self, row: KeyRow) -> KmsProvider:
        providers = self.providers
        for provider in providers:
            if provider.can_unwrap(row.kms_provider, row.kek_id):
                return provider
        for provider in providers:
            # Same kind of KMS without this KEK: its unwrap raises the most
            # specific error (for example a local key file missing a KEK name).
            if provider.provider_name == row.kms_provider:
                return provider
        raise KmsKeyNotFoundError(
            f"{row.kms_provider} KEK {row.kek_id}, which wrapped the DEK of {row.describe()}, "
            "was not found in any configured KMS provider: pass a provider that has it to "
            "Keyring(previous_kms=...), or --previous-kms on the command line"
        )

    def _kms_failed(self, operation: str, exc: KmsError, **fields: object) -> None:
        audit_event(
            "kms.failed", logging.WARNING, operation=operation, error=type(exc).__name__, **fields
        )

    def _unwrap_with(
        self, provider: KmsProvider, row: KeyRow, wrapped: bytes, kek_id: str
    ) -> bytes:
        self.cache.record_kms_call()
        try:
            return provider.unwrap(wrapped, row.context, kek_id)
        except KmsError as exc:
            self._kms_failed("unwrap", exc, **{**row_fields(row), "kek": kek_id})
            raise

    def _generate(self, context: WrapContext) -> GeneratedDataKey:
        kms = self._kms
        self.cache.record_kms_call()
        try:
            generated = kms.generate_data_key(KEY_SIZES[context.purpose.algorithm], context)
        except KmsError as exc:
            self._kms_failed(
                "generate_data_key",
                exc,
                tenant=context.tenant_id,
                key_id=str(context.key_id),
                purpose=context.purpose.value,
                version=context.version,
                kek=kms.kek_id,
            )
            raise
        return generated

    def _verified_cipher(self, row: KeyRow, dek: bytes) -> AeadCipher:
        algorithm = row.purpose.algorithm
        if len(dek) != KEY_SIZES[algorithm] or not key_check_matches(
            dek, row.key_id, row.purpose, row.key_check
        ):
            audit_event("key.check_failed", logging.ERROR, **row_fields(row))
            raise KeyringIntegrityError(
                f"the DEK of {row.describe()} does not match its keyring row's key check "
                f"value (KEK {row.kek_id}): the row may have been restored from another "
                "environment or edited; restore the matching keyring row from a backup"
            )
        return AeadCipher(algorithm, dek)

    def _unwrap_row(self, row: KeyRow) -> DataKey:
        if row.wrapped_dek is None:
            raise KeyDestroyedError(
                f"the DEK of {row.describe()} was destroyed; its values cannot be decrypted"
            )
        provider = self._provider_for(row)
        dek = self._unwrap_with(provider, row, row.wrapped_dek, row.kek_id)
        cipher = self._verified_cipher(row, dek)
        return DataKey(
            row.key_id, row.tenant_id, row.purpose, row.version, cipher, self._budget_for(row)
        )

    # -- usage limit ------------------------------------------------------------

    def _budget_for(self, row: KeyRow) -> SealBudget:
        limit = self.key_usage_limit
        if limit is None or row.purpose is not KeyPurpose.RANDOMIZED:
            return UNLIMITED_SEALS
        with self._budgets_lock:
            budget = self._budgets.get(row.key_id)
            if budget is not None:
                self._budgets.move_to_end(row.key_id)
            else:
                if len(self._budgets) >= self._max_budgets:
                    # The dropped budget's unused seals stay counted in the
                    # table, and its key reserves a new block when it seals again.
                    self._budgets.popitem(last=False)
                reserve = functools.partial(
                    self._reserve_seals, row.key_id, row.tenant_id, row.version
                )
                budget = SealBudget(reserve, limit=limit)
                self._budgets[row.key_id] = budget
            return budget

    def _reserve_seals(self, key_id: uuid.UUID, tenant: str, version: int, requested: int) -> int:
        """Record up to ``requested`` more seals of a randomized DEK; see :class:`SealBudget`."""
        limit = self.key_usage_limit
        assert limit is not None
        try:
            self._record_unrecorded()
            granted, state = self._store.reserve_seals(key_id, requested, limit)
        except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
            if self._sqlite_locked(exc):
                return self._reserve_unrecorded(key_id, tenant, version, requested)
            raise self._usage_counter_error(exc, tenant, version) from None
        where = f"randomized key version {version} of tenant {tenant!r} (key id {key_id})"
        if state is KeyState.DESTROYED:
            # Another process shredded the tenant while this one held the DEK.
            self._invalidate_tenant(tenant, drop_deks=True)
            raise KeyDestroyedError(
                f"the DEK of {where} was destroyed (the tenant was crypto-shredded): writes "
                "for this tenant are refused"
            )
        if state is KeyState.RETIRED:
            self._invalidate_tenant(tenant)
            raise KeyUsageLimitError(
                f"{where} was retired by another process and seals no more values; a "
                "newer version is active",
                tenant_id=tenant,
                key_id=key_id,
                version=version,
                replaced=True,
            )
        if granted > 0:
            logger.debug(
                "reserved %d seal(s) of randomized key version %d of tenant %r",
                granted,
                version,
                tenant,
            )
            return granted
        return self._usage_limit_reached(key_id, tenant, version)

    def _sqlite_locked(self, exc: sa.exc.DBAPIError) -> bool:
        return self.engine.dialect.name == "sqlite" and "locked" in str(exc.orig)

    def _reserve_unrecorded(
        self, key_id: uuid.UUID, tenant: str, version: int, requested: int
    ) -> int:
        """Hand out seals while the SQLite keyring file is locked, to be added
        to the table by the next reservation or purge_expired() that can write.

        Only the application's own open transaction on the same file holds the
        lock for long, and refusing to seal would fail every write of such
        an application. The seals stay within the limit as far as the table
        and this process know. Seals of a process that ends before they are
        added are not counted.
        """
        limit = self.key_usage_limit
        assert limit is not None
        with self._budgets_lock:
            try:
                used = self._store.sealed_count(key_id)
            except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
                raise self._usage_counter_error(exc, tenant, version) from None
            owed = self._unrecorded.get(key_id, 0)
            granted = min(requested, limit - (used or 0) - owed)
            if granted > 0:
                if not owed:
                    logger.warning(
                        "the SQLite keyring file is locked by an open transaction; the "
                        "values sealed under randomized key version %d of tenant %r are "
                        "added to its usage counter later (a keyring in its own database "
                        "file avoids this)",
                        version,
                        tenant,
                    )
                self._unrecorded[key_id] = owed + granted
                return granted
        return self._usage_limit_reached(key_id, tenant, version)

    def _record_unrecorded(self) -> None:
        """Add the seals handed out while the keyring file was locked to the table."""
        if not self._unrecorded:
            return
        with self._budgets_lock:
            for key_id, count in list(self._unrecorded.items()):
                self._store.add_seals(key_id, count)
                del self._unrecorded[key_id]

    def _usage_counter_error(self, exc: sa.exc.DBAPIError, tenant: str, version: int) -> Exception:
        where = f"randomized key version {version} of tenant {tenant!r}"
        if not self._store.has_usage_column():
            return ConfigurationError(
                f"keyring table {self.table.fullname} has no sealed_count column, which "
                f"counts the values each randomized DEK seals (while sealing under {where}): "
                "add it with op.add_keyring_usage_column() from alembic_ext in a migration, "
                "or pass key_usage_limit=None to Keyring (--key-usage-limit none on the "
                "command line) to stop counting"
            )
        if self.engine.dialect.name == "sqlite" and "locked" in str(exc.orig):
            return ConfigurationError(
                f"could not count the values sealed under {where}: the SQLite database of "
                f"the keyring is locked ({exc.orig}). SQLite allows one writer, so a "
                "transaction that already wrote to the same database file blocks the "
                "keyring; keep the keyring in a separate database, or pass "
                "key_usage_limit=None"
            )
        return exc

    def _usage_limit_reached(self, key_id: uuid.UUID, tenant: str, version: int) -> int:
        """Apply ``on_key_usage_limit`` to a key that has reached its limit; always raises."""
        limit = self.key_usage_limit
        assert limit is not None
        if key_id not in self._limit_reported:
            # Once per key and process: with "raise", every later write gets here.
            self._limit_reported.add(key_id)
            audit_event(
                "key.usage_limit_reached",
                logging.WARNING,
                tenant=tenant,
                key_id=str(key_id),
                purpose=KeyPurpose.RANDOMIZED.value,
                version=version,
                limit=limit,
            )

        rows = self._store.tenant_rows(tenant)
        current = next((row for row in rows if row.key_id == key_id), None)
        replaced = current is not None and current.state is not KeyState.ACTIVE
        # An operator's rotation waits as a pending version for active_key_ttl.
        # A full randomized key need not wait: only deterministic lookups do.
        pending = any(
            row.purpose is KeyPurpose.RANDOMIZED and row.state is KeyState.PENDING for row in rows
        )
        if not replaced and not pending and self.on_key_usage_limit == "raise":
            command = (
                f"sqlalchemy-encrypted keys rotate {shlex.quote(tenant)} "
                "--purpose randomized --activate-now"
            )
            raise full_key_error(
                key_id, tenant, version, limit, replaced=False, rotate_hint=command
            )

        if replaced:
            # Another process, or an operator, made a newer version active.
            self._invalidate_tenant(tenant)
        else:
            self._replace_full_key(key_id, tenant, version, limit)
        raise full_key_error(key_id, tenant, version, limit, replaced=True)

    def _replace_full_key(self, key_id: uuid.UUID, tenant: str, version: int, limit: int) -> None:
        """Make a newer randomized version of ``tenant`` active, unless another
        process has just done so."""
        try:
            lifecycle.rotate(
                self, tenant, KeyPurpose.RANDOMIZED, activate_now=True, replacing=key_id
            )
        except KeyStateError:
            # Another process rotated at the same moment, or replaced the key
            # between the read of the rows and the rotation.
            self._invalidate_tenant(tenant)
        except sa.exc.OperationalError as exc:
            if not self._sqlite_locked(exc):
                raise
            raise ConfigurationError(
                f"randomized key version {version} of tenant {tenant!r} (key id {key_id}) has "
                f"sealed its limit of {limit} values, and no newer version can be made "
                f"active: the SQLite database of the keyring is locked ({exc.orig}) by a "
                "transaction that already wrote to the same file; keep the keyring in a "
                "separate database, or rotate the tenant's randomized key before that "
                "transaction"
            ) from None

    def _data_key(self, row: KeyRow, *, fresh: bool = False) -> DataKey:
        """Return the DEK of ``row`` from the cache, or unwrap it.

        The row is read again before unwrapping (see :meth:`_current_row`),
        unless ``fresh`` is true because ``row`` was just read from the table.
        """
        if not fresh:
            return self.cache.get_or_load(
                row.key_id, lambda: self._unwrap_row(self._current_row(row))
            )
        try:
            return self.cache.get_or_load(row.key_id, lambda: self._unwrap_row(row))
        except _StaleRow:
            # This thread waited for another thread's load of the key, which
            # found the key retired or destroyed since ``row`` was read.
            current = self._store.get(row.key_id)
            if current is None:
                raise self._missing_key_error(row.key_id) from None
            if current.state in _ENDED_STATES:
                raise self._ended_key_error(current) from None
            # Reinstated meanwhile: load it from the row as it is now.
            return self.cache.get_or_load(row.key_id, lambda: self._unwrap_row(current))

    def _current_row(self, row: KeyRow) -> KeyRow:
        """Return ``row`` as the keyring table has it now.

        The lookups of the active and the decryptable keys cache rows for
        ``active_key_ttl``, which can outlast the cached DEK. Unwrapping from
        such a row after another process shredded or retired the key would
        keep the DEK for another ``cache_ttl``. For such a key this drops the
        tenant's cached lookups and raises :class:`_StaleRow`.
        """
        current = self._store.get(row.key_id)
        if current is not None and current.state not in _ENDED_STATES:
            return current
        self._active.invalidate((row.tenant_id, row.purpose))
        self._decryptable.invalidate((row.tenant_id, row.purpose))
        raise _StaleRow(row.key_id)

    # -- KeyProvider ----------------------------------------------------------

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        """Return the DEK new values of ``tenant_id`` are sealed with.

        Creates the tenant's first DEK for ``purpose`` if it has none. When
        two processes race to create it, the database keeps one and the
        loser uses the winner's key. Raises :class:`KeyDestroyedError` for a
        shredded tenant.
        """
        return self.active_key_lease(tenant_id, purpose).key

    def active_key_lease(self, tenant_id: str, purpose: KeyPurpose) -> KeyLease:
        """Return a lease on :meth:`active_key`.

        The lease expires with the earlier of the cached "which key is
        active" lookup (``active_key_ttl``) and the cached DEK
        (``cache_ttl``). It goes stale as soon as either cache drops an
        entry early: on a rotation, retirement or shred in this process, or
        on an eviction.
        """
        if type(tenant_id) is str:
            lease = self._active_leases.get((tenant_id, purpose))
            if lease is not None and lease.is_current():
                self.cache.record_hit()
                return lease
        tenant = _check_tenant(tenant_id)
        purpose = KeyPurpose(purpose)
        # Read before the lookups: an invalidation during them makes the lease stale.
        stamp = self._lease_generation.value
        row = self._active.get_or_load(
            (tenant, purpose), lambda: self._find_or_create_active(tenant, purpose)
        )
        try:
            key = self._data_key(row)
        except _StaleRow:
            # Looked up again: a shredded tenant raises KeyDestroyedError here.
            row = self._active.get_or_load(
                (tenant, purpose), lambda: self._find_or_create_active(tenant, purpose)
            )
            key = self._data_key(row, fresh=True)
        row_expiry = self._active.expires_at((tenant, purpose))
        key_expiry = self.cache.expires_at(row.key_id)
        expires_at = _EXPIRED
        if row_expiry is not None and key_expiry is not None:
            expires_at = min(row_expiry, key_expiry)
        lease = KeyLease(key, expires_at, self._lease_generation, stamp, self._clock)
        if expires_at != _EXPIRED:
            if len(self._active_leases) >= self.cache.max_entries:
                self._active_leases.clear()
            self._active_leases[(tenant, purpose)] = lease
        return lease

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        """Return the DEK with ``key_id``.

        With ``expected_tenant``, a key of another tenant raises
        :class:`TenantContextError` before any KMS call.
        """
        return self.key_lease(key_id, expected_tenant).key

    def key_lease(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> KeyLease:
        """Return a lease on :meth:`key_by_id`, expiring with the cached DEK.

        The tenant check against ``expected_tenant`` runs on every call,
        also when the lease comes from this keyring's own copy.
        """
        lease = self._id_leases.get(key_id.int)
        if lease is not None and lease.is_current():
            if expected_tenant is not None and lease.key.tenant_id != expected_tenant:
                self._check_expected_tenant(key_id, lease.key.tenant_id, expected_tenant)
            self.cache.record_hit()
            return lease
        stamp = self._lease_generation.value
        cached = self.cache.get(key_id)
        if cached is not None:
            self._check_expected_tenant(key_id, cached.tenant_id, expected_tenant)
            return self._lease_by_id(cached, stamp)
        row = self._store.get(key_id)
        if row is None:
            raise self._missing_key_error(key_id)
        self._check_expected_tenant(key_id, row.tenant_id, expected_tenant)
        if row.state in _ENDED_STATES:
            raise self._ended_key_error(row)
        return self._lease_by_id(self._data_key(row, fresh=True), stamp)

    def _missing_key_error(self, key_id: uuid.UUID) -> KeyNotFoundError:
        return KeyNotFoundError(
            f"key id {key_id} is not in keyring table {self.table.fullname}: the value was "
            "sealed with a key of another keyring, or its keyring row was deleted"
        )

    @staticmethod
    def _ended_key_error(row: KeyRow) -> KeyNotFoundError:
        """Return the error for using the DEK of a destroyed or retired ``row``."""
        if row.state is KeyState.DESTROYED:
            return KeyDestroyedError(
                f"the DEK of {row.describe()} was destroyed (the tenant was crypto-shredded): "
                f"values of tenant {row.tenant_id!r} under it cannot be decrypted"
            )
        return KeyNotFoundError(
            f"the DEK of {row.describe()} is retired and no longer decrypts values; if "
            "values still need it (for example data restored from a backup), reinstate "
            f"it with keyring.reinstate({row.tenant_id!r}, {row.version}) or "
            f"'sqlalchemy-encrypted keys reinstate {shlex.quote(row.tenant_id)} "
            f"{row.version}', then re-encrypt"
        )

    def _lease_by_id(self, key: DataKey, stamp: int) -> KeyLease:
        expiry = self.cache.expires_at(key.key_id)
        lease = KeyLease(
            key, _EXPIRED if expiry is None else expiry, self._lease_generation, stamp, self._clock
        )
        if expiry is not None:
            if len(self._id_leases) >= self.cache.max_entries:
                self._id_leases.clear()
            self._id_leases[key.key_id.int] = lease
        return lease

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> Sequence[DataKey]:
        """Return the tenant's active, pending and decrypt-only DEKs, active first.

        Raises :class:`KeyDestroyedError` for a crypto-shredded tenant, so that
        a lookup of its values fails as reading them does, instead of
        finding no row.
        """
        if type(tenant_id) is str:
            # Every deterministic lookup calls this when it executes, so the
            # last result is kept like a lease: until one of the cache
            # entries it came from expires or any entry leaves early.
            hot = self._decryptable_leases.get((tenant_id, purpose))
            if (
                hot is not None
                and hot[1] == self._lease_generation.value
                and self._clock() < hot[0]
            ):
                return hot[2]
        tenant = _check_tenant(tenant_id)
        purpose = KeyPurpose(purpose)
        cache_key = (tenant, purpose)
        stamp = self._lease_generation.value
        rows = self._decryptable.get(cache_key)
        # Rows read from the table just now need no second read before an unwrap.
        fresh = rows is None
        if rows is None:
            rows = self._load_decryptable(tenant, purpose)
            # An empty result is not cached, because another process may create
            # the tenant's first key at any moment and it is active at once.
            if rows:
                self._decryptable.put(cache_key, rows)
        try:
            keys = tuple(self._data_key(row, fresh=fresh) for row in rows)
        except _StaleRow:
            rows = self._load_decryptable(tenant, purpose)
            if rows:
                self._decryptable.put(cache_key, rows)
            keys = tuple(self._data_key(row, fresh=True) for row in rows)
        expiries = [self._decryptable.expires_at(cache_key)]
        expiries.extend(self.cache.expires_at(row.key_id) for row in rows)
        if keys and None not in expiries:
            if len(self._decryptable_leases) >= self.cache.max_entries:
                self._decryptable_leases.clear()
            self._decryptable_leases[cache_key] = (
                min(e for e in expiries if e is not None),
                stamp,
                keys,
            )
        return keys

    @staticmethod
    def _check_expected_tenant(key_id: uuid.UUID, owner: str, expected: str | None) -> None:
        if expected is not None and owner != expected:
            raise TenantContextError(
                f"key id {key_id} belongs to tenant {owner!r}, but tenant_scope is {expected!r}: "
                "a tenant cannot read another tenant's values"
            )

    def _load_decryptable(self, tenant: str, purpose: KeyPurpose) -> tuple[KeyRow, ...]:
        tenant_rows = self._store.tenant_rows(tenant)
        if any(row.state is KeyState.DESTROYED for row in tenant_rows):
            raise KeyDestroyedError(_shredded_search(tenant))
        rows = [
            row
            for row in tenant_rows
            if row.purpose is purpose and row.state in _DECRYPTABLE_STATES
        ]
        rows.sort(key=lambda row: (row.state is not KeyState.ACTIVE, -row.version))
        return tuple(rows)

    # -- the active key -------------------------------------------------------

    def _find_or_create_active(self, tenant: str, purpose: KeyPurpose) -> KeyRow:
        rows = self._store.tenant_rows(tenant)
        self._refuse_destroyed(tenant, rows)
        mine = [row for row in rows if row.purpose is purpose]
        if lifecycle.promote_due(self, mine):
            mine = [row for row in self._store.tenant_rows(tenant) if row.purpose is purpose]
        active = next((row for row in mine if row.state is KeyState.ACTIVE), None)
        if active is not None:
            return active
        if mine:
            states = ", ".join(f"version {row.version} {row.state.value}" for row in mine)
            raise KeyStateError(
                f"tenant {tenant!r} has no active {purpose.value} key ({states}): rotate the "
                "tenant's keys to create one"
            )
        return self._create_first_key(tenant, purpose)

    @staticmethod
    def _refuse_destroyed(tenant: str, rows: Sequence[KeyRow]) -> None:
        if any(row.state is KeyState.DESTROYED for row in rows):
            raise KeyDestroyedError(
                f"the keys of tenant {tenant!r} were destroyed (crypto-shredded): writes for "
                "this tenant are refused"
            )

    def _new_row(
        self, context: WrapContext, generated: GeneratedDataKey, state: KeyState
    ) -> KeyRow:
        now = self._now()
        return KeyRow(
            key_id=context.key_id,
            tenant_id=context.tenant_id,
            purpose=context.purpose,
            version=context.version,
            state=state,
            wrapped_dek=generated.wrapped,
            kms_provider=self._kms.provider_name,
            kek_id=self._kms.kek_id,
            key_check=key_check_value(generated.plaintext, context.key_id, context.purpose),
            created_at=now,
            activated_at=now if state is KeyState.ACTIVE else None,
            retired_at=None,
            destroyed_at=None,
            rewrapped_at=None,
            row_version=1,
        )

    def _cache_new_key(self, row: KeyRow, generated: GeneratedDataKey) -> None:
        cipher = AeadCipher(row.purpose.algorithm, generated.plaintext)
        key = DataKey(
            row.key_id, row.tenant_id, row.purpose, row.version, cipher, self._budget_for(row)
        )
        self.cache.put(row.key_id, key)

    def _check_kms_matches_table(self, tenant: str, purpose: KeyPurpose) -> None:
        """Raise unless this keyring's providers have a KEK the table's keys use.

        A process configured for another environment (another key file, for
        example) would otherwise wrap a new tenant's first DEK with a KEK that
        the other processes reading that tenant's values do not have. The
        check reads a sample of the table once per keyring object.

        NOTE: ``AwsKms.can_unwrap`` accepts every key ARN, so an AWS KMS key of
        another account or environment passes this check.
        """
        if self._kms_matches_table:
            return
        keks = self._store.sample_keks(_KEK_SAMPLE_SIZE)
        providers = self.providers
        if not keks or any(
            provider.can_unwrap(name, kek_id) for name, kek_id in keks for provider in providers
        ):
            self._kms_matches_table = True
            return
        found = ", ".join(sorted({kek_id for _, kek_id in keks}))
        raise ConfigurationError(
            f"cannot create the first {purpose.value} key of tenant {tenant!r}: the keys in "
            f"keyring table {self.table.fullname} are wrapped by KEK {found}, which none of "
            "this keyring's KMS providers has, so the KMS configuration may belong to another "
            "environment; configure the KMS the application uses (previous_kms=, or "
            "--previous-kms on the command line, adds a KEK that only unwraps)"
        )

    def _create_first_key(self, tenant: str, purpose: KeyPurpose) -> KeyRow:
        self._check_kms_matches_table(tenant, purpose)
        context = WrapContext(uuid.uuid4(), tenant, purpose, 1)
        generated = self._generate(context)
        row = self._new_row(context, generated, KeyState.ACTIVE)
        try:
            with self._store.begin() as conn:
                self._store.insert(conn, row)
        except sa.exc.OperationalError as exc:
            if self.engine.dialect.name != "sqlite" or "locked" not in str(exc.orig):
                raise
            raise ConfigurationError(
                f"could not create the first {purpose.value} key of tenant {tenant!r}: the SQLite "
                f"database of the keyring is locked ({exc.orig}). SQLite allows one writer, so "
                "a transaction that already wrote to the same database file blocks the "
                "keyring; call keyring.provision(tenant_id) before that transaction, or keep "
                "the keyring in a separate database"
            ) from None
        except sa.exc.IntegrityError:
            # Another process created the tenant's first key between our
            # read and our insert; the unique constraints kept one, so use it.
            rows = self._store.tenant_rows(tenant)
            self._refuse_destroyed(tenant, rows)
            winner = next(
                (r for r in rows if r.purpose is purpose and r.state is KeyState.ACTIVE), None
            )
            if winner is None:
                raise
            logger.debug("tenant %r: another process created the first %s key", tenant, purpose)
            return winner
        self._cache_new_key(row, generated)
        self._decryptable.invalidate((tenant, purpose))
        audit_event("key.created", **row_fields(row), state=row.state.value)
        return row

    def _invalidate_tenant(self, tenant: str, *, drop_deks: bool = False) -> None:
        self._active.invalidate_where(lambda key, _: key[0] == tenant)
        self._decryptable.invalidate_where(lambda key, _: key[0] == tenant)
        if drop_deks:
            self.cache.invalidate_where(lambda _, key: key.tenant_id == tenant)

    def _invalidate_lookups(self) -> None:
        self._active.clear()
        self._decryptable.clear()

    # -- lifecycle ------------------------------------------------------------

    def rotate(
        self, tenant_id: str, purpose: KeyPurpose | None = None, *, activate_now: bool = False
    ) -> list[KeyInfo]:
        """Create a new DEK version for the tenant (both purposes unless one is given).

        The new version is pending: it decrypts at once and becomes active
        once it is older than ``active_key_ttl`` (see :meth:`promote_pending`),
        when the previous version becomes decrypt-only. ``activate_now=True``
        skips the wait; use it only where a single process uses the keyring.
        """
        return lifecycle.rotate(self, _check_tenant(tenant_id), purpose, activate_now)

    def promote_pending(self, tenant_id: str | None = None) -> list[KeyInfo]:
        """Activate pending versions older than ``active_key_ttl``; return them.

        Lookups of the active key also do this for their tenant, so calling
        it is needed only to make a promotion happen without a write.
        """
        return lifecycle.promote_pending(self, tenant_id)

    def rewrap(self, new_kms: KmsProvider | None = None, *, tenant_id: str | None = None) -> int:
        """Rewrap DEKs under ``new_kms`` (default: the current KEK); return the count.

        Each new wrapped DEK is unwrapped again and checked against the
        row's key check value before its row is updated; data rows are not
        touched. With ``new_kms`` and no ``tenant_id``, ``new_kms`` also
        wraps every DEK created afterwards; the previous provider stays
        available for unwrapping.
        """
        return lifecycle.rewrap(self, new_kms, tenant_id)

    def retire(
        self,
        tenant_id: str,
        version: int,
        purpose: KeyPurpose | None = None,
        *,
        min_inactive_seconds: float | None = None,
    ) -> list[KeyInfo]:
        """Stop decrypting with a decrypt-only version; return the retired keys.

        Retire a version only after a census shows no value uses it any more
        (:func:`~sqlalchemy_encrypted.rotation.retire_key_version` takes one).
        Raises :class:`KeyRecentlyActiveError`, and retires nothing, while the
        version has been inactive for less than ``min_inactive_seconds``
        (default: ``active_key_ttl`` plus 60 s; see :meth:`check_retire_wait`).
        """
        return lifecycle.retire(
            self, _check_tenant(tenant_id), version, purpose, min_inactive_seconds
        )

    def check_retire_wait(
        self,
        tenant_id: str,
        version: int,
        purpose: KeyPurpose | None = None,
        *,
        min_inactive_seconds: float | None = None,
    ) -> None:
        """Raise :class:`KeyRecentlyActiveError` if :meth:`retire` would have to wait.

        Other processes cache the active version for their ``active_key_ttl``
        and keep sealing new values under it for up to that long after a
        newer version became active. A decrypt-only version can therefore be
        retired only ``min_inactive_seconds`` after it stopped being active.
        The default is this keyring's ``active_key_ttl`` plus
        ``RETIRE_MARGIN_SECONDS`` (60 s), so pass a longer wait when other
        processes use a longer ``active_key_ttl``. A census taken after this
        check passes counts the values those processes wrote meanwhile.
        Raises :class:`KeyNotFoundError` when the tenant has no such version.
        """
        lifecycle.check_retire_wait(
            self, _check_tenant(tenant_id), version, purpose, min_inactive_seconds
        )

    def reinstate(
        self, tenant_id: str, version: int, purpose: KeyPurpose | None = None
    ) -> list[KeyInfo]:
        """Make a retired version decrypt-only again; return the reinstated keys.

        Retiring keeps the wrapped DEK, so a version retired too early, or
        needed again by data restored from a backup, can decrypt again. Its
        values can then be re-encrypted. Raises :class:`KeyStateError` when
        the version is not retired, and :class:`KeyDestroyedError` for a
        shredded tenant.
        """
        return lifecycle.reinstate(self, _check_tenant(tenant_id), version, purpose)

    def shred(self, tenant_id: str) -> int:
        """Destroy every DEK of the tenant (crypto-shredding); return the count.

        Wrapped DEKs are deleted and the rows kept, in state ``destroyed``,
        for audit. Reads of the tenant's values then raise
        :class:`KeyDestroyedError`, and writes for the tenant are refused.
        """
        return lifecycle.shred(self, _check_tenant(tenant_id))

    def provision(self, tenant_id: str) -> list[KeyInfo]:
        """Create the tenant's first DEKs now (both purposes) if it has none.

        Writes create them on their own. Calling this ahead helps when the
        keyring shares a SQLite database with the data, because SQLite lets
        only one transaction write at a time. For the same reason it also
        reserves the first block of the randomized DEK's usage count (see
        ``key_usage_limit``), which the first writes would otherwise reserve.
        """
        tenant = _check_tenant(tenant_id)
        rows = [self._find_or_create_active(tenant, purpose) for purpose in KeyPurpose]
        for row in rows:
            if row.purpose is KeyPurpose.RANDOMIZED:
                self._data_key(row, fresh=True).budget.cover(0)
        return [row.info() for row in rows]

    def purge_expired(self) -> int:
        """Drop unwrapped DEKs whose ``cache_ttl`` has passed; return how many.

        The caches drop an expired DEK only when it is looked up again or
        evicted, so the DEK of a tenant that stopped being used stays in
        memory, unused. Call this periodically (for example every minute
        from the application's scheduler) to bound how long an unwrapped
        DEK stays in this process. It also drops this keyring's expired
        lookups and the expired plans of every encrypted column type.
        """
        dropped = self.cache.purge_expired()
        try:
            self._record_unrecorded()
        except sa.exc.OperationalError as exc:
            if not self._sqlite_locked(exc):
                raise
        self._active.purge_expired()
        self._decryptable.purge_expired()
        now = self._clock()
        # Other threads add leases meanwhile, so the dicts are filtered as copies.
        active_leases = self._active_leases.copy()
        self._active_leases = {
            slot: lease for slot, lease in active_leases.items() if now < lease.expires_at
        }
        id_leases = self._id_leases.copy()
        self._id_leases = {
            key_id: lease for key_id, lease in id_leases.items() if now < lease.expires_at
        }
        decryptable_leases = self._decryptable_leases.copy()
        self._decryptable_leases = {
            slot: entry for slot, entry in decryptable_leases.items() if now < entry[0]
        }
        for state in _keys.column_states():
            state.forget_expired_plans()
        if dropped:
            logger.debug("dropped %d expired DEK(s) from the DEK cache", dropped)
        return dropped

    def sealed_counts(self, tenant_id: str | None = None) -> dict[uuid.UUID, int] | None:
        """Return how many seals each key (of one tenant) has reserved.

        Randomized keys count toward ``key_usage_limit``; deterministic keys
        stay at 0. The counts include seals that processes reserved but have
        not used. Returns None for a keyring table without the
        ``sealed_count`` column.
        """
        return self._store.sealed_counts(tenant_id)

    def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]:
        """Return metadata of every key (of one tenant), without unwrapping any."""
        return [row.info() for row in self._store.rows(tenant_id)]
