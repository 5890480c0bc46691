"""Helpers shared by the column type tests."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import math
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event


class StatementCounter:
    """Counts the statements an engine sends to the database."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    @property
    def count(self) -> int:
        return len(self.statements)


@contextlib.contextmanager
def count_statements(engine: sa.Engine) -> Iterator[StatementCounter]:
    counter = StatementCounter()

    def _before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counter.statements.append(statement)

    event.listen(engine, "before_cursor_execute", _before)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", _before)


def secret_forms(secret: str | bytes) -> list[str]:
    """Return the ways a secret could show up in text: as is, hex and base64."""
    raw = secret.encode("utf-8", "surrogatepass") if isinstance(secret, str) else secret
    forms = [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode("ascii"), repr(raw)]
    if isinstance(secret, str):
        forms.append(secret)
    return [form for form in forms if len(form) >= 4]


def exception_texts(exc: BaseException) -> list[str]:
    """Return str() and repr() of ``exc`` and of every exception chained to it."""
    texts = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), *getattr(current, "__notes__", [])]
        texts += [repr(arg) for arg in current.args]
        pending += [current.__cause__, current.__context__]
    return texts


def assert_no_secret(texts: Iterable[str], *secrets: str | bytes) -> None:
    joined = "\n".join(texts)
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in joined, f"secret form {form[:8]!r}... found in output"


def assert_same_value(actual: Any, expected: Any) -> None:
    """Assert equal value and equal Python type, recursively, with NaN,
    signed zero, Decimal scale and time zones compared exactly."""
    assert type(actual) is type(expected), f"{type(actual)} is not {type(expected)}"
    if isinstance(expected, float):
        assert struct.pack(">d", actual) == struct.pack(">d", expected) or (
            math.isnan(actual) and math.isnan(expected)
        )
    elif isinstance(expected, decimal.Decimal):
        assert actual.as_tuple() == expected.as_tuple()
    elif isinstance(expected, (dt.datetime, dt.time)):
        assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None)
        assert actual.tzinfo == expected.tzinfo
        assert type(actual.tzinfo) is type(expected.tzinfo)
        assert actual.fold == expected.fold
        if isinstance(expected, dt.datetime):
            assert actual.utcoffset() == expected.utcoffset()
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same_value(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected, strict=True):
            assert_same_value(actual_item, expected_item)
    else:
        assert actual == expected


def record_key_material(monkeypatch: Any) -> list[bytes]:
    """Record every DEK the in-memory keyring creates from now on, so a test
    can search its output for key bytes."""
    from sqlalchemy_encrypted import testing
    from sqlalchemy_encrypted._aead import AeadCipher

    created: list[bytes] = []

    def recording_cipher(algorithm: Any, key: bytes) -> AeadCipher:
        created.append(key)
        return AeadCipher(algorithm, key)

    monkeypatch.setattr(testing, "AeadCipher", recording_cipher)
    return created
