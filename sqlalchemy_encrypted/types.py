"""The column types: :class:`Encrypted` and :class:`DeterministicEncrypted`.

A type keeps only small, non-secret settings (the inner type, the column
identity, the storage mode). Keys are looked up at call time from the key
provider, so nothing secret reaches SQLAlchemy's statement cache key, a
``repr()`` or a migration file.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from os import urandom
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ColumnElement
from sqlalchemy.sql.type_api import TypeEngine

from . import _storage
from . import keys as _keys
from ._aead import InvalidTag
from ._bound_search import PackedSearchValue, expanding_token_search, packed_token_search
from ._comparison import ColumnComparison
from ._plans import ColumnState, ReadPlan, WritePlan, remember
from ._search import SearchToken, TokenSearch, TokenSet
from ._storage import StorageMode, decode_canonical_base64
from .codecs import Codec, EnumNameCodec, StrCodec, ValueTag, codec_for, reader_inner_type
from .envelope import (
    GCM_NONCE_SIZE,
    GCM_TAG_SIZE,
    HEADER_SIZE,
    MIN_ENVELOPE_SIZE,
    SIV_TAG_SIZE,
    Algorithm,
    EnvelopeHeader,
    build_aad,
    parse_header,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyUsageLimitError,
    PlaintextTooLongError,
    StorageFormatError,
    StoredKeyDestroyedError,
    StoredKeyNotFoundError,
    TenantContextError,
    TenantMismatchError,
    UnsupportedOperationError,
)
from .keys import (
    DataKey,
    KeyLease,
    KeyProvider,
    KeyPurpose,
    LeaseGeneration,
    get_default_key_provider,
)
from .tenancy import TenantBound, _scope, current_tenant, scoped_tenant

__all__ = [
    "DeterministicEncrypted",
    "Encrypted",
    "EncryptedType",
    "StorageMode",
    "type_for_header",
]

logger = logging.getLogger("sqlalchemy_encrypted")

_T = TypeVar("_T")

# Prepared header and AAD per (key id) and column; bounded so that an
# application with many tenants does not grow it without limit.
_PREFIX_CACHE_SIZE = 4096

# Operators that never look inside a value, so they are safe on ciphertext.
_NULL_TESTS = frozenset(
    {
        operators.is_,
        operators.is_not,
        operators.is_distinct_from,
        operators.is_not_distinct_from,
    }
)

# A column in plaintext transition mode logs at most one warning per interval.
_PLAINTEXT_WARNING_INTERVAL = 60.0

# One-byte prefixes for SIV plaintexts, indexed by value type tag.
_TAG_BYTES = tuple(bytes((tag,)) for tag in range(256))

# seal() and decrypt() test for SIV once per value, and reading an Enum
# member through its class is slower than reading a module global.
_SIV = Algorithm.AES_256_SIV
# How many times one seal moves on to a newer DEK, after the key provider
# replaced a full one, before it raises the KeyUsageLimitError.
_REPLACEMENTS = 3

# Offset of the ciphertext in a GCM envelope, after header and nonce.
_GCM_BODY = HEADER_SIZE + GCM_NONCE_SIZE

# The generation of leases made for providers that hand out none; it is
# never bumped, and such leases are expired from the start.
_ONE_SHOT_GENERATION = LeaseGeneration()


def _one_shot_lease(key: DataKey) -> KeyLease:
    """Wrap a key from a provider without leases in a lease that is never reused."""
    return KeyLease(key, float("-inf"), _ONE_SHOT_GENERATION, _ONE_SHOT_GENERATION.value)


class _Opened(NamedTuple):
    """The result of opening one envelope, for decrypt() and reseal()."""

    provider: KeyProvider
    lease: KeyLease
    aad: bytes
    plaintext: bytes


class EncryptedType(sa.types.TypeDecorator[_T], Generic[_T]):
    """Shared machinery of both encrypted column types.

    :param inner: the SQLAlchemy type of the plaintext, such as ``String(100)``.
    :param context: the column identity bound into every value's associated
        data, ``"table.column"`` by default. Set it to keep the old name when
        a table or column is renamed, because values stay bound to it.
    :param storage: ``"binary"`` (the default) stores the envelope as bytes
        (BYTEA, BLOB, VARBINARY); ``"base64"`` stores it as base64 text for
        columns that must stay textual.
    :param keyring: the key provider of this column; the default provider
        (:func:`set_default_key_provider`) when omitted.
    :param allow_plaintext_reads: plaintext transition mode for String and
        Text columns being encrypted in place. A stored value that is not an
        envelope at all is returned as it is, with a rate-limited warning,
        instead of raising :class:`StorageFormatError`. A value that is an
        envelope but fails authentication still raises. Off by default:
        while it is on, anyone who can write to the column can plant
        plaintext values.

    ``context``, ``keyring`` and ``allow_plaintext_reads`` may be set on an
    existing instance, also after statements have used it: the change
    reaches SQLAlchemy's per-dialect copies of the type. ``storage`` is
    read-only. Set ``allow_low_cardinality`` only when creating the type,
    because a later change does not reach those copies.

    The type can be pickled with its table, for example in a pickled
    ``MetaData``, and keeps its column identity. A type with a
    ``keyring=`` of its own cannot, because the library's key providers
    hold keys and refuse to be pickled.
    """

    impl = sa.LargeBinary
    cache_ok = True

    purpose: ClassVar[KeyPurpose]
    algorithm: ClassVar[Algorithm]
    _envelope_overhead: ClassVar[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # SQLAlchemy reads cache_ok from each class's own namespace. Every
        # setting of these types is safe in a cache key (keys are looked up
        # at call time), so subclasses inherit the flag unless they set it.
        if "cache_ok" not in cls.__dict__:
            cls.cache_ok = True

    def __init__(
        self,
        inner: TypeEngine[_T] | type[TypeEngine[_T]],
        *,
        context: str | None = None,
        storage: StorageMode = "binary",
        keyring: KeyProvider | None = None,
        allow_plaintext_reads: bool = False,
    ) -> None:
        super().__init__()
        inner_type = inner() if isinstance(inner, type) else inner
        if isinstance(inner_type, EncryptedType):
            raise ConfigurationError("an encrypted type cannot wrap another encrypted type")
        if storage not in ("binary", "base64"):
            raise ConfigurationError(
                f"invalid storage {storage!r}: use 'binary' (the default) or 'base64'"
            )
        if context is not None and (not isinstance(context, str) or not context):
            raise ConfigurationError("context= must be a non-empty str naming the column")
        self._hot = ColumnState()
        # SQLAlchemy's per-dialect copies of this type, which do the binding
        # and reading; setting an option here sets it there too.
        self._dialect_copies: weakref.WeakSet[EncryptedType[Any]] = weakref.WeakSet()
        self._cache_key: tuple[Any, ...] | None = None
        self.inner: TypeEngine[_T] = inner_type
        self._context: str | None = None
        self._attached_name: str | None = None
        self.context = context
        self._storage_mode: StorageMode = storage
        self._hot.base64 = storage == "base64"
        self.keyring = keyring
        self._allow_plaintext_reads = bool(allow_plaintext_reads)
        self._column: sa.Column[Any] | None = None
        # The type this one was copied from; a dialect-specific copy reads the
        # column name from it when it was made before the column was attached.
        self._origin: EncryptedType[Any] | None = None
        self._use_codec(
            codec_for(inner_type, self.column_identity, self.purpose is KeyPurpose.DETERMINISTIC)
        )
        self._prefix_cache: dict[Any, tuple[bytes, bytes]] = {}
        self._prefix_lock = threading.Lock()
        # Headers that passed _check_header, keyed by their 24 bytes.
        self._checked_headers: dict[bytes, EnvelopeHeader] = {}
        # The per-value functions; built once, they read self._hot, not self.
        self._seal_value = self._make_sealer()
        self._decrypt_value = self._make_decryptor()
        self._dialect_impls: weakref.WeakKeyDictionary[Dialect, TypeEngine[Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._plaintext_reads = _PlaintextReadLog()
        self.impl = _storage.impl_for(storage)  # type: ignore[assignment]
        if context is not None:
            self._check_configuration()

    # -- identity -----------------------------------------------------------

    @property
    def context(self) -> str | None:
        """The ``context=`` option: the column identity to bind values to, if set."""
        return self._context

    @context.setter
    def context(self, value: str | None) -> None:
        self._context = value
        self._identity_changed()
        self._set_on_dialect_copies("context", value)

    @property
    def _column_name(self) -> str | None:
        """``table.column`` of the column this type is attached to, once attached."""
        return self._attached_name

    @_column_name.setter
    def _column_name(self, value: str | None) -> None:
        self._attached_name = value
        self._identity_changed()
        self._set_on_dialect_copies("_column_name", value)

    @property
    def storage(self) -> StorageMode:
        """The ``storage=`` option, fixed when the type is created."""
        return self._storage_mode

    @property
    def allow_plaintext_reads(self) -> bool:
        """The ``allow_plaintext_reads=`` option: plaintext transition mode."""
        return self._allow_plaintext_reads

    @allow_plaintext_reads.setter
    def allow_plaintext_reads(self, value: bool) -> None:
        self._check_plaintext_reads(bool(value))
        self._allow_plaintext_reads = bool(value)
        self._cache_key = None
        self._set_on_dialect_copies("allow_plaintext_reads", value)

    def _identity_changed(self) -> None:
        # Plans carry AADs built for the old identity, so they all go; the
        # per-value functions therefore need not compare identities.
        hot = self._hot
        hot.identity = self._context if self._context is not None else self._attached_name
        hot.forget_plans()
        self._cache_key = None

    @property
    def keyring(self) -> KeyProvider | None:
        """The ``keyring=`` option: this column's key provider, or None for the default."""
        return self._hot.keyring

    @keyring.setter
    def keyring(self, value: KeyProvider | None) -> None:
        self._hot.keyring = value
        self._hot.forget_plans()
        self._cache_key = None
        self._set_on_dialect_copies("keyring", value)

    def _set_on_dialect_copies(self, name: str, value: Any) -> None:
        for dialect_copy in list(self._dialect_copies):
            setattr(dialect_copy, name, value)

    def _use_codec(self, codec: Codec) -> None:
        self._codec = codec
        self._max_plaintext_length = codec.max_encoded_length()
        hot = self._hot
        hot.encode = codec.encode
        hot.decoder = codec.decoder()
        hot.limit = self._max_plaintext_length
        if type(codec) is StrCodec:
            hot.str_limit = sys.maxsize if codec.length is None else codec.length
        else:
            hot.str_limit = -1
        hot.tag = codec.tag
        hot.tag_byte = _TAG_BYTES[codec.tag]
        hot.forget_plans()

    @property
    def column_identity(self) -> str:
        """The name bound into the AAD: ``context=`` if given, else ``table.column``."""
        if self.context is not None:
            return self.context
        if self._column_name is not None:
            return self._column_name
        if self._origin is not None and self._origin._column_name is not None:
            return self._origin._column_name
        return "<unattached column>"

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        if not isinstance(parent, sa.Column):
            return
        column = parent
        if self._column is not None and self._column is not column:
            raise ConfigurationError(
                f"one {type(self).__name__} instance is used by two columns "
                f"({self._column_name or self._column.name} and {column.name}): create a "
                "separate type instance for each column"
            )
        self._column = column

        def _attached(col: sa.Column[Any], table: Any) -> None:
            self._column_name = f"{table.name}.{col.name}"
            self._check_configuration()

        if column.table is not None:
            _attached(column, column.table)
        else:
            event.listen(column, "after_parent_attach", _attached)

    def _check_configuration(self) -> None:
        """Validate the options once the column identity is known, so that the
        error names the column."""
        self._check_plaintext_reads(self.allow_plaintext_reads)

    def _check_plaintext_reads(self, enabled: bool) -> None:
        if enabled and not isinstance(self._codec, StrCodec):
            raise ConfigurationError(
                f"encrypted column {self.column_identity}: allow_plaintext_reads needs a "
                f"String, Text or Unicode inner type, not {type(self.inner).__name__}"
            )

    def _identity_for_write(self) -> str:
        # The two common cases first, without the property: this runs per value.
        if self.context is not None:
            return self.context
        if self._column_name is not None:
            return self._column_name
        identity = self.column_identity
        if identity == "<unattached column>":
            raise ConfigurationError(
                f"{type(self).__name__} is not attached to a table column: attach it to a "
                "Column or pass context= to name the value's identity"
            )
        return identity

    @property
    def key_provider(self) -> KeyProvider:
        """The provider this column uses now: ``keyring=``, else the default one."""
        return self.keyring if self.keyring is not None else get_default_key_provider()

    # -- schema and caching -------------------------------------------------

    def max_stored_length(self) -> int | None:
        """Return the largest stored value in bytes (or base64 characters), or
        None for an unbounded inner type."""
        encoded = self._codec.max_encoded_length()
        if encoded is None:
            return None
        return _storage.stored_length(self._envelope_overhead + encoded, self.storage)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # SQLAlchemy calls this on every execution of a statement with an
        # expanding IN parameter, as deterministic lookups are. A new type
        # object each time would miss SQLAlchemy's per-type caches.
        impl = self._dialect_impls.get(dialect)
        if impl is None:
            impl = _storage.dialect_impl(dialect, self.storage, self.max_stored_length())
            self._dialect_impls[dialect] = impl
        return impl

    @property
    def python_type(self) -> type[Any]:
        return self.inner.python_type

    @property
    def _static_cache_key(self) -> Any:
        """Cache key of the type: its settings and column identity, never a key.

        The column identity is part of it because the bind processing of a
        cached statement seals values for that column: two columns whose
        types differ only in their identity must not share compiled
        statements. The keyring enters by ``id()`` only; the cached
        statement keeps this type, and so the keyring, alive.
        """
        if type(self).__dict__.get("cache_ok") is not True:
            return super()._static_cache_key
        # SQLAlchemy reads it on every execution of a statement that
        # compares the column, so it is kept until the identity or keyring
        # changes. An identity borrowed from the type this one was copied
        # from can still change, so that key is not kept.
        cached = self._cache_key
        if cached is not None:
            return cached
        cache_key = (
            type(self),
            ("inner", self.inner._static_cache_key),
            ("identity", self.column_identity),
            ("storage", self.storage),
            ("keyring", None if self.keyring is None else id(self.keyring)),
            ("allow_plaintext_reads", self.allow_plaintext_reads),
            *self._extra_cache_key(),
        )
        if self._hot.identity is not None:
            self._cache_key = cache_key
        return cache_key

    def _extra_cache_key(self) -> tuple[Any, ...]:
        return ()

    def _copy_options(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "storage": self.storage,
            "keyring": self.keyring,
            "allow_plaintext_reads": self.allow_plaintext_reads,
        }

    def _gen_dialect_impl(self, dialect: Dialect) -> TypeEngine[_T]:
        dialect_copy = super()._gen_dialect_impl(dialect)
        if isinstance(dialect_copy, EncryptedType) and dialect_copy is not self:
            self._dialect_copies.add(dialect_copy)
        return dialect_copy

    def __reduce__(self) -> tuple[Any, ...]:
        # The per-value functions, plans and locks are rebuilt on unpickling.
        # A keyring= of the column's own goes into the pickle as it is, which
        # the library's key providers refuse, because they hold keys.
        options = self._copy_options()
        context = options.pop("context")
        return (_unpickle_type, (type(self), self.inner, options, context, self._attached_name))

    def copy(self, **kw: Any) -> EncryptedType[_T]:
        # SQLAlchemy copies a type for each dialect it compiles for and for
        # each copied Column. The copy keeps the column identity; attaching it
        # to another column replaces it.
        clone = type(self)(self.inner, **self._copy_options())
        clone._column_name = self._column_name
        clone._origin = self
        return clone

    def __copy__(self) -> EncryptedType[_T]:
        # A shallow copy would share the per-value state and functions.
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> EncryptedType[_T]:
        return self.copy()

    def __repr__(self) -> str:
        options = [
            f"{name}={value!r}"
            for name, value in self._copy_options().items()
            if name != "keyring" and value not in (None, False, "binary")
        ]
        if self.keyring is not None:
            options.append(f"keyring=<{type(self.keyring).__name__}>")
        return f"{type(self).__name__}({', '.join([repr(self.inner), *options])})"

    # -- binding ------------------------------------------------------------

    def _prefix(self, key: DataKey, identity: str) -> tuple[bytes, bytes]:
        # Keyed by the UUID's int: UUID.__hash__ is Python code, and this runs per value.
        cache_key = (key.key_id.int, identity)
        prefix = self._prefix_cache.get(cache_key)
        if prefix is None:
            header = EnvelopeHeader(
                algorithm=self.algorithm,
                value_tag=self._codec.tag,
                key_id=key.key_id,
                key_version=key.version,
            ).pack()
            prefix = (header, build_aad(header, identity, key.tenant_id))
            with self._prefix_lock:
                if len(self._prefix_cache) >= _PREFIX_CACHE_SIZE:
                    self._prefix_cache.clear()
                self._prefix_cache[cache_key] = prefix
        return prefix

    def encode_plaintext(self, value: Any) -> bytes:
        """Check ``value`` and encode it with the column's codec, without sealing.

        Raises :class:`ValueTypeError` for a value of the wrong type and
        :class:`PlaintextTooLongError` for one over the column's limit.
        """
        return self._encode(value, self.column_identity)

    def _encode(self, value: Any, identity: str) -> bytes:
        plaintext = self._codec.encode(value, identity)
        limit = self._max_plaintext_length
        if limit is not None and len(plaintext) > limit:
            raise self._too_long(identity, len(plaintext))
        return plaintext

    def _too_long(self, identity: str, size: int) -> PlaintextTooLongError:
        return PlaintextTooLongError(
            f"value for encrypted column {identity} encodes to {size} bytes, "
            f"more than the column's maximum of {self._max_plaintext_length} bytes"
        )

    def seal(self, value: Any, tenant_id: str | None = None, key: DataKey | None = None) -> bytes:
        """Encrypt one Python value into an envelope for this column.

        The tenant comes from ``tenant_id``, else the active
        :func:`tenant_scope`, else the default tenant. This is the public way
        to build stored values (or search tokens) outside the ORM. The result
        is the envelope in bytes, also for a column with base64 storage.
        """
        identity = self._identity_for_write()
        plaintext = self._encode(value, identity)
        if key is not None:
            return self._seal_encoded(plaintext, key, identity)
        tenant = tenant_id if tenant_id is not None else current_tenant(identity)
        attempt = 0
        while True:
            key = self.key_provider.active_key(tenant, self.purpose)
            try:
                return self._seal_encoded(plaintext, key, identity)
            except KeyUsageLimitError as exc:
                # The provider made a newer version active: seal under it.
                attempt += 1
                if not exc.replaced or attempt > _REPLACEMENTS:
                    raise

    def _seal_encoded(self, plaintext: bytes, key: DataKey, identity: str) -> bytes:
        """Seal codec-encoded ``plaintext`` under ``key`` into an envelope.

        A randomized key's seal counts against its usage limit, and raises
        :class:`KeyUsageLimitError` once the key has reached it.
        """
        header, aad = self._prefix(key, identity)
        if self.algorithm is _SIV:
            # The tag byte keeps SIV's plaintext non-empty, which AESSIV requires.
            plaintext = _TAG_BYTES[self._codec.tag] + plaintext
        else:
            try:
                key.budget.take()
            except KeyUsageLimitError as exc:
                raise _naming_column(exc, identity) from None
        return header + key.cipher.seal(plaintext, aad)

    def _write_plan(self, tenant: str, identity: str) -> WritePlan:
        """Look up the active DEK of ``tenant`` and build the plan that seals
        this column's values under it, keeping the plan while its lease lasts."""
        provider = self.key_provider
        lease_method = getattr(provider, "active_key_lease", None)
        if lease_method is None:
            lease = _one_shot_lease(provider.active_key(tenant, self.purpose))
        else:
            lease = lease_method(tenant, self.purpose)
        header, aad = self._prefix(lease.key, identity)
        plan = WritePlan(lease, identity, header, aad)
        # A plan built while the identity or the provider changed would carry
        # the old AAD or key, so it is not kept. It still seals this one value,
        # as the full path would have.
        if identity is self._hot.identity and provider is self._current_provider():
            remember(self._hot.write_plans, tenant, plan)
        return plan

    def _cover_seal(self, plan: WritePlan, ticket: int, tenant: str, identity: str) -> WritePlan:
        """Return the plan to seal with once ``ticket`` is covered.

        That is ``plan`` itself, or a plan for the tenant's new active DEK
        when the key provider replaced a DEK that reached its usage limit.
        """
        for _ in range(_REPLACEMENTS):
            try:
                plan.budget.cover(ticket)
            except KeyUsageLimitError as exc:
                if not exc.replaced:
                    raise _naming_column(exc, identity) from None
            else:
                # Other plans of the same DEK may have covered it already.
                plan.seal_end = plan.budget.end
                return plan
            plan = self._write_plan(tenant, identity)
            ticket = next(plan.tickets)
            if ticket < plan.seal_end:
                return plan
        try:
            plan.budget.cover(ticket)
        except KeyUsageLimitError as exc:
            # Each newer version filled up before this seal reached it.
            raise _naming_column(exc, identity) from None
        plan.seal_end = plan.budget.end
        return plan

    def _current_provider(self) -> KeyProvider | None:
        keyring = self._hot.keyring
        return keyring if keyring is not None else _keys._default_provider

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return self._seal_value(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        # As TypeDecorator.bind_processor(), without its per-value call of
        # process_bind_param() through this object.
        seal_value = self._seal_value
        impl_processor = self.impl_instance.bind_processor(dialect)
        if impl_processor is None:
            return seal_value

        def process(value: Any) -> Any:
            return impl_processor(seal_value(value))

        return process

    def _make_sealer(self) -> Callable[[Any], Any]:
        """Build the function that turns one Python value into its stored value.

        It reads the column's settings from ``self._hot`` and calls methods of
        this object only off the common path; see :class:`ColumnState`.
        """
        hot = self._hot
        identity_for_write = self._identity_for_write
        write_plan = self._write_plan
        seal_encoded = self._seal_encoded
        too_long = self._too_long
        cover_seal = self._cover_seal
        column = self

        def seal_value(value: Any) -> Any:
            if value is None:
                return None
            tenant_id: str | None = None
            key: DataKey | None = None
            # Exact type tests: both wrappers are internal, final classes.
            value_type = type(value)
            if value_type is TenantBound:
                tenant_id = value.tenant_id
                value = value.value
                if value is None:
                    return None
                value_type = type(value)
            elif value_type is SearchToken:
                key = value.key
                value = value.value
                value_type = type(value)
            unexpected: str | None = None
            try:
                identity = hot.identity
                if identity is None:
                    identity = identity_for_write()
                # StrCodec.encode(), inlined for an exact str within the limit,
                # whose UTF-8 form is within the byte limit too.
                plaintext: bytes | None = None
                if value_type is str and len(value) <= hot.str_limit:
                    try:
                        plaintext = str.encode(value)
                    except UnicodeEncodeError:
                        plaintext = None
                if plaintext is None:
                    # Raises the precise error, outside the except block above.
                    plaintext = hot.encode(value, identity)  # type: ignore[misc]
                    limit = hot.limit
                    if limit is not None and len(plaintext) > limit:
                        raise too_long(identity, len(plaintext))
                if key is None:
                    tenant = tenant_id if tenant_id is not None else _scope.get()
                    if tenant is None:
                        tenant = current_tenant(identity)
                    plan = hot.write_plans.get(tenant)
                    # WritePlan.is_current(), inlined. A change of key provider
                    # drops the plans, so the provider needs no comparison.
                    if (
                        plan is None
                        or plan.generation.value != plan.stamp
                        or not plan.clock() < plan.expires_at
                    ):
                        plan = write_plan(tenant, identity)
                    # AeadCipher.seal(), inlined.
                    if plan.gcm:
                        # Count the seal against the DEK's usage limit (SealBudget.take()).
                        ticket = next(plan.tickets)
                        if ticket >= plan.seal_end:
                            plan = cover_seal(plan, ticket, tenant, identity)
                        # A fresh random nonce, as _aead.new_gcm_nonce() makes,
                        # without the call through functools.partial.
                        nonce = urandom(GCM_NONCE_SIZE)
                        envelope = plan.header + nonce + plan.encrypt(nonce, plaintext, plan.aad)
                    else:
                        envelope = plan.header + plan.encrypt(
                            hot.tag_byte + plaintext, plan.aad_list
                        )
                else:
                    envelope = seal_encoded(plaintext, key, identity)
            except (EncryptionError, SQLAlchemyError):
                raise
            except Exception as exc:
                # SQLAlchemy would wrap any other error in a StatementError that
                # quotes the parameters, and the error itself may quote the value.
                unexpected = type(exc).__name__
            if unexpected is not None:
                raise EncryptionError(
                    f"could not encrypt a value for encrypted column {column.column_identity}: "
                    f"{unexpected}"
                )
            if hot.base64:
                return _storage.to_base64(envelope)
            return envelope

        return seal_value

    def literal_processor(self, dialect: Dialect) -> Any:
        # Raised here rather than from the returned processor: SQLAlchemy
        # wraps a failing processor in a CompileError whose message shows the
        # value, and so the plaintext.
        raise UnsupportedOperationError(
            f"encrypted column {self.column_identity} cannot be rendered as a SQL literal; "
            "use bound parameters"
        )

    # -- reading ------------------------------------------------------------

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        # The binary impl's own result processor calls bytes(value), which
        # raises a bare TypeError when a driver returns str for a text-typed
        # column. decrypt() accepts bytes, bytearray, memoryview and str and
        # raises StorageFormatError for anything it cannot read.
        return self._decrypt_value

    def _check_header(self, data: bytes, identity: str) -> EnvelopeHeader:
        """Parse the header of ``data`` and check that this column can open it.

        A header that passes is remembered and not parsed again.
        """
        header = self._checked_headers.get(data[:HEADER_SIZE])
        if header is not None and len(data) >= MIN_ENVELOPE_SIZE[self.algorithm]:
            return header
        header = parse_header(data, f"encrypted column {identity}")
        if header.algorithm is not self.algorithm:
            raise DecryptionError(
                f"could not decrypt encrypted column {identity}: the value was sealed with "
                f"{header.algorithm.name}, but this column uses {self.algorithm.name}"
            )
        if header.value_tag != self._codec.tag:
            raise DecryptionError(
                f"could not decrypt encrypted column {identity}: value type tag "
                f"{header.value_tag} does not match the column's type"
            )
        checked = self._checked_headers
        if len(checked) >= _PREFIX_CACHE_SIZE:
            checked.clear()
        checked[data[:HEADER_SIZE]] = header
        return header

    def _header_or_error(self, data: bytes, identity: str) -> EnvelopeHeader | StorageFormatError:
        """Return the checked header, or the error to raise once outside this
        ``except`` block, so that it carries no ``__context__``."""
        try:
            return self._check_header(data, identity)
        except StorageFormatError as exc:
            return _storage.explain_format_error(data, exc, identity)

    def _lease_for(self, header: EnvelopeHeader, identity: str) -> tuple[KeyProvider, KeyLease]:
        """Look up the DEK named by ``header``, turning the provider's errors
        into decryption errors that name the column."""
        scope = scoped_tenant()
        provider = self.keyring if self.keyring is not None else get_default_key_provider()
        failure: Exception | None = None
        try:
            lease_method = getattr(provider, "key_lease", None)
            if lease_method is None:
                return provider, _one_shot_lease(
                    provider.key_by_id(header.key_id, expected_tenant=scope)
                )
            return provider, lease_method(header.key_id, expected_tenant=scope)
        except (KeyNotFoundError, TenantContextError) as exc:
            failure = exc
        except EncryptionError as exc:
            # KMS and keyring errors keep their class; the note names the column.
            exc.add_note(f"while decrypting encrypted column {identity}")
            raise
        # Raised here, outside the except block, so the new error has no
        # __context__ to carry: the provider's message is copied in instead.
        where = f"encrypted column {identity}, key id {header.key_id}"
        if isinstance(failure, TenantContextError):
            detail = str(failure)
            if str(header.key_id) in detail and repr(scope) in detail:
                # The provider's message already names the key, its tenant and the scope.
                raise TenantMismatchError(
                    f"could not decrypt encrypted column {identity}: {detail}"
                )
            raise TenantMismatchError(
                f"could not decrypt {where}: the value belongs to another tenant than "
                f"tenant_scope {scope!r} ({detail})"
            )
        if isinstance(failure, KeyDestroyedError):
            raise StoredKeyDestroyedError(f"could not decrypt {where}: {failure}")
        raise StoredKeyNotFoundError(f"could not decrypt {where}: {failure}")

    def _open(self, data: bytes, header: EnvelopeHeader, identity: str) -> _Opened:
        """Authenticate the envelope ``data`` and return its key, the AAD
        that authenticated it and the codec-encoded plaintext."""
        provider, lease = self._lease_for(header, identity)
        key = lease.key
        if key.purpose is not self.purpose or key.version != header.key_version:
            raise DecryptionError(
                f"could not decrypt {_describe(identity, key, header)}: authentication failed"
            )
        # The AAD starts with the stored header; it equals the cached header
        # unless the key provider returned a key with another id.
        prefix_header, aad = self._prefix(key, identity)
        header_bytes = data[:HEADER_SIZE]
        if prefix_header != header_bytes:
            aad = header_bytes + aad[HEADER_SIZE:]
        try:
            plaintext = key.cipher.open_at(data, HEADER_SIZE, aad)
        except InvalidTag:
            plaintext = None
        if plaintext is None:
            raise DecryptionError(
                f"could not decrypt {_describe(identity, key, header)}: authentication failed"
            )
        if self.algorithm is _SIV:
            if not plaintext or plaintext[0] != self._codec.tag:
                raise DecryptionError(
                    f"could not decrypt {_describe(identity, key, header)}: invalid value type tag"
                )
            plaintext = plaintext[1:]
        return _Opened(provider, lease, aad, plaintext)

    def decrypt(self, stored: Any) -> Any:
        """Decrypt one stored value of this column back into its Python value.

        Accepts what a driver returns for the column (bytes, bytearray,
        memoryview, or for base64 storage the base64 text as str or bytes). Raises a
        :class:`DecryptionError` (or a subclass) for any value that does not
        authenticate, naming the column and, once known, the tenant and key.
        """
        return self._decrypt_value(stored)

    def _make_decryptor(self) -> Callable[[Any], Any]:
        """Build the function behind :meth:`decrypt`.

        Its fast path opens a value whose header this column opened before,
        while the lease on its DEK is current. It does what
        ``ReadPlan.is_current()``, the tenant check of ``_lease_for()`` and
        ``_open()`` do, inline and reading ``self._hot`` rather than
        ``self``. Any failure falls through to :meth:`_decrypt_fully`, which
        raises the precise error.
        """
        hot = self._hot
        decrypt_fully = self._decrypt_fully

        def decrypt_value(stored: Any) -> Any:
            if stored is None:
                return None
            if type(stored) is bytes:
                data = stored
            elif type(stored) is str and hot.base64:
                # Base64 storage returned as text: the same path once decoded.
                decoded = decode_canonical_base64(stored)
                if decoded is None:
                    return decrypt_fully(stored)
                data = decoded
            else:
                return decrypt_fully(stored)
            plan = hot.read_plans.get(data[:HEADER_SIZE])
            if (
                plan is not None
                and plan.generation.value == plan.stamp
                and plan.clock() < plan.expires_at
            ):
                scope = _scope.get()
                if scope is None or scope == plan.tenant_id:
                    plaintext: bytes | None
                    try:
                        if plan.gcm:
                            plaintext = plan.decrypt(
                                data[HEADER_SIZE:_GCM_BODY], data[_GCM_BODY:], plan.aad
                            )
                        else:
                            plaintext = plan.decrypt(data[HEADER_SIZE:], plan.aad_list)
                            # The tag byte that keeps SIV plaintexts non-empty.
                            if plaintext[0] == hot.tag:
                                plaintext = plaintext[1:]
                            else:
                                plaintext = None
                    except Exception:
                        # InvalidTag, ValueError for a value too short to
                        # hold a nonce, or IndexError for an empty SIV
                        # plaintext: the full path names the error.
                        plaintext = None
                    if plaintext is not None:
                        try:
                            return hot.decoder(plaintext)  # type: ignore[misc]
                        except Exception:
                            # The full path decodes again and raises the error.
                            plaintext = None
            return decrypt_fully(stored)

        return decrypt_value

    def _decrypt_fully(self, stored: Any) -> Any:
        """Decrypt ``stored`` with every check, remembering a read plan for
        its header once it opened."""
        identity = self.context if self.context is not None else self._column_name
        if identity is None:
            identity = self.column_identity
        if type(stored) is bytes and stored and not self._hot.base64:
            data = stored
        else:
            failure: StorageFormatError | None = None
            try:
                data = _storage.coerce_stored(stored, self.storage, identity)
            except StorageFormatError as exc:
                failure = exc
            if failure is not None:
                return self._read_plaintext(stored, identity, failure)
        # The header checks depend only on the 24 header bytes, apart from the
        # length, so a header that passed them once is not parsed again.
        header = self._checked_headers.get(data[:HEADER_SIZE])
        if header is None or len(data) < MIN_ENVELOPE_SIZE[self.algorithm]:
            checked = self._header_or_error(data, identity)
            if isinstance(checked, StorageFormatError):
                return self._read_plaintext(stored, identity, checked)
            header = checked
        opened = self._open(data, header, identity)
        decode_failure: str | None = None
        try:
            value = self._codec.decode(opened.plaintext)
        except Exception as exc:
            # A decoding error can hold the plaintext (UnicodeDecodeError.object,
            # JSONDecodeError.doc), so only its type name is kept.
            decode_failure = type(exc).__name__
        else:
            plan = ReadPlan(
                opened.lease,
                identity,
                opened.aad,
                MIN_ENVELOPE_SIZE[self.algorithm],
            )
            # A plan built while the identity or the provider changed would
            # carry the old AAD or key.
            if identity is self._hot.identity and opened.provider is self._current_provider():
                remember(self._hot.read_plans, data[:HEADER_SIZE], plan)
            return value
        raise DecryptionError(
            f"could not decode {_describe(identity, opened.lease.key, header)}: "
            f"{decode_failure} in the value codec"
        )

    def reseal(self, stored: Any, key: DataKey, *, move_tenant: bool = False) -> bytes:
        """Re-encrypt one stored value of this column under ``key``.

        The value is authenticated exactly as :meth:`decrypt` does, and its
        encoded plaintext is sealed again without being decoded, so the value
        keeps its exact encoding. ``key`` must be a key of the
        value's tenant for this column's purpose, usually the tenant's active
        key. With ``move_tenant=True``, ``key`` may belong to another tenant:
        the value then moves to that tenant, whose scope can read it from then
        on, while the tenant that sealed it no longer can. Returns the new
        envelope (bytes, also for base64 storage).
        Values that are not envelopes raise :class:`StorageFormatError`, even
        in plaintext transition mode.
        """
        identity = self._identity_for_write()
        opened, _ = self._open_for_reseal(stored, key, identity, move_tenant)
        return self._seal_encoded(opened.plaintext, key, identity)

    def reencode(self, stored: Any, key: DataKey, *, move_tenant: bool = False) -> bytes | None:
        """Re-encode one stored value by the column's current codec rules and seal it under ``key``.

        Unlike :meth:`reseal`, the plaintext is decoded and encoded again, so
        a value stored before a codec rule existed gets today's encoding (a
        ``Numeric(10, 2)`` value ``1.5`` becomes ``1.50``). ``key`` and
        ``move_tenant`` are as for :meth:`reseal`. Returns the new envelope,
        or None when ``key`` sealed the value and its encoding is already
        current, so there is nothing to write.

        Raises :class:`DecryptionError` when the plaintext does not decode,
        and :class:`PlaintextTooLongError` or :class:`ValueTypeError` when
        the decoded value no longer fits the column. The messages name the
        column and key, never the value.
        """
        identity = self._identity_for_write()
        opened, header = self._open_for_reseal(stored, key, identity, move_tenant)
        plaintext = self._reencode_plaintext(opened, header, identity)
        old_key = opened.lease.key
        if plaintext == opened.plaintext and (old_key.key_id, old_key.version) == (
            key.key_id,
            key.version,
        ):
            return None
        return self._seal_encoded(plaintext, key, identity)

    def _open_for_reseal(
        self, stored: Any, key: DataKey, identity: str, move_tenant: bool
    ) -> tuple[_Opened, EnvelopeHeader]:
        """Authenticate ``stored`` and check that ``key`` may seal its plaintext."""
        data = _storage.coerce_stored(stored, self.storage, identity)
        header = self._check_header(data, identity)
        opened = self._open(data, header, identity)
        old_key = opened.lease.key
        other_tenant = key.tenant_id != old_key.tenant_id and not move_tenant
        if other_tenant or key.purpose is not self.purpose:
            raise TenantContextError(
                f"encrypted column {identity}: cannot re-encrypt a value of tenant "
                f"{old_key.tenant_id!r} under {key.purpose.value} key id {key.key_id} of "
                f"tenant {key.tenant_id!r}"
            )
        return opened, header

    def _reencode_plaintext(self, opened: _Opened, header: EnvelopeHeader, identity: str) -> bytes:
        """Return the opened value's plaintext encoded again by the codec's current rules."""
        failure: str | None = None
        try:
            plaintext = self._codec.reencode(opened.plaintext, identity)
        except EncryptionError:
            # The codec's own errors name the column and the rule, not the value.
            raise
        except Exception as exc:
            # Other errors can hold the plaintext (UnicodeDecodeError.object,
            # JSONDecodeError.doc), so only the type name is kept.
            failure = type(exc).__name__
        if failure is not None:
            raise DecryptionError(
                f"could not re-encode {_describe(identity, opened.lease.key, header)}: "
                f"{failure} in the value codec"
            )
        limit = self._max_plaintext_length
        if limit is not None and len(plaintext) > limit:
            raise self._too_long(identity, len(plaintext))
        return plaintext

    def _read_plaintext(self, stored: Any, identity: str, error: StorageFormatError) -> Any:
        """Return a legacy plaintext value in transition mode, else raise ``error``.

        Only values that are not envelopes get here: text, and bytes that do
        not start with the format version byte. A damaged envelope always
        raises.
        """
        if not self.allow_plaintext_reads:
            raise error
        text = _storage.legacy_text(stored)
        if text is None:
            raise error
        self._plaintext_reads.record(identity)
        return text

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return self._decrypt_value(value)

    # -- comparisons --------------------------------------------------------

    def coerce_compared_value(self, op: Any, value: Any) -> TypeEngine[Any]:
        return self

    class Comparator(sa.types.TypeDecorator.Comparator[Any]):
        def _reject(self, op: Any) -> UnsupportedOperationError:
            column_type = cast("EncryptedType[Any]", self.type)
            name = getattr(op, "__name__", str(op)).rstrip("_").replace("_op", "")
            hint = (
                " Declare the column DeterministicEncrypted to search it by equality."
                if column_type.purpose is KeyPurpose.RANDOMIZED and op in _EQUALITY_OPS
                else ""
            )
            return UnsupportedOperationError(
                f"operator {name!r} is not supported on encrypted column "
                f"{column_type.column_identity}: the database only sees ciphertext.{hint}"
            )

        def operate(self, op: Any, *other: Any, **kwargs: Any) -> ColumnElement[Any]:
            column_type = cast("EncryptedType[Any]", self.type)
            if (
                op in (operators.eq, operators.ne)
                and other
                and isinstance(self.expr, BindParameter)
                and isinstance(other[0], BindParameter)
            ):
                # SQLAlchemy matches bound parameters up with == and bool() of
                # the result (for example in the parameters of a relationship's
                # and_() criteria), which only a plain comparison supports.
                return super().operate(op, *other, **kwargs)
            if op in _NULL_TESTS:
                # IS NULL only: is_(True) or is_("x") would compare ciphertext.
                if not other or other[0] is None or isinstance(other[0], sa.sql.elements.Null):
                    return super().operate(op, *other, **kwargs)
                raise self._reject(op)
            if op in (operators.eq, operators.ne) and other:
                value = other[0]
                if value is None or isinstance(value, sa.sql.elements.Null):
                    return super().operate(op, *other, **kwargs)
                if _is_column_expression(value):
                    binary = super().operate(op, *other, **kwargs)
                    assert isinstance(binary, BinaryExpression)
                    return ColumnComparison(binary, column_type.column_identity)
            if column_type.purpose is KeyPurpose.DETERMINISTIC:
                return column_type._deterministic_operate(self, op, other, kwargs)
            raise self._reject(op)

        def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> ColumnElement[Any]:
            return self.operate(op, other, **kwargs)

    comparator_factory = Comparator

    def _deterministic_operate(
        self, comparator: Any, op: Any, other: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ColumnElement[Any]:
        raise comparator._reject(op)


class _PlaintextReadLog:
    """Counts plaintext values read in transition mode and logs a warning
    with the count at most once per interval, never with the values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._unlogged = 0
        self._last_logged: float | None = None

    def record(self, identity: str) -> None:
        with self._lock:
            self._count += 1
            self._unlogged += 1
            now = time.monotonic()
            if (
                self._last_logged is not None
                and now - self._last_logged < _PLAINTEXT_WARNING_INTERVAL
            ):
                return
            self._last_logged = now
            unlogged, self._unlogged = self._unlogged, 0
            total = self._count
        logger.warning(
            "encrypted column %s returned %d plaintext value(s) (%d since start) because "
            "allow_plaintext_reads is on; encrypt the column and turn the option off",
            identity,
            unlogged,
            total,
        )


# The stock comparison of TypeDecorator, used once a deterministic operator
# has been checked or rewritten.
_base_operate = sa.types.TypeDecorator.Comparator.operate

_EQUALITY_OPS = frozenset({operators.eq, operators.ne, operators.in_op, operators.not_in_op})


def _describe(identity: str, key: DataKey, header: EnvelopeHeader) -> str:
    """Name the value for an error message; built only when decryption fails."""
    return (
        f"encrypted column {identity}, tenant {key.tenant_id!r}, "
        f"key id {key.key_id}, key version {header.key_version}"
    )


def _is_sql_expression(value: Any) -> bool:
    return hasattr(value, "__clause_element__") or isinstance(value, sa.sql.ClauseElement)


def _is_column_expression(value: Any) -> bool:
    """Return True for a SQL expression other than a bound parameter."""
    if _is_tracked_bind(value) or isinstance(value, BindParameter):
        return False
    return _is_sql_expression(value)


class Encrypted(EncryptedType[_T]):
    """A column encrypted with AES-256-GCM under a fresh random 96-bit nonce.

    Equal plaintexts give different stored values, so the database can test
    the column only for NULL; every other comparison raises
    :class:`UnsupportedOperationError` when the expression is built. For the
    same reason ``DISTINCT``, ``DISTINCT ON`` and ``UNION``, ``INTERSECT``
    or ``EXCEPT`` without ``ALL`` over the column raise, at the latest when
    the statement is compiled, unless the statement also selects the primary
    key of the column's table.
    """

    purpose = KeyPurpose.RANDOMIZED
    algorithm = Algorithm.AES_256_GCM
    _envelope_overhead = HEADER_SIZE + GCM_NONCE_SIZE + GCM_TAG_SIZE


# Deterministic columns over types with at most this many values need an
# explicit opt-in, because equal ciphertexts then reveal the value itself.
LOW_CARDINALITY_LIMIT = 16


class DeterministicEncrypted(EncryptedType[_T]):
    """A column encrypted with AES-256-SIV: the same plaintext under the same
    DEK, column and tenant always gives the same stored bytes.

    That makes ``==``, ``!=``, ``IN``, ``NOT IN``, ``GROUP BY``, ``DISTINCT``
    and unique constraints work, and reveals which rows hold equal values and
    how long each value is. LIKE, ranges and ordering raise
    :class:`UnsupportedOperationError`.

    A comparison matches the value under every decryptable key version of
    the tenant, also when the value is a bound parameter or a
    ``lambda_stmt`` closure variable, whose versions are read when the
    statement executes. Bound parameters cover at most four versions, and
    a tenant with more raises :class:`TooManyKeyVersionsError`.

    :param allow_low_cardinality: accept a Boolean inner type or an Enum of
        at most 16 members. Without it such a column raises
        :class:`ConfigurationError`, because anyone who learns the value of
        one row learns it for every row with the same stored bytes.
    """

    purpose = KeyPurpose.DETERMINISTIC
    algorithm = Algorithm.AES_256_SIV
    _envelope_overhead = HEADER_SIZE + SIV_TAG_SIZE + 1

    def __init__(
        self,
        inner: TypeEngine[_T] | type[TypeEngine[_T]],
        *,
        context: str | None = None,
        storage: StorageMode = "binary",
        keyring: KeyProvider | None = None,
        allow_plaintext_reads: bool = False,
        allow_low_cardinality: bool = False,
    ) -> None:
        self.allow_low_cardinality = bool(allow_low_cardinality)
        super().__init__(
            inner,
            context=context,
            storage=storage,
            keyring=keyring,
            allow_plaintext_reads=allow_plaintext_reads,
        )

    def _check_configuration(self) -> None:
        super()._check_configuration()
        identity = self.column_identity
        inner_name = type(self.inner).__name__
        if self._codec.max_encoded_length() is None:
            # Bounded even when not indexed: MySQL and MariaDB can index an
            # unbounded (LONGBLOB) column only by a prefix, so no unique
            # constraint or full-value index could be added to it later.
            raise ConfigurationError(
                f"deterministic encrypted column {identity}: DeterministicEncrypted needs an "
                f"inner type with a maximum length, and {inner_name} has none. Every "
                "deterministic column, indexed or not, gets a bounded stored width so that "
                "an index or unique constraint on it works on every supported database. "
                "Declare the inner type with a length, such as String(255), or a precision "
                f"for Numeric, or use Encrypted({inner_name}) for a column that is never "
                "searched by equality"
            )
        cardinality = self._codec.cardinality()
        if (
            cardinality is not None
            and cardinality <= LOW_CARDINALITY_LIMIT
            and not self.allow_low_cardinality
        ):
            raise ConfigurationError(
                f"deterministic encrypted column {identity}: {inner_name} has only "
                f"{cardinality} possible values, so equal stored bytes reveal the value "
                "of every row once one is known; use Encrypted, or pass "
                "allow_low_cardinality=True to accept that"
            )

    def _extra_cache_key(self) -> tuple[Any, ...]:
        return (("allow_low_cardinality", self.allow_low_cardinality),)

    def _copy_options(self) -> dict[str, Any]:
        return {**super()._copy_options(), "allow_low_cardinality": self.allow_low_cardinality}

    def search_tokens(self, value: Any, tenant_id: str | None = None) -> list[bytes]:
        """Return the stored bytes ``value`` has under each decryptable key
        version of the tenant, active version first.

        Use them to search the column in hand-written SQL, for example
        ``WHERE email IN (:t1, :t2)``. The tenant comes from ``tenant_id``,
        else the active :func:`tenant_scope`, else the default tenant. A
        tenant without keys has no stored values and gets an empty list.
        """
        identity = self._identity_for_write()
        tenant = tenant_id if tenant_id is not None else current_tenant(identity)
        keys = self.key_provider.decryptable_keys(tenant, self.purpose)
        return [self.seal(value, key=key) for key in keys]

    def _deterministic_operate(
        self, comparator: Any, op: Any, other: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ColumnElement[Any]:
        if op in (operators.eq, operators.ne):
            value = other[0]
            negate = op is operators.ne
            if _is_bound(value):
                # Sealed when the statement executes, under every decryptable
                # key version of the tenant of that execution.
                parameter = self._retyped(comparator, value, skip_none=False)
                return packed_token_search(comparator.expr, [parameter], negate)
            return self._token_in(comparator, [value], negate=negate)
        if op in (operators.in_op, operators.not_in_op):
            values = other[0]
            negate = op is operators.not_in_op
            if _is_bound(values):
                binary = _base_operate(comparator, op, values, **kwargs)
                right = getattr(binary, "right", None)
                if isinstance(right, BindParameter) and right.expanding:
                    return expanding_token_search(comparator.expr, right, self, negate)
                raise comparator._reject(op)
            if _is_sql_expression(values) or not isinstance(values, (list, tuple, set, frozenset)):
                return _base_operate(comparator, op, values, **kwargs)
            if any(_is_column_expression(value) for value in values):
                raise comparator._reject(op)
            if any(_is_bound(value) for value in values):
                parameters = [self._retyped(comparator, value, skip_none=True) for value in values]
                return packed_token_search(comparator.expr, parameters, negate)
            return self._token_in(comparator, list(values), negate=negate)
        if op is operators.distinct_op:
            return _base_operate(comparator, op, *other, **kwargs)
        raise comparator._reject(op)

    def _retyped(self, comparator: Any, value: Any, skip_none: bool) -> ColumnElement[Any]:
        """Return ``value`` as a bound parameter that binds its search values.

        ``value`` is a bound parameter, a ``lambda_stmt`` closure variable or,
        in a list that holds one of those, a plain value. The parameter's own
        type is overridden: SQLAlchemy keeps the type of a typed parameter,
        such as ``literal("x")`` or ``bindparam("e", type_=String)``, so its
        value would otherwise reach the database as plaintext.
        """
        search_type = PackedSearchValue(self, skip_none=skip_none)
        if not _is_bound(value):
            if value is not None:
                # Checked now, so a wrong type or length fails when the
                # expression is built rather than when it executes.
                self.encode_plaintext(value)
            return BindParameter(None, value, type_=search_type, unique=True)
        parameter = _base_operate(comparator, operators.eq, value).right
        if not isinstance(parameter, BindParameter):
            raise comparator._reject(operators.eq)
        # type_coerce() rather than a retyped copy: lambda_stmt swaps every
        # parameter of its cached expression for the closure variable's own
        # parameter, which has the column's type, and type_coerce() applies
        # the search type to whatever parameter it wraps when it compiles.
        return sa.type_coerce(parameter, search_type)

    def _token_in(self, comparator: Any, values: list[Any], negate: bool) -> ColumnElement[Any]:
        # Check every value now, so a wrong type or length fails when the
        # expression is built rather than when it executes.
        for value in values:
            if value is not None:
                self.encode_plaintext(value)
        op, negated_op = (
            (operators.not_in_op, operators.in_op)
            if negate
            else (operators.in_op, operators.not_in_op)
        )
        # Built directly rather than through the stock IN comparison, which
        # gives the same expression through several coercion steps.
        parameter = BindParameter(
            None, value=TokenSet(self, values), type_=self, expanding=True, unique=True
        )
        parameter.expand_op = op  # type: ignore[assignment]
        return TokenSearch.build(comparator.expr, parameter, op, negated_op)


def _naming_column(error: KeyUsageLimitError, identity: str) -> KeyUsageLimitError:
    """Return a copy of ``error`` whose message names the column it was raised for."""
    return error.with_message(f"could not encrypt a value for encrypted column {identity}: {error}")


def _unpickle_type(
    cls: type[EncryptedType[Any]],
    inner: TypeEngine[Any],
    options: dict[str, Any],
    context: str | None,
    column_name: str | None,
) -> EncryptedType[Any]:
    """Rebuild a pickled column type; see ``EncryptedType.__reduce__``."""
    column_type = cls(inner, **options)
    # Set after construction, as type_for_header() does, because its readers
    # would fail the configuration checks that context= runs.
    column_type.context = context
    column_type._column_name = column_name
    return column_type


def _is_tracked_bind(value: Any) -> bool:
    """Return True for the placeholder that ``lambda_stmt`` passes for a closure variable."""
    return type(value).__name__ == "PyWrapper"


def _is_bound(value: Any) -> bool:
    """Return True for a bound parameter or a ``lambda_stmt`` closure variable."""
    return isinstance(value, BindParameter) or _is_tracked_bind(value)


def type_for_header(
    header: EnvelopeHeader,
    context: str,
    *,
    storage: StorageMode = "binary",
    keyring: KeyProvider | None = None,
) -> EncryptedType[Any]:
    """Build a column type that decrypts values with ``header``'s algorithm
    and value type, bound to the column identity ``context``.

    For tools that read stored values without the application's models, such
    as ``sqlalchemy-encrypted decrypt``. ``Encrypted`` or
    ``DeterministicEncrypted`` follows from the algorithm. Values decode to
    the natural Python type of their value type tag: str, bytes, int,
    Decimal, float, bool, date, datetime, time, timedelta, UUID, a JSON
    value, or the member name (a str) of an Enum. The type skips the checks that
    guard writes to a declared column (length bounds, low cardinality), so
    use it to read values, not to write them.

    Raises :class:`StorageFormatError` for a value type tag this release does
    not know.
    """
    if not isinstance(context, str) or not context:
        raise ConfigurationError("context must be a non-empty str naming the column")
    try:
        tag = ValueTag(header.value_tag)
    except ValueError:
        raise StorageFormatError(
            f"encrypted column {context}: unknown value type tag {header.value_tag}"
        ) from None
    column_class: type[EncryptedType[Any]] = (
        DeterministicEncrypted if header.algorithm is Algorithm.AES_256_SIV else Encrypted
    )
    reader = column_class(reader_inner_type(tag), storage=storage, keyring=keyring)
    # Set after construction: passing context= would run the configuration
    # checks, which reject the unbounded inner types used here for reading.
    reader.context = context
    if tag is ValueTag.ENUM:
        reader._use_codec(EnumNameCodec())
    return reader
