"""What the golden vectors mean: keys, inner types and the JSON form of values.

Shared by ``generate.py``, which wrote ``format_v1.json`` once, and by the
tests, which only read that file.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
import zoneinfo
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sqlalchemy_encrypted import DataKey, KeyPurpose
from sqlalchemy_encrypted._aead import AeadCipher
from sqlalchemy_encrypted.errors import KeyNotFoundError

VECTORS_FILE = Path(__file__).with_name("format_v1.json")

TENANT = "t-fixture"
GCM_KEY = bytes(range(32))
SIV_KEY = bytes(range(64))
GCM_KEY_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
SIV_KEY_ID = uuid.UUID("00000000-0000-4000-8000-000000000002")
KEY_VERSION = 1


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


INNER_TYPES: dict[str, Callable[[], Any]] = {
    "String(100)": lambda: sa.String(100),
    "Text": sa.Text,
    "LargeBinary(64)": lambda: sa.LargeBinary(64),
    "BigInteger": sa.BigInteger,
    "Numeric(20, 6)": lambda: sa.Numeric(20, 6),
    "Float": sa.Float,
    "Boolean": sa.Boolean,
    "Date": sa.Date,
    "DateTime": sa.DateTime,
    "DateTime(timezone=True)": lambda: sa.DateTime(timezone=True),
    "Time": sa.Time,
    "Interval": sa.Interval,
    "Uuid": sa.Uuid,
    "JSON": sa.JSON,
    "Enum(Color)": lambda: sa.Enum(Color),
    "Enum('draft', 'sent')": lambda: sa.Enum("draft", "sent", name="state"),
}


def value_to_json(value: Any) -> dict[str, Any]:
    """Describe a Python value in JSON, exactly enough to rebuild it."""
    if isinstance(value, enum.Enum):
        return {"kind": "enum", "name": value.name}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": str(value)}
    if isinstance(value, float):
        return {"kind": "float", "value": value.hex()}
    if isinstance(value, decimal.Decimal):
        return {"kind": "decimal", "value": str(value)}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    if isinstance(value, bytes):
        return {"kind": "bytes", "value": value.hex()}
    if isinstance(value, dt.datetime | dt.time):
        zone = value.tzinfo.key if isinstance(value.tzinfo, zoneinfo.ZoneInfo) else None
        plain = value.replace(tzinfo=None) if zone else value
        kind = "datetime" if isinstance(value, dt.datetime) else "time"
        return {"kind": kind, "iso": plain.isoformat(), "zone": zone, "fold": value.fold}
    if isinstance(value, dt.date):
        return {"kind": "date", "iso": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {
            "kind": "timedelta",
            "value": [value.days, value.seconds, value.microseconds],
        }
    if isinstance(value, uuid.UUID):
        return {"kind": "uuid", "value": str(value)}
    return {"kind": "json", "value": value}


def value_from_json(data: dict[str, Any]) -> Any:
    kind = data["kind"]
    if kind == "enum":
        return Color[data["name"]]
    if kind == "int":
        return int(data["value"])
    if kind == "float":
        return float.fromhex(data["value"])
    if kind == "decimal":
        return decimal.Decimal(data["value"])
    if kind == "bytes":
        return bytes.fromhex(data["value"])
    if kind in ("datetime", "time"):
        parse = dt.datetime.fromisoformat if kind == "datetime" else dt.time.fromisoformat
        value = parse(data["iso"])
        if data["zone"]:
            value = value.replace(tzinfo=zoneinfo.ZoneInfo(data["zone"]))
        return value.replace(fold=data["fold"])
    if kind == "date":
        return dt.date.fromisoformat(data["iso"])
    if kind == "timedelta":
        days, seconds, microseconds = data["value"]
        return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
    if kind == "uuid":
        return uuid.UUID(data["value"])
    return data["value"]


class VectorKeyring:
    """A key provider holding only the two fixed vector keys."""

    def __init__(self) -> None:
        self.keys = {
            GCM_KEY_ID: DataKey(
                GCM_KEY_ID,
                TENANT,
                KeyPurpose.RANDOMIZED,
                KEY_VERSION,
                AeadCipher(KeyPurpose.RANDOMIZED.algorithm, GCM_KEY),
            ),
            SIV_KEY_ID: DataKey(
                SIV_KEY_ID,
                TENANT,
                KeyPurpose.DETERMINISTIC,
                KEY_VERSION,
                AeadCipher(KeyPurpose.DETERMINISTIC.algorithm, SIV_KEY),
            ),
        }

    def active_key(self, tenant_id: str, purpose: KeyPurpose) -> DataKey:
        key_id = GCM_KEY_ID if purpose is KeyPurpose.RANDOMIZED else SIV_KEY_ID
        return self.keys[key_id]

    def key_by_id(self, key_id: uuid.UUID, expected_tenant: str | None = None) -> DataKey:
        if key_id not in self.keys:
            raise KeyNotFoundError(f"key id {key_id} is not a vector key")
        return self.keys[key_id]

    def decryptable_keys(self, tenant_id: str, purpose: KeyPurpose) -> Sequence[DataKey]:
        return [self.active_key(tenant_id, purpose)]
