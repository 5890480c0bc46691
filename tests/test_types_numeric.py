"""``Encrypted(Numeric(p, s))`` fits values as a PostgreSQL NUMERIC(p, s)
column does: every value gets exactly s fractional digits, extra ones
rounded and missing ones padded, and too many integer digits are rejected
before any SQL is sent."""

from __future__ import annotations

import decimal
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.attributes import flag_modified

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    PlaintextTooLongError,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted.codecs import DecimalCodec
from sqlalchemy_encrypted.rotation import EncryptedColumn, ReencryptionJob
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
    "-0.001": D("0.00"),
    "-0": D("0.00"),
    "1.5": D("1.50"),
    "1.50": D("1.50"),
    "12": D("12.00"),
    "1E+7": D("10000000.00"),
    "1.000": D("1.00"),
}


@pytest.mark.parametrize("text, expected", ROUNDED.items(), ids=ROUNDED.keys())
def test_value_fitted_to_scale(db: sa.Engine, text: str, expected: D) -> None:
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
    assert str(negative.amount) == "-7.00"
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
    scale included, and rejects what it rejects."""
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
                assert str(encrypted) == str(plain), text


def test_deterministic_lookup_after_rounding(db: sa.Engine) -> None:
    """A search value is fitted like a written one, so every form of the
    same number at the column's scale finds it."""
    rounded_id = _write(db, lookup=D("1.005"))
    padded_id = _write(db, lookup=D("2.5"))
    whole_id = _write(db, lookup=7)

    def find(value: Any) -> list[int]:
        with Session(db) as session:
            return list(session.scalars(sa.select(amounts.c.id).where(amounts.c.lookup == value)))

    assert find(D("1.0051")) == [rounded_id]
    assert find(D("1.01")) == [rounded_id]
    for value in (D("2.5"), D("2.50"), D("2.500"), 2.5):
        assert find(value) == [padded_id], value
    for value in (7, D("7"), D("7.00"), D("7E+0"), 7.0):
        assert find(value) == [whole_id], value


def test_unique_constraint_ignores_scale(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    codes = sa.Table(
        "codes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", DeterministicEncrypted(sa.Numeric(10, 2)), unique=True),
    )
    codes.create(engine)
    se.set_default_tenant("t-acme")
    with engine.begin() as conn:
        conn.execute(codes.insert().values(id=1, code=D("1.5")))

    for row_id, duplicate in enumerate((D("1.50"), D("1.500"), 1.5), start=2):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(codes.insert().values(id=row_id, code=duplicate))


class LegacyBase(DeclarativeBase):
    pass


class Price(LegacyBase):
    __tablename__ = "prices"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    amount: Mapped[D | None] = mapped_column(DeterministicEncrypted(sa.Numeric(10, 2)))


def test_unpadded_value_stored_earlier(
    engine: sa.Engine, keyring: InMemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deterministic value stored unpadded by an earlier release reads
    back, but no lookup finds it, also after re-encryption, until the
    application writes it again."""
    LegacyBase.metadata.create_all(engine)
    with monkeypatch.context() as earlier_release:
        # Earlier releases kept fewer fractional digits than the scale.
        earlier_release.setattr(DecimalCodec, "_fit", lambda self, number, column: number)
        with Session(engine) as session:
            session.add_all(
                [
                    Price(id=1, tenant_id="t-acme", amount=D("1.5")),
                    Price(id=2, tenant_id="t-acme", amount=None),
                ]
            )
            session.commit()

    def find(value: D) -> list[int]:
        with tenant_scope("t-acme"), Session(engine) as session:
            return list(session.scalars(sa.select(Price.id).where(Price.amount == value)))

    def read() -> D | None:
        with Session(engine) as session:
            return session.get_one(Price, 1).amount

    assert str(read()) == "1.5"
    assert find(D("1.5")) == []
    assert find(D("1.50")) == []

    keyring.rotate("t-acme")
    job = ReencryptionJob(engine, [EncryptedColumn.of(Price.__table__, "amount")], checkpoint=False)
    job.run().raise_for_failures()
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT amount FROM prices WHERE id = 1").scalar_one()
    assert parse_header(bytes(stored)).key_version == 2
    assert str(read()) == "1.5"
    assert find(D("1.5")) == []

    # The operator's fix: write every value of the column again.
    with Session(engine) as session:
        for price in session.scalars(sa.select(Price).where(Price.amount.is_not(None))):
            flag_modified(price, "amount")
        session.commit()

    assert str(read()) == "1.50"
    assert find(D("1.5")) == [1]
    assert find(D("1.50")) == [1]
