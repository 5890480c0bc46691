"""Golden vectors of ciphertext format v1.

``tests/vectors/format_v1.json`` contains envelopes made once with fixed keys
and fixed GCM nonces. Every later version must decrypt them to the same
values, and seal them to the same bytes, or stored data would be lost.
"""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, _aead

from .helpers import assert_same_value
from .vectors.spec import INNER_TYPES, VECTORS_FILE, VectorKeyring, value_from_json

DATA = json.loads(VECTORS_FILE.read_text())
VECTORS = DATA["vectors"]
IDS = [f"{vector['algorithm']}: {vector['name']}" for vector in VECTORS]


def _column_type(vector: dict[str, Any]) -> Any:
    kind = DeterministicEncrypted if vector["algorithm"] == "AES-256-SIV" else Encrypted
    options: dict[str, Any] = {}
    if kind is DeterministicEncrypted and vector["inner_type"] in ("Boolean", "Enum(Color)"):
        options["allow_low_cardinality"] = True
    inner = INNER_TYPES[vector["inner_type"]]()
    return kind(inner, context=vector["column"], keyring=VectorKeyring(), **options)


def test_vectors_cover_every_algorithm_and_value_type() -> None:
    assert DATA["format_version"] == 1
    algorithms = {vector["algorithm"] for vector in VECTORS}
    assert algorithms == {"AES-256-GCM", "AES-256-SIV"}
    tags = {bytes.fromhex(vector["envelope"])[3] for vector in VECTORS}
    assert tags == set(range(0x01, 0x0E))


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_decrypts_to_its_value(vector: dict[str, Any]) -> None:
    column_type = _column_type(vector)
    expected = value_from_json(vector["value"])
    assert_same_value(column_type.decrypt(bytes.fromhex(vector["envelope"])), expected)


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_seals_to_the_same_bytes(
    vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIV needs no nonce; for GCM the recorded nonce is fed to the sealer."""
    column_type = _column_type(vector)
    if vector["nonce"] is not None:
        nonce = bytes.fromhex(vector["nonce"])
        monkeypatch.setattr(_aead, "new_gcm_nonce", lambda: nonce)
    envelope = column_type.seal(value_from_json(vector["value"]), tenant_id=vector["tenant"])
    assert envelope.hex() == vector["envelope"]


# An independent reader, written from docs/format.md alone: it shares no code
# with the package.


def _read_envelope(envelope: bytes, keys: dict[str, Any], column: str, tenant: str) -> bytes:
    version, algorithm, flags, value_tag = envelope[0], envelope[1], envelope[2], envelope[3]
    key_id = uuid.UUID(bytes=envelope[4:20])
    (key_version,) = struct.unpack(">I", envelope[20:24])
    assert version == 1
    assert flags == 0
    key = keys[str(key_id)]
    assert key["version"] == key_version
    identity = column.encode("utf-8")
    tenant_bytes = tenant.encode("utf-8")
    aad = (
        envelope[:24]
        + struct.pack(">I", len(identity))
        + identity
        + struct.pack(">I", len(tenant_bytes))
        + tenant_bytes
    )
    if algorithm == 0x01:
        nonce, sealed = envelope[24:36], envelope[36:]
        return AESGCM(bytes.fromhex(key["key"])).decrypt(nonce, sealed, aad)
    assert algorithm == 0x02
    plaintext = AESSIV(bytes.fromhex(key["key"])).decrypt(envelope[24:], [aad])
    assert plaintext[0] == value_tag
    return plaintext[1:]


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_independent_reader_decrypts_vector(vector: dict[str, Any]) -> None:
    envelope = bytes.fromhex(vector["envelope"])
    plaintext = _read_envelope(envelope, DATA["keys"], vector["column"], vector["tenant"])
    assert plaintext.hex() == vector["plaintext"]
    value = vector["value"]
    if vector["nonce"] is not None:
        assert envelope[24:36].hex() == vector["nonce"]
    if value["kind"] == "str":
        assert plaintext.decode("utf-8") == value["value"]
    elif value["kind"] == "int":
        assert int.from_bytes(plaintext, "big", signed=True) == int(value["value"])
    elif value["kind"] == "float":
        assert struct.unpack(">d", plaintext)[0] == float.fromhex(value["value"])
    elif value["kind"] == "uuid":
        assert uuid.UUID(bytes=plaintext) == uuid.UUID(value["value"])
    elif value["kind"] == "json":
        assert json.loads(plaintext) == value["value"]


def test_independent_reader_rejects_other_tenant() -> None:
    vector = next(v for v in VECTORS if v["algorithm"] == "AES-256-GCM")
    envelope = bytes.fromhex(vector["envelope"])
    with pytest.raises(InvalidTag):
        _read_envelope(envelope, DATA["keys"], vector["column"], "t-other")
