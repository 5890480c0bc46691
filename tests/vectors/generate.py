"""Write ``format_v1.json``, the golden vectors of ciphertext format v1.

Run once, from the repository root, when the vectors were first made::

    .venv/bin/python -m tests.vectors.generate

The tests never run this: they read the committed file, so a change that
alters stored bytes fails them. GCM nonces are fixed here by replacing
``os.urandom`` inside ``sqlalchemy_encrypted._aead`` only.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import types
import uuid
import zoneinfo
from typing import Any

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, _aead

from .spec import (
    GCM_KEY,
    GCM_KEY_ID,
    INNER_TYPES,
    KEY_VERSION,
    SIV_KEY,
    SIV_KEY_ID,
    TENANT,
    VECTORS_FILE,
    Color,
    VectorKeyring,
    value_to_json,
)

# (name, column identity, inner type, value, deterministic too)
VALUES: list[tuple[str, str, str, Any, bool]] = [
    ("fixture email", "persons.email", "String(100)", "fixture@example.test", True),
    ("fixture name", "persons.name", "String(100)", "fixture@example.test", False),
    ("empty string", "persons.name", "String(100)", "", True),
    ("non-ASCII string", "persons.name", "String(100)", "Zo\u00eb \U0001f600", True),
    ("pad-like string", "persons.name", "String(100)", "pad\x00 *", True),
    ("text", "notes.body", "Text", "line one\nline two", False),
    ("bytes", "files.blob", "LargeBinary(64)", b"\x00\x01\xfe\xff", True),
    ("integer", "accounts.balance", "BigInteger", -1234567890123, True),
    ("integer beyond 64 bits", "accounts.big", "BigInteger", 2**100 + 7, False),
    ("decimal", "accounts.amount", "Numeric(20, 6)", decimal.Decimal("12.500000"), True),
    ("float", "readings.value", "Float", -0.1, True),
    ("boolean", "flags.active", "Boolean", True, False),
    ("date", "persons.birth_date", "Date", dt.date(1985, 7, 4), True),
    ("naive datetime", "events.at", "DateTime", dt.datetime(2024, 3, 1, 12, 30, 5, 250), True),
    (
        "zoned datetime",
        "events.at_local",
        "DateTime(timezone=True)",
        dt.datetime(2021, 11, 7, 1, 30, tzinfo=zoneinfo.ZoneInfo("America/New_York"), fold=1),
        True,
    ),
    (
        "offset datetime",
        "events.at_offset",
        "DateTime(timezone=True)",
        dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        True,
    ),
    ("time", "shifts.start", "Time", dt.time(8, 15, 0, 1), True),
    (
        "interval",
        "shifts.length",
        "Interval",
        dt.timedelta(days=-1, seconds=5, microseconds=7),
        True,
    ),
    (
        "uuid",
        "persons.external_id",
        "Uuid",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        True,
    ),
    ("json object", "persons.profile", "JSON", {"a": 1}, False),
    ("json nested", "persons.settings", "JSON", {"b": [1.5, True, None, {"c": "\u00e9"}]}, False),
    ("enum", "persons.color", "Enum(Color)", Color.GREEN, False),
    ("string enum", "invoices.state", "Enum('draft', 'sent')", "sent", False),
]


def _nonce(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()[:12]


def _seal(kind: Any, name: str, identity: str, inner: str, value: Any) -> dict[str, Any]:
    column_type = kind(INNER_TYPES[inner](), context=identity, keyring=VectorKeyring())
    nonce = _nonce(name)
    original = _aead.os
    _aead.os = types.SimpleNamespace(urandom=lambda size: nonce)  # type: ignore[assignment]
    try:
        envelope = column_type.seal(value, tenant_id=TENANT)
    finally:
        _aead.os = original
    deterministic = kind is DeterministicEncrypted
    return {
        "name": name,
        "algorithm": "AES-256-SIV" if deterministic else "AES-256-GCM",
        "column": identity,
        "tenant": TENANT,
        "inner_type": inner,
        "value": value_to_json(value),
        "plaintext": column_type.encode_plaintext(value).hex(),
        "nonce": None if deterministic else nonce.hex(),
        "envelope": envelope.hex(),
    }


def build() -> dict[str, Any]:
    vectors = []
    for name, identity, inner, value, deterministic in VALUES:
        vectors.append(_seal(Encrypted, name, identity, inner, value))
        if deterministic:
            vectors.append(_seal(DeterministicEncrypted, name, identity, inner, value))
    keys = {
        str(GCM_KEY_ID): {"algorithm": "AES-256-GCM", "version": KEY_VERSION, "key": GCM_KEY.hex()},
        str(SIV_KEY_ID): {"algorithm": "AES-256-SIV", "version": KEY_VERSION, "key": SIV_KEY.hex()},
    }
    return {"format_version": 1, "tenant": TENANT, "keys": keys, "vectors": vectors}


def main() -> None:
    data = build()
    VECTORS_FILE.write_text(json.dumps(data, indent=2, ensure_ascii=True) + "\n")
    print(f"wrote {len(data['vectors'])} vectors to {VECTORS_FILE}")


if __name__ == "__main__":
    main()
