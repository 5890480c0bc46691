"""``Encrypted(Numeric(p, s))`` fits values as a PostgreSQL NUMERIC(p, s)
column does: extra fractional digits are rounded, and too many integer
digits are rejected before any SQL is sent."""

from __future__ import annotations

import decimal
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, PlaintextTooLongError
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements

D = decimal.Decimal

metadata = sa.MetaData()
amounts = sa.Table(
    "amounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("plain", sa.Numeric(10, 2)),
    sa.Column("amount", Encrypted(sa.Numeric(10, 2))),
    sa.Column("lookup", DeterministicEncrypted(sa.Numeric(10, 2))),
    sa.Column("whole", Encrypted(sa.Numeric(6))),
)


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    metadata.create_all(engine)
    se.set_default_tenant("t-acme")
    yield engine


def _write(engine: sa.Engine, **values: Any) -> int:
    with engine.begin() as conn:
        row_id: int = conn.execute(
            sa.insert(amounts).values(**values).returning(amounts.c.id)
        ).scalar_one()
    return row_id


def _read(engine: sa.Engine, row_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(amounts).where(amounts.c.id == row_id)).one()


ROUNDED = {
    "1.005": D("1.01"),
    "-1.005": D("-1.01"),
    "1.004": D("1.00"),
    "99999999.994": D("99999999.99"),
    "0.001": D("0.00"),
    "1.5": D("1.5"),
    "1.50": D("1.50"),
    "12": D("12"),
    "1E+7": D("1E+7"),
}


@pytest.mark.parametrize("text, expected", ROUNDED.items(), ids=ROUNDED.keys())
def test_extra_fraction_digits_rounded(db: sa.Engine, text: str, expected: D) -> None:
    row_id = _write(db, amount=D(text), lookup=D(text))

    row = _read(db, row_id)

    assert row.amount == expected
    assert str(row.amount) == str(expected)
    assert str(row.lookup) == str(expected)


def test_float_and_int_fitted(db: sa.Engine) -> None:
    row_id = _write(db, amount=0.125, whole=D("2.5"))
    negative_id = _write(db, amount=-7, whole=-3.5)

    row = _read(db, row_id)
    negative = _read(db, negative_id)

    assert str(row.amount) == "0.13"
    assert str(row.whole) == "3"
    assert str(negative.amount) == "-7"
    assert str(negative.whole) == "-4"


TOO_LARGE = {
    "integer digits": ("amount", D("123456789012.5")),
    "nine digits": ("amount", D("100000000")),
    "rounded up": ("amount", D("99999999.995")),
    "negative": ("amount", D("-100000000.00")),
    "exponent": ("amount", D("1E+8")),
    "float": ("amount", 1e12),
    "int": ("amount", 10**8),
    "deterministic": ("lookup", D("123456789012.5")),
    "scale zero": ("whole", D("999999.5")),
}


@pytest.mark.parametrize("column, value", TOO_LARGE.values(), ids=TOO_LARGE.keys())
def test_too_many_integer_digits_rejected(db: sa.Engine, column: str, value: Any) -> None:
    with count_statements(db) as counter, pytest.raises(PlaintextTooLongError) as caught:
        _write(db, **{column: value})

    message = str(caught.value)
    assert counter.count == 0
    assert f"amounts.{column}" in message
    assert "digit(s) before the decimal point" in message
    assert "12345" not in message
    assert "9999" not in message


def test_special_values(db: sa.Engine) -> None:
    row_id = _write(db, amount=D("NaN"))

    assert _read(db, row_id).amount.is_nan()
    for value in (D("Infinity"), D("-Infinity"), float("inf")):
        with pytest.raises(PlaintextTooLongError, match=r"amounts\.amount is infinite"):
            _write(db, amount=value)


def test_matches_plain_numeric_on_postgresql(
    pg_engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """The encrypted column stores what a plain NUMERIC(10, 2) column stores,
    up to the scale PostgreSQL pads, and rejects what it rejects."""
    metadata.create_all(pg_engine)
    se.set_default_tenant("t-acme")
    values = [*ROUNDED, "0.125", "-0.125", "99999999.995", "123456789012.5", "NaN"]
    for text in values:
        value = D(text)
        try:
            plain_id = _write(pg_engine, plain=value)
        except sa.exc.DataError:
            plain_id = None
        try:
            encrypted_id = _write(pg_engine, amount=value)
        except PlaintextTooLongError:
            encrypted_id = None

        assert (plain_id is None) == (encrypted_id is None), text
        if plain_id is not None and encrypted_id is not None:
            plain = _read(pg_engine, plain_id).plain
            encrypted = _read(pg_engine, encrypted_id).amount
            if plain.is_nan():
                assert encrypted.is_nan(), text
            else:
                assert encrypted == plain, text


def test_deterministic_lookup_after_rounding(db: sa.Engine) -> None:
    """A search value is fitted like a written one. Equal values with a
    different scale stay different, as documented for deterministic columns."""
    rounded_id = _write(db, lookup=D("1.005"))
    scaled_id = _write(db, lookup=D("2.50"))

    with Session(db) as session:
        by_rounding = session.scalars(
            sa.select(amounts.c.id).where(amounts.c.lookup == D("1.0051"))
        ).all()
        same_scale = session.scalars(
            sa.select(amounts.c.id).where(amounts.c.lookup == D("2.50"))
        ).all()
        other_scale = session.scalars(
            sa.select(amounts.c.id).where(amounts.c.lookup == D("2.5"))
        ).all()

    assert by_rounding == [rounded_id]
    assert same_scale == [scaled_id]
    assert other_scale == []
