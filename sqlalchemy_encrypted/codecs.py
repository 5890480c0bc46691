"""Typed Python values to plaintext bytes and back.

Each codec owns one value type tag, the byte stored at offset 3 of every
envelope, so a value is always decoded as the type it was written as. The
encodings are part of the stored format and are specified in
``docs/format.md``; changing one needs a new tag, never an edit.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import operator
import struct
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.types import TypeEngine

from .errors import ConfigurationError, PlaintextTooLongError, ValueTypeError

__all__ = ["Codec", "EnumNameCodec", "ValueTag", "codec_for", "reader_inner_type"]


class ValueTag(enum.IntEnum):
    """Value type tags stored at offset 3 of the envelope header."""

    STR = 0x01
    BYTES = 0x02
    INT = 0x03
    DECIMAL = 0x04
    FLOAT = 0x05
    BOOL = 0x06
    DATE = 0x07
    DATETIME = 0x08
    TIME = 0x09
    TIMEDELTA = 0x0A
    UUID = 0x0B
    JSON = 0x0C
    ENUM = 0x0D


class Codec:
    """Encodes one Python value type to bytes and decodes it back."""

    tag: ClassVar[ValueTag]
    python_types: ClassVar[tuple[type, ...]] = ()

    def check(self, value: Any, column: str) -> None:
        """Raise :class:`ValueTypeError` unless ``value`` fits this codec."""
        if not isinstance(value, self.python_types) or isinstance(value, self._excluded):
            expected = " or ".join(t.__name__ for t in self.python_types)
            raise ValueTypeError(
                f"invalid value for encrypted column {column}: expected {expected}, "
                f"got {type(value).__name__}"
            )

    _excluded: ClassVar[tuple[type, ...]] = ()

    def encode(self, value: Any, column: str) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError

    def reencode(self, data: bytes, column: str) -> bytes:
        """Decode ``data`` and encode the value again by this codec's current rules.

        Raises what :meth:`decode` or :meth:`encode` raises, for example
        :class:`PlaintextTooLongError` when the value no longer fits the column.
        """
        return self.encode(self.decode(data), column)

    def decoder(self) -> Callable[[bytes], Any]:
        """Return a function that does what :meth:`decode` does, as cheaply as
        possible; column types call it once per value read."""
        return self.decode

    def max_encoded_length(self) -> int | None:
        """Return the largest possible encoded length in bytes, or None if unbounded."""
        return None

    def cardinality(self) -> int | None:
        """Return how many distinct values the codec can encode, if that is small."""
        return None


class StrCodec(Codec):
    tag = ValueTag.STR
    python_types = (str,)

    def __init__(self, length: int | None) -> None:
        self.length = length

    def encode(self, value: Any, column: str) -> bytes:
        # An exact str needs no type check; this runs once per value written.
        if type(value) is not str:
            self.check(value, column)
        if self.length is not None and len(value) > self.length:
            raise PlaintextTooLongError(
                f"value for encrypted column {column} is longer than its limit of "
                f"{self.length} characters"
            )
        try:
            return str.encode(value, "utf-8")
        except UnicodeEncodeError:
            pass
        # Raised outside the except block, like _encode_utf8() does.
        raise _lone_surrogate_error(column)

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8")

    def decoder(self) -> Callable[[bytes], Any]:
        # The unbound method decodes UTF-8 strictly, as decode() does, with
        # one Python call less; a subclass with its own decode() keeps it.
        if type(self).decode is not StrCodec.decode:
            return self.decode
        return bytes.decode

    def max_encoded_length(self) -> int | None:
        # A character takes at most 4 bytes in UTF-8.
        return None if self.length is None else 4 * self.length


def _encode_utf8(text: str, column: str) -> bytes:
    """Encode ``text`` as UTF-8, rejecting lone surrogates.

    The error is raised outside the ``except`` block on purpose: a
    ``UnicodeEncodeError`` holds the whole string in its ``object``
    attribute, and an exception raised inside the block would keep it as
    ``__context__``.
    """
    try:
        return str.encode(text, "utf-8")
    except UnicodeEncodeError:
        pass
    raise _lone_surrogate_error(column)


def _lone_surrogate_error(column: str) -> ValueTypeError:
    return ValueTypeError(
        f"invalid value for encrypted column {column}: the string contains a lone "
        "surrogate code point, which UTF-8 cannot encode"
    )


class BytesCodec(Codec):
    tag = ValueTag.BYTES
    python_types = (bytes, bytearray, memoryview)

    def __init__(self, length: int | None) -> None:
        self.length = length

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        data = bytes(value)
        if self.length is not None and len(data) > self.length:
            raise PlaintextTooLongError(
                f"value for encrypted column {column} is longer than its limit of "
                f"{self.length} bytes"
            )
        return data

    def decode(self, data: bytes) -> bytes:
        return data

    def max_encoded_length(self) -> int | None:
        return self.length


class IntCodec(Codec):
    """Signed big-endian two's complement of minimal length.

    Randomized columns take integers of any size. Deterministic columns pass
    ``max_bytes=8``, the range of a SQL BIGINT, so that their stored width is
    bounded.
    """

    tag = ValueTag.INT
    python_types = (int,)
    _excluded = (bool,)

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes

    def check(self, value: Any, column: str) -> None:
        # Integer types of other libraries (numpy, for example) implement __index__.
        if not isinstance(value, (bool, str, bytes, float)) and hasattr(value, "__index__"):
            return
        super().check(value, column)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        number = operator.index(value)
        length = (number + (number < 0)).bit_length() // 8 + 1
        if self.max_bytes is not None and length > self.max_bytes:
            raise PlaintextTooLongError(
                f"value for encrypted column {column} is out of range: a deterministic "
                f"integer column holds {8 * self.max_bytes}-bit signed integers"
            )
        return number.to_bytes(length, "big", signed=True)

    def decode(self, data: bytes) -> int:
        if not data:
            raise ValueError("empty integer encoding")
        return int.from_bytes(data, "big", signed=True)

    def max_encoded_length(self) -> int | None:
        return self.max_bytes


class DecimalCodec(Codec):
    """The Decimal's own string form, which keeps scale, sign and exponent.

    With a precision, values are fitted to ``Numeric(precision, scale)`` as
    a PostgreSQL ``NUMERIC(p, s)`` column fits them: every value gets
    exactly ``scale`` fractional digits, extra ones rounded half away from
    zero and missing ones padded with zeros, and a negative zero becomes
    zero. A value that then has more than ``precision - scale`` integer
    digits, or is infinite, raises :class:`PlaintextTooLongError`. A
    missing scale is 0, as in SQL.
    """

    tag = ValueTag.DECIMAL
    python_types = (decimal.Decimal, int)
    _excluded = (bool,)

    # Characters besides the digits: sign, decimal point, up to six leading
    # zeros ("0.000000") and an exponent such as "E-1000000000".
    _NON_DIGIT_CHARACTERS = 32

    def __init__(
        self, as_decimal: bool = True, precision: int | None = None, scale: int | None = None
    ) -> None:
        self.as_decimal = as_decimal
        self.precision = precision
        self.scale = (scale or 0) if precision is not None else None

    def check(self, value: Any, column: str) -> None:
        if isinstance(value, float):
            return
        super().check(value, column)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        if isinstance(value, float):
            # repr() is the shortest string that reads back as the same float.
            value = decimal.Decimal(repr(value))
        number = decimal.Decimal(value)
        if self.precision is not None:
            number = self._fit(number, column)
        return str(number).encode("ascii")

    def _fit(self, number: decimal.Decimal, column: str) -> decimal.Decimal:
        """Quantize ``number`` to the scale and check it against the precision."""
        assert self.precision is not None and self.scale is not None
        if number.is_nan():
            # PostgreSQL stores NaN in a NUMERIC(p, s) column too.
            return number
        if number.is_infinite():
            raise PlaintextTooLongError(
                f"value for encrypted column {column} is infinite, which "
                f"Numeric({self.precision}, {self.scale}) cannot store"
            )
        integer_digits = self.precision - self.scale
        self._check_integer_digits(number, integer_digits, column)
        # The integer digits fit, so precision + 2 digits hold the result.
        # quantize() rounds extra fractional digits and pads missing ones,
        # so equal numbers get one encoding: 1.5 and 1.50 both become 1.50.
        context = decimal.Context(prec=self.precision + 2, rounding=decimal.ROUND_HALF_UP)
        number = number.quantize(decimal.Decimal(1).scaleb(-self.scale), context=context)
        # Rounding up can add an integer digit: 999.995 becomes 1000.00.
        self._check_integer_digits(number, integer_digits, column)
        # PostgreSQL's numeric has no negative zero: -0.001 is stored as 0.00.
        return number.copy_abs() if number.is_zero() else number

    def _check_integer_digits(self, number: decimal.Decimal, allowed: int, column: str) -> None:
        if not number.is_zero() and number.adjusted() >= allowed:
            raise PlaintextTooLongError(
                f"value for encrypted column {column} has more than {allowed} digit(s) "
                f"before the decimal point, the maximum of Numeric({self.precision}, "
                f"{self.scale})"
            )

    def decode(self, data: bytes) -> decimal.Decimal | float:
        number = decimal.Decimal(data.decode("ascii"))
        return number if self.as_decimal else float(number)

    def reencode(self, data: bytes, column: str) -> bytes:
        # Always through Decimal: a float would drop digits of a column that
        # reads floats (asdecimal=False) but stores more than 17 digits.
        return self.encode(decimal.Decimal(data.decode("ascii")), column)

    def max_encoded_length(self) -> int | None:
        if self.precision is None:
            return None
        return self.precision + self._NON_DIGIT_CHARACTERS


class FloatCodec(Codec):
    """IEEE 754 binary64, big-endian: keeps -0.0, infinities and NaN.

    ``Float(asdecimal=True)`` reads back the shortest Decimal that equals the
    stored float.
    """

    tag = ValueTag.FLOAT
    python_types = (float, int)
    _excluded = (bool,)

    def __init__(self, as_decimal: bool = False) -> None:
        self.as_decimal = as_decimal

    def check(self, value: Any, column: str) -> None:
        if self.as_decimal and isinstance(value, decimal.Decimal):
            return
        super().check(value, column)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        try:
            return struct.pack(">d", float(value))
        except OverflowError:
            pass
        raise ValueTypeError(
            f"invalid value for encrypted column {column}: the number is too large for a float"
        )

    def decode(self, data: bytes) -> float | decimal.Decimal:
        number = float(struct.unpack(">d", data)[0])
        return decimal.Decimal(repr(number)) if self.as_decimal else number

    def max_encoded_length(self) -> int | None:
        return 8


class BoolCodec(Codec):
    tag = ValueTag.BOOL
    python_types = (bool,)

    def check(self, value: Any, column: str) -> None:
        if isinstance(value, int) and value in (0, 1):
            return
        super().check(value, column)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        return b"\x01" if value else b"\x00"

    def decode(self, data: bytes) -> bool:
        if data not in (b"\x00", b"\x01"):
            raise ValueError("invalid boolean encoding")
        return data == b"\x01"

    def max_encoded_length(self) -> int | None:
        return 1

    def cardinality(self) -> int | None:
        return 2


def _encode_zone(value: dt.datetime | dt.time) -> str:
    """Return the ``[zone]`` suffix for an IANA zone, or an empty string."""
    if isinstance(value.tzinfo, zoneinfo.ZoneInfo) and value.tzinfo.key:
        return f"[{value.tzinfo.key}]"
    return ""


def _split_zone(text: str) -> tuple[str, zoneinfo.ZoneInfo | None]:
    if text.endswith("]"):
        stamp, _, key = text[:-1].partition("[")
        return stamp, zoneinfo.ZoneInfo(key)
    return text, None


class DateCodec(Codec):
    tag = ValueTag.DATE
    python_types = (dt.date,)
    _excluded = (dt.datetime,)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        return str(value.isoformat()).encode("ascii")

    def decode(self, data: bytes) -> dt.date:
        return dt.date.fromisoformat(data.decode("ascii"))

    def max_encoded_length(self) -> int | None:
        return 10


class _ClockCodec(Codec):
    """ISO 8601 with microseconds and UTC offset, then ``[zone]`` for a ZoneInfo
    and ``;fold=1`` for the second of two ambiguous wall-clock times.

    Shared by datetime and time values, which differ only in their parser.
    """

    _parse: ClassVar[Any]

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        text = str(value.isoformat(timespec="microseconds")) + _encode_zone(value)
        if value.fold:
            text += ";fold=1"
        return text.encode("ascii")

    def decode(self, data: bytes) -> Any:
        text, _, fold = data.decode("ascii").partition(";fold=")
        stamp, zone = _split_zone(text)
        value = type(self)._parse(stamp)
        if zone is not None:
            value = value.replace(tzinfo=zone)
        if fold:
            value = value.replace(fold=int(fold))
        return value


class DateTimeCodec(_ClockCodec):
    """Datetimes encoded as ``_ClockCodec`` does: aware ones only for
    ``DateTime(timezone=True)`` and naive ones only for ``DateTime()``.

    Converting one kind to the other needs a time zone, which the codec
    cannot know, so it raises instead. Each column then contains one kind.
    """

    tag = ValueTag.DATETIME
    python_types = (dt.datetime,)
    _parse = dt.datetime.fromisoformat

    def __init__(self, timezone: bool) -> None:
        self.timezone = timezone

    def check(self, value: Any, column: str) -> None:
        super().check(value, column)
        aware = value.utcoffset() is not None
        if self.timezone and not aware:
            raise ValueTypeError(
                f"invalid value for encrypted column {column}: DateTime(timezone=True) "
                "expects an aware datetime, got a naive one; attach its time zone, for "
                "example with value.replace(tzinfo=datetime.timezone.utc) for a UTC time"
            )
        if aware and not self.timezone:
            raise ValueTypeError(
                f"invalid value for encrypted column {column}: DateTime() without "
                "timezone=True expects a naive datetime, got an aware one; convert it, for "
                "example with value.astimezone(datetime.timezone.utc).replace(tzinfo=None), "
                "or declare the column DateTime(timezone=True)"
            )

    def max_encoded_length(self) -> int | None:
        return 100


class TimeCodec(_ClockCodec):
    tag = ValueTag.TIME
    python_types = (dt.time,)
    _parse = dt.time.fromisoformat

    def max_encoded_length(self) -> int | None:
        return 80


class TimedeltaCodec(Codec):
    """Days, seconds and microseconds as big-endian int32, uint32 and uint32."""

    tag = ValueTag.TIMEDELTA
    python_types = (dt.timedelta,)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        return struct.pack(">iII", value.days, value.seconds, value.microseconds)

    def decode(self, data: bytes) -> dt.timedelta:
        days, seconds, microseconds = struct.unpack(">iII", data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)

    def max_encoded_length(self) -> int | None:
        return 12


class UuidCodec(Codec):
    tag = ValueTag.UUID
    python_types = (uuid.UUID,)

    def __init__(self, as_uuid: bool = True) -> None:
        self.as_uuid = as_uuid

    def check(self, value: Any, column: str) -> None:
        if not self.as_uuid and isinstance(value, str):
            return
        super().check(value, column)

    def encode(self, value: Any, column: str) -> bytes:
        self.check(value, column)
        if isinstance(value, str):
            try:
                value = uuid.UUID(value)
            except ValueError:
                raise ValueTypeError(
                    f"invalid value for encrypted column {column}: not a UUID string"
                ) from None
        return bytes(value.bytes)

    def decode(self, data: bytes) -> uuid.UUID | str:
        value = uuid.UUID(bytes=data)
        return value if self.as_uuid else str(value)

    def max_encoded_length(self) -> int | None:
        return 16


class JsonCodec(Codec):
    """Compact UTF-8 JSON that keeps key order.

    JSON has no tuples and only string keys, so tuples read back as lists and
    non-string keys are rejected rather than silently turned into strings.
    NaN and the infinities are not JSON either (RFC 8259), so they are
    rejected too. Decoding still accepts the ``NaN``, ``Infinity`` and
    ``-Infinity`` tokens that Python's ``json`` module writes by default.
    Python ``None`` is stored as SQL NULL; ``JSON.NULL`` stores the JSON
    ``null`` value, which reads back as ``None``.
    """

    tag = ValueTag.JSON
    python_types = (dict, list, str, int, float, bool)

    def encode(self, value: Any, column: str) -> bytes:
        if value is sa.JSON.NULL:
            return b"null"
        _check_json_value(value, column)
        failure: str | None = None
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            failure = type(exc).__name__
        if failure is not None:
            raise ValueTypeError(
                f"invalid value for encrypted column {column}: not serializable as JSON ({failure})"
            )
        return _encode_utf8(text, column)

    def decode(self, data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))


def _check_json_value(value: Any, column: str) -> None:
    """Reject what ``json.dumps`` would turn into invalid JSON or loop on.

    Raises :class:`ValueTypeError` for non-string object keys, for NaN and
    the infinities, and for a container that contains itself. The messages
    name the column and the problem, never the value.
    """
    stack = [value]
    # Each container is walked once. Meeting one again means either a shared
    # sub-structure, which is valid, or a cycle. The slower path check
    # distinguishes the two, once per value.
    seen: set[int] = set()
    cycles_checked = False
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueTypeError(
                f"invalid value for encrypted column {column}: JSON has no NaN or "
                "Infinity; store such numbers as strings or null"
            )
        if not isinstance(item, (dict, list, tuple)):
            continue
        if id(item) in seen:
            if not cycles_checked:
                _raise_if_cyclic(value, column)
                cycles_checked = True
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ValueTypeError(
                        f"invalid value for encrypted column {column}: JSON object keys "
                        f"must be str, got {type(key).__name__}"
                    )
                stack.append(child)
        else:
            stack.extend(item)


def _raise_if_cyclic(value: Any, column: str) -> None:
    """Raise :class:`ValueTypeError` if a container in ``value`` contains itself."""
    path: set[int] = set()
    # Depth-first walk with explicit enter and exit steps, so that ``path``
    # contains the containers from the root to the current one.
    stack: list[tuple[Any, bool]] = [(value, True)]
    done: set[int] = set()
    while stack:
        item, entering = stack.pop()
        if not entering:
            path.discard(id(item))
            done.add(id(item))
            continue
        if not isinstance(item, (dict, list, tuple)):
            continue
        if id(item) in path:
            raise ValueTypeError(
                f"invalid value for encrypted column {column}: the JSON value contains "
                "itself (a reference cycle)"
            )
        if id(item) in done:
            continue
        path.add(id(item))
        stack.append((item, False))
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, True) for child in children)


class EnumCodec(Codec):
    """The member name for an Enum over a Python enum class, else the string
    itself, in UTF-8.

    Member names are stored rather than the values SQLAlchemy would persist
    (which ``values_callable`` may change), so renaming a member needs a data
    migration but changing ``values_callable`` does not. Strings are accepted
    the way SQLAlchemy accepts them: for an enum class, a string is looked up
    among the persisted values.
    """

    tag = ValueTag.ENUM

    def __init__(self, inner: sa.Enum) -> None:
        self.enum_class: type[enum.Enum] | None = inner.enum_class
        if self.enum_class is not None:
            # SQLAlchemy's own persisted-value to member map, which follows
            # values_callable and omit_aliases exactly as a plain Enum column does.
            lookup = getattr(inner, "_object_lookup", {})
            self.members_by_string: dict[str, enum.Enum] = {
                key: member
                for key, member in lookup.items()
                if isinstance(key, str) and isinstance(member, enum.Enum)
            }
            self.names = frozenset(member.name for member in self.enum_class)
        else:
            self.members_by_string = {}
            self.names = frozenset(inner.enums)

    def encode(self, value: Any, column: str) -> bytes:
        if self.enum_class is not None:
            if isinstance(value, self.enum_class):
                return value.name.encode("utf-8")
            member = self.members_by_string.get(value) if isinstance(value, str) else None
            if member is not None:
                return member.name.encode("utf-8")
        elif isinstance(value, str) and value in self.names:
            return value.encode("utf-8")
        raise ValueTypeError(
            f"invalid value for encrypted column {column}: not a member of its Enum type"
        )

    def decode(self, data: bytes) -> Any:
        name = data.decode("utf-8")
        if name not in self.names:
            raise ValueError("unknown Enum member")
        if self.enum_class is not None:
            return self.enum_class[name]
        return name

    def max_encoded_length(self) -> int | None:
        return max((len(name.encode("utf-8")) for name in self.names), default=0)

    def cardinality(self) -> int | None:
        return len(self.names)


class EnumNameCodec(EnumCodec):
    """Decodes an Enum value to its stored member name, without the Enum type.

    For tools that read values without the application's models: any member
    name decodes, as a str, and nothing can be encoded.
    """

    def __init__(self) -> None:
        self.enum_class = None
        self.members_by_string = {}
        self.names = frozenset()

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8")


# The inner type whose codec decodes each value type tag to its natural
# Python type. Enum needs EnumNameCodec in addition, because the members of
# the application's Enum type are unknown.
_READER_INNER_TYPES: dict[ValueTag, type[TypeEngine[Any]]] = {
    ValueTag.STR: sa.Text,
    ValueTag.BYTES: sa.LargeBinary,
    ValueTag.INT: sa.BigInteger,
    ValueTag.DECIMAL: sa.Numeric,
    ValueTag.FLOAT: sa.Float,
    ValueTag.BOOL: sa.Boolean,
    ValueTag.DATE: sa.Date,
    ValueTag.DATETIME: sa.DateTime,
    ValueTag.TIME: sa.Time,
    ValueTag.TIMEDELTA: sa.Interval,
    ValueTag.UUID: sa.Uuid,
    ValueTag.JSON: sa.JSON,
    ValueTag.ENUM: sa.Enum,
}


def reader_inner_type(tag: ValueTag) -> TypeEngine[Any]:
    """Return an inner type that decodes values of ``tag``; see :func:`type_for_header`."""
    return _READER_INNER_TYPES[tag]()


# Deterministic columns need a bounded stored width; integers get the range
# of a SQL BIGINT.
DETERMINISTIC_INT_BYTES = 8


def codec_for(inner: TypeEngine[Any], column: str, deterministic: bool = False) -> Codec:
    """Choose the codec for an inner SQLAlchemy type.

    Order matters: Enum is a String, Float is a Numeric, and both must be
    matched before their base classes.
    """
    if isinstance(inner, sa.Enum):
        return EnumCodec(inner)
    if isinstance(inner, sa.String):
        return StrCodec(inner.length)
    if isinstance(inner, sa.LargeBinary):
        return BytesCodec(inner.length)
    if isinstance(inner, sa.Boolean):
        return BoolCodec()
    if isinstance(inner, sa.Integer):
        return IntCodec(DETERMINISTIC_INT_BYTES if deterministic else None)
    if isinstance(inner, sa.Float):
        return FloatCodec(as_decimal=bool(inner.asdecimal))
    if isinstance(inner, sa.Numeric):
        return DecimalCodec(
            as_decimal=bool(inner.asdecimal), precision=inner.precision, scale=inner.scale
        )
    if isinstance(inner, sa.DateTime):
        return DateTimeCodec(timezone=bool(inner.timezone))
    if isinstance(inner, sa.Date):
        return DateCodec()
    if isinstance(inner, sa.Time):
        return TimeCodec()
    if isinstance(inner, sa.Interval):
        return TimedeltaCodec()
    if isinstance(inner, sa.Uuid):
        return UuidCodec(as_uuid=bool(inner.as_uuid))
    if isinstance(inner, sa.JSON):
        return JsonCodec()
    raise ConfigurationError(
        f"encrypted column {column}: inner type {type(inner).__name__} is not supported; "
        "use String, Text, LargeBinary, Integer, Numeric, Float, Boolean, Date, DateTime, "
        "Time, Interval, Uuid, JSON or Enum"
    )
