"""SQL expressions that read the envelope header of stored values.

Every envelope starts with a fixed 24-byte header (format version,
algorithm, flags, value type tag, key id, key version). For one column and
one DEK the header is the same for every value. Grouping rows by their first
24 bytes therefore yields one group per DEK in use, and filtering on those
bytes selects the values of given DEKs, without decrypting anything.

Columns stored as base64 text work the same way: 24 bytes encode to exactly
32 base64 characters, so the first 32 characters are the header.

Both ``substr`` and ``length`` have the same meaning on PostgreSQL ``bytea``
and SQLite ``BLOB`` (bytes, 1-based) and on text columns (characters).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from ..envelope import FORMAT_VERSION, HEADER_SIZE, Algorithm, EnvelopeHeader, parse_header
from ..errors import StorageFormatError

__all__ = [
    "HeaderPrefix",
    "decode_prefix",
    "envelope_condition",
    "header_prefix",
    "prefix_length",
    "prefix_of",
]

# The stored form of a header: bytes for binary columns, str for base64 ones.
HeaderPrefix = bytes | str

_BASE64_HEADER_SIZE = 4 * HEADER_SIZE // 3

# First three header bytes of every v1 envelope: format version, algorithm, flags 0.
_MARKERS = [bytes((FORMAT_VERSION, algorithm, 0)) for algorithm in Algorithm]
_BASE64_MARKERS = [base64.b64encode(marker).decode("ascii") for marker in _MARKERS]


def prefix_length(is_base64: bool) -> int:
    """Return the length of the stored header: bytes, or base64 characters."""
    return _BASE64_HEADER_SIZE if is_base64 else HEADER_SIZE


def header_prefix(column: ColumnElement[Any], is_base64: bool) -> ColumnElement[Any]:
    """Return ``substr(column, 1, n)``: the stored header of each value."""
    return sa.func.substr(
        column,
        sa.literal_column("1"),
        sa.literal_column(str(prefix_length(is_base64))),
        type_=column.type,
    )


def envelope_condition(column: ColumnElement[Any], is_base64: bool) -> ColumnElement[bool]:
    """Return a condition true for stored values that start like a v1 envelope.

    Legacy plaintext in an encrypted column fails it, so it is counted apart
    instead of producing one group per distinct value.
    """
    markers: list[Any] = list(_BASE64_MARKERS if is_base64 else _MARKERS)
    marker_length = 4 if is_base64 else 3
    marker = sa.func.substr(
        column, sa.literal_column("1"), sa.literal_column(str(marker_length)), type_=column.type
    )
    return sa.and_(
        marker.in_(markers),
        sa.func.length(column) >= sa.literal_column(str(prefix_length(is_base64))),
    )


def decode_prefix(prefix: Any, is_base64: bool) -> EnvelopeHeader | None:
    """Parse a stored header as returned by the database, or return None if
    it is not a valid v1 header."""
    if isinstance(prefix, memoryview | bytearray):
        prefix = bytes(prefix)
    try:
        if is_base64:
            if not isinstance(prefix, str):
                return None
            data = base64.b64decode(prefix.encode("ascii"), validate=True)
        else:
            if not isinstance(prefix, bytes):
                return None
            data = prefix
        if len(data) != HEADER_SIZE:
            return None
        return _parse_header_only(data)
    except (StorageFormatError, binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _parse_header_only(data: bytes) -> EnvelopeHeader:
    # parse_header also checks the minimum envelope size for the algorithm, so
    # pad the bare header with zero bytes standing in for the body.
    return parse_header(data + bytes(64), "stored header")


def prefix_of(stored: Any, is_base64: bool) -> HeaderPrefix | None:
    """Return the stored header of one raw value, in the form SQL returns it."""
    if stored is None:
        return None
    length = prefix_length(is_base64)
    if is_base64:
        return stored[:length] if isinstance(stored, str) else None
    if isinstance(stored, memoryview | bytearray):
        stored = bytes(stored)
    return stored[:length] if isinstance(stored, bytes) else None
