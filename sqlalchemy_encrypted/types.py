"""The column types: :class:`Encrypted` and :class:`DeterministicEncrypted`.

A type keeps only small, non-secret settings (the inner type, the column
identity, the storage mode). Keys are looked up at call time from the key
provider, so nothing secret reaches SQLAlchemy's statement cache key, a
``repr()`` or a migration file.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast, overload

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.type_api import TypeEngine

from ._aead import InvalidTag
from .codecs import Codec, codec_for
from .envelope import (
    GCM_NONCE_SIZE,
    GCM_TAG_SIZE,
    HEADER_SIZE,
    SIV_TAG_SIZE,
    Algorithm,
    EnvelopeHeader,
    build_aad,
    parse_header,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    StorageFormatError,
    TenantContextError,
    UnsupportedOperationError,
)
from .keys import DataKey, KeyProvider, KeyPurpose, get_default_key_provider
from .tenancy import TenantBound, current_tenant, scoped_tenant

__all__ = ["DeterministicEncrypted", "Encrypted", "EncryptedType", "StorageMode"]

logger = logging.getLogger("sqlalchemy_encrypted")

_T = TypeVar("_T")
StorageMode = Literal["binary", "base64"]

# Prepared header and AAD per (key id) and column; bounded so that an
# application with many tenants does not grow it without limit.
_PREFIX_CACHE_SIZE = 4096

# Operators that never look inside a value, so they are safe on ciphertext.
_NULL_TESTS = frozenset({operators.is_, operators.is_not})


class _Token:
    """A plaintext paired with the DEK that must seal it, for lookups that
    match one value under several key versions."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any, key: DataKey) -> None:
        self.value = value
        self.key = key

    def __repr__(self) -> str:
        return f"<search token key_version={self.key.version}>"


class _TokenSet(Sequence[_Token]):
    """Value of an expanding IN parameter on a deterministic column.

    SQLAlchemy expands the parameter when the statement executes, so the
    tenant's decryptable key versions are read then, under the tenant scope
    of the execution, not when the statement was built.
    """

    def __init__(self, column_type: DeterministicEncrypted[Any], values: Sequence[Any]) -> None:
        self._type = column_type
        self._values = [value for value in values if value is not None]

    def __repr__(self) -> str:
        return f"<{len(self._values)} search value(s) for {self._type.column_identity}>"

    def _tokens(self) -> list[_Token]:
        column_type = self._type
        tenant_id = current_tenant(column_type.column_identity)
        keys = column_type.key_provider.decryptable_keys(tenant_id, KeyPurpose.DETERMINISTIC)
        return [_Token(value, key) for value in self._values for key in keys]

    def __len__(self) -> int:
        return len(self._tokens())

    @overload
    def __getitem__(self, index: int) -> _Token: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[_Token]: ...

    def __getitem__(self, index: int | slice) -> _Token | Sequence[_Token]:
        return self._tokens()[index]

    def __iter__(self) -> Iterator[_Token]:
        return iter(self._tokens())


