"""The two conversion directions, applied one value at a time.

Encrypting reads a plaintext column and writes envelopes; decrypting reads
an encrypted column and writes plaintext. Either way a source value is
NULL, already in the target form (a mixed table), or to be converted, and
a converted value in the shadow column is checked against its source.
"""

from __future__ import annotations

import decimal
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

from sqlalchemy_encrypted.errors import DecryptionError, MigrationError, ValueTypeError
from sqlalchemy_encrypted.tenancy import TenantBound
from sqlalchemy_encrypted.types import EncryptedType

from .report import Direction
from .values import ValueForm, classify_stored, plaintext_value

__all__ = ["Decrypting", "Encrypting", "RowState", "SourceValue", "Strategy"]


class RowState(enum.Enum):
    NULL = "null"
    CONVERT = "convert"
    ALREADY = "already"


@dataclass(frozen=True)
class SourceValue:
    """A source value: its state, its plaintext, and the stored form to copy
    unchanged when it is already in the target form."""

    state: RowState
    plaintext: Any = None
    stored: Any = None


def _python_type(type_: TypeEngine[Any]) -> type[Any] | None:
    try:
        return type_.python_type
    except NotImplementedError:
        return None


def _result_processor(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """Return the function that turns a raw DBAPI value into a value of ``type_``.

    Values are read untyped, without the DBAPI type code of their column.
    The numeric processors of the PostgreSQL dialects need that code, so
    numeric types get :func:`_numeric_processor` instead.
    """
    if isinstance(type_, sa.Numeric | sa.Float):
        return _numeric_processor(bool(type_.asdecimal))
    return type_.dialect_impl(dialect).result_processor(dialect, None)


def _numeric_processor(as_decimal: bool) -> Callable[[Any], Any]:
    """Return a converter to ``Decimal`` or ``float`` that goes by each value's type.

    PostgreSQL drivers return ``float`` for real and double precision,
    ``Decimal`` for numeric and ``int`` for integer columns, and SQLite
    returns ``float`` or ``int``. A float becomes ``Decimal(repr(value))``,
    the shortest decimal that reads back as the same float, and an ``int``
    becomes a ``Decimal`` exactly. When encrypting, the codec then fits the
    value to the column's scale. Values of other types are left unchanged
    for the codec to reject.
    """

    def to_decimal(value: Any) -> Any:
        if isinstance(value, float):
            return decimal.Decimal(repr(value))
        if isinstance(value, int) and not isinstance(value, bool):
            return decimal.Decimal(value)
        return value

    def to_float(value: Any) -> Any:
        if isinstance(value, decimal.Decimal | int) and not isinstance(value, bool):
            return float(value)
        return value

    return to_decimal if as_decimal else to_float


def _normalize(raw: Any) -> Any:
    return bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw


class Strategy:
    """Reads source values, builds shadow values and checks them, for one direction."""

    direction: Direction
    shadow_suffix: str

    def __init__(
        self,
        encrypted_type: EncryptedType[Any],
        plaintext_type: TypeEngine[Any],
        dialect: Dialect,
    ) -> None:
        self.encrypted_type = encrypted_type
        self.plaintext_type = plaintext_type
        self.dialect = dialect

    @property
    def target_type(self) -> TypeEngine[Any]:
        """The type the column has once converted."""
        raise NotImplementedError

    @property
    def shadow_bind_type(self) -> TypeEngine[Any]:
        raise NotImplementedError

    def read_source(self, raw: Any, tenant_id: str | None, where: str) -> SourceValue:
        raise NotImplementedError

    def shadow_value(self, source: SourceValue, tenant_id: str | None, where: str) -> Any:
        raise NotImplementedError

    def shadow_matches(
        self, source: SourceValue, shadow_raw: Any, tenant_id: str | None, where: str
    ) -> bool:
        raise NotImplementedError


class Encrypting(Strategy):
    direction: Direction = "encrypt"
    shadow_suffix = "encrypting"

    def __init__(
        self,
        encrypted_type: EncryptedType[Any],
        plaintext_type: TypeEngine[Any],
        dialect: Dialect,
    ) -> None:
        super().__init__(encrypted_type, plaintext_type, dialect)
        self._source_processor = _result_processor(plaintext_type, dialect)
        self._python_type = _python_type(encrypted_type)

    @property
    def target_type(self) -> TypeEngine[Any]:
        return self.encrypted_type

    @property
    def shadow_bind_type(self) -> TypeEngine[Any]:
        return sa.Text() if self.encrypted_type.storage == "base64" else sa.LargeBinary()

    def read_source(self, raw: Any, tenant_id: str | None, where: str) -> SourceValue:
        raw = _normalize(raw)
        found = classify_stored(self.encrypted_type, raw, tenant_id, where)
        if found.form is ValueForm.NULL:
            return SourceValue(RowState.NULL)
        if found.form is ValueForm.ENVELOPE:
            return SourceValue(RowState.ALREADY, found.value, raw)
        if not isinstance(raw, bytes) and self._source_processor is not None:
            raw = self._source_processor(raw)
        return SourceValue(RowState.CONVERT, plaintext_value(raw, self._python_type, where))

    def shadow_value(self, source: SourceValue, tenant_id: str | None, where: str) -> Any:
        if source.state is RowState.NULL:
            return None
        if source.state is RowState.ALREADY:
            return source.stored
        value: Any = source.plaintext
        if tenant_id is not None:
            value = TenantBound(value, tenant_id)
        try:
            return self.encrypted_type.process_bind_param(value, self.dialect)
        except ValueTypeError as exc:
            raise MigrationError(f"{where}: {exc}") from None

    def shadow_matches(
        self, source: SourceValue, shadow_raw: Any, tenant_id: str | None, where: str
    ) -> bool:
        if source.state is RowState.NULL:
            return shadow_raw is None
        try:
            found = classify_stored(self.encrypted_type, _normalize(shadow_raw), tenant_id, where)
        except DecryptionError:
            return False
        return found.form is ValueForm.ENVELOPE and found.value == source.plaintext


class Decrypting(Strategy):
    direction: Direction = "decrypt"
    shadow_suffix = "decrypting"

    def __init__(
        self,
        encrypted_type: EncryptedType[Any],
        plaintext_type: TypeEngine[Any],
        dialect: Dialect,
    ) -> None:
        super().__init__(encrypted_type, plaintext_type, dialect)
        self._target_processor = _result_processor(plaintext_type, dialect)
        self._python_type = _python_type(plaintext_type)

    @property
    def target_type(self) -> TypeEngine[Any]:
        return self.plaintext_type

    @property
    def shadow_bind_type(self) -> TypeEngine[Any]:
        return self.plaintext_type

    def _typed(self, raw: Any) -> Any:
        raw = _normalize(raw)
        if raw is None or self._target_processor is None:
            return raw
        return self._target_processor(raw)

    def read_source(self, raw: Any, tenant_id: str | None, where: str) -> SourceValue:
        raw = _normalize(raw)
        found = classify_stored(self.encrypted_type, raw, tenant_id, where)
        if found.form is ValueForm.NULL:
            return SourceValue(RowState.NULL)
        if found.form is ValueForm.ENVELOPE:
            return SourceValue(RowState.CONVERT, found.value)
        if not isinstance(raw, bytes):
            raw = self._typed(raw)
        return SourceValue(RowState.ALREADY, plaintext_value(raw, self._python_type, where))

    def shadow_value(self, source: SourceValue, tenant_id: str | None, where: str) -> Any:
        return source.plaintext

    def shadow_matches(
        self, source: SourceValue, shadow_raw: Any, tenant_id: str | None, where: str
    ) -> bool:
        if source.state is RowState.NULL:
            return shadow_raw is None
        if shadow_raw is None:
            return False
        return bool(self._typed(shadow_raw) == source.plaintext)
