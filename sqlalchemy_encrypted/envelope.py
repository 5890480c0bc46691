"""Ciphertext format v1: the envelope header and the associated data.

Layout (all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       1     algorithm: 0x01 AES-256-GCM, 0x02 AES-256-SIV
    2       1     flags, 0x00 in v1
    3       1     value type tag of the plaintext codec
    4       16    key id, the UUID of the DEK
    20      4     key version, uint32
    24      ...   GCM: nonce (12) | ciphertext | tag (16)
                  SIV: synthetic IV (16) | ciphertext

The whole header is authenticated as part of the AAD, so changing any header
byte makes decryption fail. ``docs/format.md`` is the full specification.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

from .errors import StorageFormatError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_VERSION_OFFSET",
    "Algorithm",
    "EnvelopeHeader",
    "build_aad",
    "parse_header",
]

FORMAT_VERSION = 0x01
HEADER_SIZE = 24
KEY_ID_OFFSET = 4
KEY_VERSION_OFFSET = 20
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
SIV_TAG_SIZE = 16

_HEADER = struct.Struct(">BBBB16sI")


class Algorithm(enum.IntEnum):
    """Algorithm ids stored at offset 1 of the envelope."""

    AES_256_GCM = 0x01
    AES_256_SIV = 0x02


# Smallest valid envelope per algorithm: GCM may seal an empty plaintext, and
# SIV always seals at least the one-byte value type tag.
MIN_ENVELOPE_SIZE = {
    Algorithm.AES_256_GCM: HEADER_SIZE + GCM_NONCE_SIZE + GCM_TAG_SIZE,
    Algorithm.AES_256_SIV: HEADER_SIZE + SIV_TAG_SIZE + 1,
}


@dataclass(frozen=True)
class EnvelopeHeader:
    """The fixed 24-byte header of an envelope, holding no secret."""

    algorithm: Algorithm
    value_tag: int
    key_id: uuid.UUID
    key_version: int
    flags: int = 0
    format_version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.format_version,
            self.algorithm,
            self.flags,
            self.value_tag,
            self.key_id.bytes,
            self.key_version,
        )


def parse_header(data: bytes, where: str = "value") -> EnvelopeHeader:
    """Parse and check the header of a stored envelope.

    Raises :class:`StorageFormatError` for a value that is too short, has an
    unknown format version, algorithm id or flags. Nothing is decrypted here,
    so a parsed header is not yet authenticated.
    """
    if len(data) < HEADER_SIZE:
        raise StorageFormatError(
            f"{where}: stored value of {len(data)} bytes is too short to be an envelope"
        )
    version, algorithm, flags, value_tag, key_id, key_version = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise StorageFormatError(f"{where}: unknown envelope format version {version}")
    try:
        known_algorithm = Algorithm(algorithm)
    except ValueError:
        raise StorageFormatError(f"{where}: unknown algorithm id {algorithm}") from None
    if flags != 0:
        raise StorageFormatError(f"{where}: unknown envelope flags {flags:#04x}")
    if len(data) < MIN_ENVELOPE_SIZE[known_algorithm]:
        raise StorageFormatError(f"{where}: stored value of {len(data)} bytes is truncated")
    return EnvelopeHeader(
        algorithm=known_algorithm,
        value_tag=value_tag,
        key_id=uuid.UUID(bytes=key_id),
        key_version=key_version,
        flags=flags,
        format_version=version,
    )


def _length_prefixed(field: bytes) -> bytes:
    return struct.pack(">I", len(field)) + field


def build_aad(header: bytes, column_identity: str, tenant_id: str) -> bytes:
    """Build the associated data: the header, then the length-prefixed column
    identity and tenant id, both UTF-8.

    Length prefixes keep the encoding unambiguous: ``("a.b", "c")`` and
    ``("a.bc", "")`` give different AAD.
    """
    return (
        header
        + _length_prefixed(column_identity.encode("utf-8"))
        + _length_prefixed(tenant_id.encode("utf-8"))
    )
