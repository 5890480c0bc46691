"""Storage of envelopes in binary columns or as base64 text, per dialect.

Binary storage (the default) maps to BYTEA on PostgreSQL, BLOB on SQLite and
VARBINARY(n) on MySQL and MariaDB, sized from the inner type's maximum
stored length. Base64 storage maps to VARCHAR(n) or unbounded text.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.type_api import TypeEngine

from .envelope import FORMAT_VERSION, MIN_ENVELOPE_SIZE, Algorithm
from .errors import StorageFormatError

__all__ = [
    "StorageMode",
    "coerce_stored",
    "dialect_impl",
    "explain_format_error",
    "from_base64",
    "impl_for",
    "is_envelope_start",
    "legacy_text",
    "stored_length",
    "to_base64",
]

StorageMode = Literal["binary", "base64"]

# MySQL limits: VARBINARY stores at most 65,535 bytes. Base64 VARCHAR columns
# stop at 16,383 characters, the limit of a utf8mb4 VARCHAR, although their
# ascii charset would allow more, because the row size limit (65,535 bytes)
# is shared by all of a row's VARCHAR and VARBINARY columns.
_MYSQL_MAX_VARBINARY = 65_535
_MYSQL_MAX_VARCHAR = 16_383

_ALGORITHM_IDS = frozenset(int(algorithm) for algorithm in Algorithm)


def impl_for(storage: StorageMode) -> TypeEngine[Any]:
    return sa.Text() if storage == "base64" else sa.LargeBinary()


def stored_length(envelope_size: int, storage: StorageMode) -> int:
    """Return the stored size of an envelope: bytes, or base64 characters."""
    if storage == "base64":
        return 4 * ((envelope_size + 2) // 3)
    return envelope_size


def dialect_impl(dialect: Dialect, storage: StorageMode, length: int | None) -> TypeEngine[Any]:
    """Return the column type that stores envelopes of at most ``length`` on ``dialect``.

    Generic types are returned as they are, not through
    ``dialect.type_descriptor()``: DDL renders the returned type, and
    PostgreSQL's descriptor for ``Text`` would render as VARCHAR.
    """
    if dialect.name in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        if storage == "base64":
            # Base64 is ASCII and case-sensitive: a binary ASCII collation
            # stores one byte per character and compares exactly.
            if length is not None and length <= _MYSQL_MAX_VARCHAR:
                return mysql.VARCHAR(length, charset="ascii", collation="ascii_bin")
            return mysql.LONGTEXT(charset="ascii", collation="ascii_bin")
        if length is not None and length <= _MYSQL_MAX_VARBINARY:
            return mysql.VARBINARY(length)
        return mysql.LONGBLOB()
    if storage == "base64":
        return sa.String(length) if length is not None else sa.Text()
    return sa.LargeBinary(length)


def to_base64(envelope: bytes) -> str:
    return base64.b64encode(envelope).decode("ascii")


def from_base64(text: str | bytes) -> bytes | None:
    """Decode canonical base64, or return None.

    Non-canonical text (unused low bits set in the last character) decodes
    to the same bytes as the canonical form. It is rejected so that each
    stored value has exactly one spelling, which deterministic lookups
    compare.
    """
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    canonical = base64.b64encode(decoded)
    if canonical != (text.encode("ascii") if isinstance(text, str) else bytes(text)):
        return None
    return decoded


def decode_canonical_base64(text: str) -> bytes | None:
    """Decode ``text`` if it is canonical base64, else return None.

    The same rule as :func:`from_base64`, for the read path of base64
    columns: the decoded bytes must encode back to exactly ``text``.
    """
    try:
        encoded = text.encode("ascii")
        decoded = binascii.a2b_base64(encoded)
    except (UnicodeEncodeError, binascii.Error):
        return None
    if binascii.b2a_base64(decoded, newline=False) != encoded:
        return None
    return decoded


def is_envelope_start(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == FORMAT_VERSION and data[1] in _ALGORITHM_IDS


def coerce_stored(value: Any, storage: StorageMode, identity: str) -> bytes:
    """Turn what the driver returned into envelope bytes.

    Raises :class:`StorageFormatError` for an empty value, for text where the
    column stores bytes, for text that is not base64, and for any other type.
    """
    if isinstance(value, (bytes, bytearray, str, memoryview)) and len(value) == 0:
        raise StorageFormatError(
            f"encrypted column {identity} contains an empty value, which is not a valid "
            "envelope: the library stores '' and b'' as envelopes, so this value was written "
            "around the column type (raw SQL, or a plaintext column before encrypt_column); "
            "set it to NULL, or seal the intended value with the column type"
        )
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if storage == "base64" and data:
            # A base64 column created with a binary database type returns
            # the base64 text as bytes.
            decoded = from_base64(data)
            data = decoded if decoded is not None else data
    elif isinstance(value, str):
        if storage != "base64":
            raise _text_in_binary_column(value, identity)
        decoded = from_base64(value)
        if decoded is None:
            raise StorageFormatError(
                f"encrypted column {identity} contains a value that is not base64: it may be "
                "plaintext written outside this library; check the migration state of "
                "this column"
            )
        data = decoded
    else:
        raise StorageFormatError(
            f"encrypted column {identity} returned a {type(value).__name__}, "
            "not bytes: check the column's storage type"
        )
    return data


def _text_in_binary_column(value: str, identity: str) -> StorageFormatError:
    decoded = from_base64(value)
    if decoded is not None and is_envelope_start(decoded):
        return StorageFormatError(
            f"encrypted column {identity} returned str where bytes were expected, and the "
            "text is a base64 envelope: check that the database column has a binary type "
            "(BYTEA, BLOB, VARBINARY) or declare the type with storage='base64'"
        )
    return StorageFormatError(
        f"encrypted column {identity} returned str where bytes were expected, and the value "
        "looks like plaintext, not an envelope: the column may have been decrypted by a "
        "migration; check the migration state of this column and its storage type "
        "(BYTEA, BLOB, VARBINARY)"
    )


def _looks_like_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\t\n\r" for char in text)


def explain_format_error(
    data: bytes, error: StorageFormatError, identity: str
) -> StorageFormatError:
    """Return a clearer error for bytes that failed the header check because
    they are plaintext rather than a damaged envelope."""
    if not is_envelope_start(data) and _looks_like_text(data):
        return StorageFormatError(
            f"encrypted column {identity} contains a value that looks like plaintext, not an "
            "envelope: the column may have been decrypted by a migration; check the "
            "migration state of this column"
        )
    return error


# Characters of base64 text in either alphabet, with padding and line breaks.
_LOOSE_BASE64 = re.compile(r"[A-Za-z0-9+/_=\s-]+")
_URL_SAFE = str.maketrans("-_", "+/")
# Base64 characters of the shortest envelope (an AES-SIV value of one byte).
_MIN_ENVELOPE_TEXT = (min(MIN_ENVELOPE_SIZE.values()) * 4) // 3


def _spells_an_envelope(text: str) -> bool:
    """Return True for text that is an envelope in non-canonical base64:
    wrapped, URL-safe, or with other padding. Such a value was damaged or
    rewritten, and is not legacy plaintext."""
    if len(text) < _MIN_ENVELOPE_TEXT or not _LOOSE_BASE64.fullmatch(text):
        return False
    compact = "".join(text.split()).translate(_URL_SAFE).rstrip("=")
    try:
        start = base64.b64decode(compact[:4])
    except binascii.Error:
        return False
    return is_envelope_start(start)


def legacy_text(stored: Any) -> str | None:
    """Return ``stored`` as legacy plaintext, or None if it may be an envelope.

    Bytes starting with the format version byte are treated as a damaged
    envelope, never as plaintext.
    """
    if isinstance(stored, str):
        decoded = from_base64(stored)
        if decoded is not None and is_envelope_start(decoded):
            return None
        if _spells_an_envelope(stored):
            return None
        return stored
    if not isinstance(stored, (bytes, bytearray, memoryview)):
        return None
    data = bytes(stored)
    if data[:1] == bytes((FORMAT_VERSION,)):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
