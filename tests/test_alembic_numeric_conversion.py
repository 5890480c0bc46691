"""op.encrypt_column and op.decrypt_column on numeric, real and double precision columns.

The PostgreSQL drivers return ``Decimal`` for numeric and ``float`` for
real and double precision, and SQLite returns ``float`` or ``int`` for all
three. Each test checks the exact values, scale included, that the
application reads after the conversion.
"""

from __future__ import annotations

import decimal
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import alembic_ext  # noqa: F401  (registers the operations)
from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    MigrationError,
    set_default_tenant,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

D = decimal.Decimal


def _operations(conn: sa.Connection) -> Operations:
    return Operations(MigrationContext.configure(connection=conn))


def _prices(**column_types: sa.types.TypeEngine[Any]) -> sa.Table:
    columns = [sa.Column(name, type_) for name, type_ in column_types.items()]
    return sa.Table(
        "prices", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), *columns
    )


PLAIN = _prices(amount=sa.Numeric(10, 2), ratio=sa.REAL(), score=sa.Double())

# Values that a plain column of each type stores and reads back unchanged,
# with the last row NULL. 0.1 is not exact in a PostgreSQL real, but the
# driver reads its shortest text form "0.1" back as the float 0.1.
PLAIN_VALUES: dict[str, list[Any]] = {
    "amount": [D("12.50"), D("0.10"), D("-3.00"), D("99999999.99"), None],
    "ratio": [1.5, 0.1, -2.25, 3.0, None],
    "score": [0.1, 1e-300, -1.7976931348623157e308, 3.0, None],
}


def _seed_plain(engine: sa.Engine) -> None:
    PLAIN.create(engine)
    rows = [
        {"id": index + 1, **{name: values[index] for name, values in PLAIN_VALUES.items()}}
        for index in range(5)
    ]
    with engine.begin() as conn:
        conn.execute(PLAIN.insert(), rows)


def _read(engine: sa.Engine, table: sa.Table, column: str) -> list[Any]:
    with engine.connect() as conn:
        query = sa.select(table.c[column]).order_by(table.c.id)
        return list(conn.execute(query).scalars())


def _assert_exact(values: list[Any], expected: list[Any]) -> None:
    """Compare type and text form too, so 12.5 differs from 12.50 and 3 from 3.0."""
    assert values == expected
    assert [type(value) for value in values] == [type(value) for value in expected]
    assert [str(value) for value in values] == [str(value) for value in expected]


ENCRYPT_CASES = {
    "numeric": ("amount", lambda: Encrypted(sa.Numeric(10, 2)), {}),
    "numeric existing_type": (
        "amount",
        lambda: Encrypted(sa.Numeric(10, 2)),
        {"existing_type": sa.NUMERIC(10, 2)},
    ),
    "numeric deterministic": ("amount", lambda: DeterministicEncrypted(sa.Numeric(10, 2)), {}),
    "real": ("ratio", lambda: Encrypted(sa.Float()), {}),
    "real existing_type": ("ratio", lambda: Encrypted(sa.Float()), {"existing_type": sa.REAL()}),
    "double precision": ("score", lambda: Encrypted(sa.Double()), {}),
}


@pytest.mark.parametrize(
    "column, make_type, options", ENCRYPT_CASES.values(), ids=ENCRYPT_CASES.keys()
)
def test_encrypt_numeric_column(
    engine: sa.Engine, keyring: InMemoryKeyring, column: str, make_type: Any, options: Any
) -> None:
    _seed_plain(engine)

    with engine.connect() as conn:
        report = _operations(conn).encrypt_column(
            "prices", column, type_=make_type(), tenant_id="t1", **options
        )
        conn.commit()

    assert (report.converted, report.null) == (4, 1)
    encrypted = _prices(**{column: make_type()})
    _assert_exact(_read(engine, encrypted, column), PLAIN_VALUES[column])


# Values written to the encrypted column, and what the plain column contains
# after decryption. Numeric(10, 2) pads to its scale, as PostgreSQL does.
DECRYPT_CASES = {
    "numeric": (
        lambda: Encrypted(sa.Numeric(10, 2)),
        sa.Numeric(10, 2),
        [D("12.5"), D("0.1"), 7, D("-3.005"), None],
        [D("12.50"), D("0.10"), D("7.00"), D("-3.01"), None],
    ),
    "real": (
        lambda: Encrypted(sa.Float()),
        sa.REAL(),
        [1.5, 0.1, -2.25, 3, None],
        [1.5, 0.1, -2.25, 3.0, None],
    ),
    "double precision": (
        lambda: Encrypted(sa.Double()),
        sa.Double(),
        [0.1, 1e-300, -1.7976931348623157e308, 3, None],
        [0.1, 1e-300, -1.7976931348623157e308, 3.0, None],
    ),
}


@pytest.mark.parametrize(
    "make_type, plain_type, written, expected", DECRYPT_CASES.values(), ids=DECRYPT_CASES.keys()
)
def test_decrypt_numeric_column(
    engine: sa.Engine,
    keyring: InMemoryKeyring,
    make_type: Any,
    plain_type: sa.types.TypeEngine[Any],
    written: list[Any],
    expected: list[Any],
) -> None:
    encrypted = _prices(value=make_type())
    encrypted.create(engine)
    set_default_tenant("t1")
    with engine.begin() as conn:
        conn.execute(
            encrypted.insert(), [{"id": i + 1, "value": value} for i, value in enumerate(written)]
        )

    with engine.connect() as conn:
        report = _operations(conn).decrypt_column(
            "prices", "value", type_=plain_type, from_type=make_type(), tenant_id="t1"
        )
        conn.commit()

    assert (report.converted, report.null) == (4, 1)
    _assert_exact(_read(engine, _prices(value=plain_type), "value"), expected)


def test_decrypt_into_real_rejects_lost_digits(
    pg_engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    """A PostgreSQL real keeps about 6 significant digits, so a double value
    that needs more does not read back equal and the column is not swapped."""
    encrypted = _prices(value=Encrypted(sa.Float()))
    encrypted.create(pg_engine)
    set_default_tenant("t1")
    with pg_engine.begin() as conn:
        conn.execute(encrypted.insert(), [{"id": 1, "value": 0.123456789}])

    with pg_engine.connect() as conn, pytest.raises(MigrationError) as caught:
        _operations(conn).decrypt_column(
            "prices", "value", type_=sa.REAL(), from_type=Encrypted(sa.Float()), tenant_id="t1"
        )

    assert "prices.value (primary key 1)" in str(caught.value)
    assert "not lossless" in str(caught.value)
    assert "0.123" not in str(caught.value)
    assert _read(pg_engine, encrypted, "value") == [0.123456789]