class EncryptedType(sa.types.TypeDecorator[_T], Generic[_T]):
    """Shared machinery of both encrypted column types."""

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
        self.inner: TypeEngine[_T] = inner_type
        self.context = context
        self.storage: StorageMode = storage
        self.keyring = keyring
        self._column_name: str | None = None
        self._column: sa.Column[Any] | None = None
        self._codec: Codec = codec_for(inner_type, self.column_identity)
        self._prefix_cache: dict[Any, tuple[bytes, bytes]] = {}
        self._prefix_lock = threading.Lock()
        self.impl = sa.Text() if storage == "base64" else sa.LargeBinary()  # type: ignore[assignment]

    # -- identity -----------------------------------------------------------

    @property
    def column_identity(self) -> str:
        """The name bound into the AAD: ``context=`` if given, else ``table.column``."""
        if self.context is not None:
            return self.context
        if self._column_name is not None:
            return self._column_name
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

        if column.table is not None:
            _attached(column, column.table)
        else:
            event.listen(column, "after_parent_attach", _attached)

    def _identity_for_write(self) -> str:
        if self.context is None and self._column_name is None:
            raise ConfigurationError(
                f"{type(self).__name__} is not attached to a table column: attach it to a "
                "Column or pass context= to name the value's identity"
            )
        return self.column_identity

    @property
    def key_provider(self) -> KeyProvider:
        return self.keyring if self.keyring is not None else get_default_key_provider()

    # -- schema -------------------------------------------------------------

    def max_stored_length(self) -> int | None:
        """Return the largest stored value in bytes (or base64 characters), or
        None for an unbounded inner type."""
        encoded = self._codec.max_encoded_length()
        if encoded is None:
            return None
        size = self._envelope_overhead + encoded
        if self.storage == "base64":
            return 4 * ((size + 2) // 3)
        return size

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        length = self.max_stored_length()
        if self.storage == "base64":
            if length is not None:
                return dialect.type_descriptor(sa.String(length))
            return dialect.type_descriptor(sa.Text())
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            if length is not None and length <= 65_535:
                return dialect.type_descriptor(mysql.VARBINARY(length))
            return dialect.type_descriptor(mysql.LONGBLOB())
        return dialect.type_descriptor(sa.LargeBinary(length))

    @property
    def python_type(self) -> type[Any]:
        return self.inner.python_type

    def copy(self, **kw: Any) -> EncryptedType[_T]:
        # SQLAlchemy copies a type for each dialect it compiles for, so the copy
        # keeps the column identity; attaching it to another column replaces it.
        clone = type(self)(
            self.inner, context=self.context, storage=self.storage, keyring=self.keyring
        )
        clone._column_name = self._column_name
        return clone

    def __repr__(self) -> str:
        options = "".join(
            f", {name}={value!r}"
            for name, value in (("context", self.context), ("storage", self.storage))
            if value is not None and not (name == "storage" and value == "binary")
        )
        return f"{type(self).__name__}({self.inner!r}{options})"

    # -- binding ------------------------------------------------------------

    def _prefix(self, key: DataKey, identity: str) -> tuple[bytes, bytes]:
        cache_key = (key.key_id, identity)
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

    def seal(self, value: Any, tenant_id: str | None = None, key: DataKey | None = None) -> bytes:
        """Encrypt one Python value into an envelope for this column.

        The tenant comes from ``tenant_id``, else the active
        :func:`tenant_scope`, else the default tenant. This is the public way
        to build stored values (or search tokens) outside the ORM.
        """
        identity = self._identity_for_write()
        plaintext = self._codec.encode(value, identity)
        if key is None:
            tenant = tenant_id if tenant_id is not None else current_tenant(identity)
            key = self.key_provider.active_key(tenant, self.purpose)
        header, aad = self._prefix(key, identity)
        if self.algorithm is Algorithm.AES_256_SIV:
            # The tag byte keeps SIV's plaintext non-empty, which AESSIV requires.
            plaintext = bytes((self._codec.tag,)) + plaintext
        return header + key.cipher.seal(plaintext, aad)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        tenant_id: str | None = None
        key: DataKey | None = None
        if isinstance(value, TenantBound):
            tenant_id = value.tenant_id
            value = value.value
            if value is None:
                return None
        elif isinstance(value, _Token):
            key = value.key
            value = value.value
        envelope = self.seal(value, tenant_id, key)
        if self.storage == "base64":
            return base64.b64encode(envelope).decode("ascii")
        return envelope

    def process_literal_param(self, value: Any, dialect: Dialect) -> str:
        raise UnsupportedOperationError(
            f"encrypted column {self.column_identity} cannot be rendered as a SQL literal; "
            "use bound parameters"
        )

    # -- reading ------------------------------------------------------------

    def _coerce_stored(self, value: Any) -> bytes:
        identity = self.column_identity
        if isinstance(value, bytes):
            data = value
        elif isinstance(value, (bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, str):
            if self.storage != "base64":
                raise StorageFormatError(
                    f"encrypted column {identity} returned str where bytes were expected: "
                    "check that the database column has a binary type (BYTEA, BLOB, VARBINARY) "
                    "or declare the type with storage='base64'"
                )
            try:
                data = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise StorageFormatError(
                    f"encrypted column {identity} holds a value that is not base64: "
                    "it may be plaintext written outside this library"
                ) from None
        else:
            raise StorageFormatError(
                f"encrypted column {identity} returned a {type(value).__name__}, "
                "not bytes: check the column's storage type"
            )
        if not data:
            raise StorageFormatError(
                f"encrypted column {identity} holds an empty value, which is not a valid envelope"
            )
        return data

    def decrypt(self, stored: Any) -> Any:
        """Decrypt one stored value of this column back into its Python value."""
        if stored is None:
            return None
        identity = self.column_identity
        data = self._coerce_stored(stored)
        try:
            header = parse_header(data, f"encrypted column {identity}")
        except StorageFormatError:
            if _looks_like_text(data):
                raise StorageFormatError(
                    f"encrypted column {identity} holds a value that looks like plaintext, "
                    "not an envelope: check the migration state of this column"
                ) from None
            raise
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
        key = self.key_provider.key_by_id(header.key_id, expected_tenant=scoped_tenant())
        where = (
            f"encrypted column {identity}, tenant {key.tenant_id!r}, "
            f"key id {key.key_id}, key version {header.key_version}"
        )
        if key.purpose is not self.purpose or key.version != header.key_version:
            raise DecryptionError(f"could not decrypt {where}: authentication failed")
        _, aad = self._prefix(key, identity)
        aad = data[:HEADER_SIZE] + aad[HEADER_SIZE:]
        try:
            plaintext = key.cipher.open(data[HEADER_SIZE:], aad)
        except InvalidTag:
            raise DecryptionError(f"could not decrypt {where}: authentication failed") from None
        if self.algorithm is Algorithm.AES_256_SIV:
            if not plaintext or plaintext[0] != self._codec.tag:
                raise DecryptionError(f"could not decrypt {where}: invalid value type tag")
            plaintext = plaintext[1:]
        try:
            return self._codec.decode(plaintext)
        except Exception as exc:
            raise DecryptionError(
                f"could not decode {where}: {type(exc).__name__} in the value codec"
            ) from None

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return self.decrypt(value)

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
            if op in _NULL_TESTS:
                return super().operate(op, *other, **kwargs)
            if op in (operators.eq, operators.ne) and other and other[0] is None:
                return super().operate(op, *other, **kwargs)
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


# The stock comparison of TypeDecorator, used once a deterministic operator
# has been checked or rewritten.
_base_operate = sa.types.TypeDecorator.Comparator.operate

_EQUALITY_OPS = frozenset({operators.eq, operators.ne, operators.in_op, operators.not_in_op})


def _looks_like_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.isprintable()


def _is_sql_expression(value: Any) -> bool:
    return hasattr(value, "__clause_element__") or isinstance(value, sa.sql.ClauseElement)


class Encrypted(EncryptedType[_T]):
    """A column encrypted with AES-256-GCM under a fresh random 96-bit nonce.

    Equal plaintexts give different stored values, so the database can test
    the column only for NULL; every other comparison raises
    :class:`UnsupportedOperationError` when the expression is built.
    """

    purpose = KeyPurpose.RANDOMIZED
    algorithm = Algorithm.AES_256_GCM
    _envelope_overhead = HEADER_SIZE + GCM_NONCE_SIZE + GCM_TAG_SIZE


class DeterministicEncrypted(EncryptedType[_T]):
    """A column encrypted with AES-256-SIV: the same plaintext under the same
    DEK, column and tenant always gives the same stored bytes.

    That makes ``==``, ``!=``, ``IN``, ``NOT IN``, ``GROUP BY``, ``DISTINCT``
    and unique constraints work, and reveals which rows hold equal values.
    LIKE, ranges and ordering raise :class:`UnsupportedOperationError`.
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
    ) -> None:
        super().__init__(inner, context=context, storage=storage, keyring=keyring)
        if self._codec.max_encoded_length() is None:
            raise ConfigurationError(
                f"DeterministicEncrypted({type(self.inner).__name__}) has no length limit: "
                "an indexed deterministic column needs a bounded width, so declare the inner "
                "type with a length such as String(255)"
            )

    def _deterministic_operate(
        self, comparator: Any, op: Any, other: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ColumnElement[Any]:
        if op in (operators.eq, operators.ne):
            value = other[0]
            if _is_sql_expression(value):
                if isinstance(value, sa.sql.elements.BindParameter) or _is_tracked_bind(value):
                    # An explicit or lambda-tracked bound parameter: seal it under the
                    # active DEK only.
                    return _base_operate(comparator, op, value, **kwargs)
                raise comparator._reject(op)
            return self._token_in(comparator, [value], negate=op is operators.ne)
        if op in (operators.in_op, operators.not_in_op):
            values = other[0]
            if _is_sql_expression(values) or not isinstance(values, (list, tuple, set, frozenset)):
                return _base_operate(comparator, op, values, **kwargs)
            if any(_is_sql_expression(value) for value in values):
                raise comparator._reject(op)
            return self._token_in(comparator, list(values), negate=op is operators.not_in_op)
        if op is operators.distinct_op:
            return _base_operate(comparator, op, *other, **kwargs)
        raise comparator._reject(op)

    def _token_in(self, comparator: Any, values: list[Any], negate: bool) -> ColumnElement[Any]:
        parameter = sa.bindparam(
            None, value=_TokenSet(self, values), type_=self, expanding=True, unique=True
        )
        op = operators.not_in_op if negate else operators.in_op
        return _base_operate(comparator, op, parameter)


def _is_tracked_bind(value: Any) -> bool:
    """Return True for the placeholder that ``lambda_stmt`` passes for a closure variable."""
    return type(value).__name__ == "PyWrapper"


def _check_tenant_bound(value: TenantBound, identity: str) -> None:
    scoped = scoped_tenant()
    if scoped is not None and scoped != value.tenant_id:
        raise TenantContextError(
            f"encrypted column {identity}: the row belongs to tenant {value.tenant_id!r} "
            f"but tenant_scope is {scoped!r}"
        )
