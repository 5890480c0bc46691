"""The ``inspect`` command: decode the header of a stored value without keys."""

from __future__ import annotations

import base64
import binascii
import re
import sys
from typing import Any

import click

from ._cli_context import print_json, render_table
from .codecs import ValueTag
from .envelope import GCM_NONCE_SIZE, GCM_TAG_SIZE, HEADER_SIZE, SIV_TAG_SIZE, Algorithm
from .envelope import parse_header as parse_envelope_header
from .errors import StorageFormatError

__all__ = ["inspect"]

_HEX = re.compile(r"[0-9a-fA-F]+")


def _decode_stored(text: str) -> bytes:
    """Decode a stored value pasted as hex (``01...``, ``\\x01...``, ``0x01...``)
    or base64. Base64 envelopes start with ``AQ``, which is not hex."""
    value = text.strip()
    if value.lower().startswith(("\\x", "0x")):
        value = value[2:]
    elif not (value.startswith("01") and _HEX.fullmatch(value)):
        return _b64(value)
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise StorageFormatError("the value is not valid hex") from None


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise StorageFormatError(
            "the value is neither hex (01..., \\x01... or 0x01...) nor base64"
        ) from None


def _describe(data: bytes) -> dict[str, Any]:
    header = parse_envelope_header(data, "value")
    try:
        tag_name = ValueTag(header.value_tag).name
    except ValueError:
        tag_name = "unknown"
    body = data[HEADER_SIZE:]
    described: dict[str, Any] = {
        "format_version": header.format_version,
        "algorithm": header.algorithm.name,
        "flags": header.flags,
        "value_type": tag_name,
        "value_tag": header.value_tag,
        "key_id": str(header.key_id),
        "key_version": header.key_version,
        "length": len(data),
    }
    if header.algorithm is Algorithm.AES_256_GCM:
        described["nonce"] = body[:GCM_NONCE_SIZE].hex()
        described["ciphertext_length"] = len(body) - GCM_NONCE_SIZE - GCM_TAG_SIZE
    else:
        described["synthetic_iv"] = body[:SIV_TAG_SIZE].hex()
        described["ciphertext_length"] = len(body) - SIV_TAG_SIZE
    return described


@click.command()
@click.argument("value")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(value: str, as_json: bool) -> None:
    """Decode the header of a stored VALUE (hex or base64; - reads stdin).

    Needs no key: it shows the algorithm, value type, key id and key version.
    """
    if value == "-":
        value = sys.stdin.read()
    described = _describe(_decode_stored(value))
    if as_json:
        print_json(described)
        return
    rows = [(name.replace("_", " "), described[name]) for name in described]
    click.echo(render_table(("FIELD", "VALUE"), rows))
