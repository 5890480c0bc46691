"""Property-based round trips: every supported inner type, both column types,
SQLite and PostgreSQL.

Each example is written through SQLAlchemy, read back from the database and
compared for the same Python type and the same value. Deterministic columns
also check that one value always seals to the same bytes and that ``==``
finds the row.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_same_value


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


# The keyring and the default tenant persist across a test's examples on
# purpose, so the function-scoped fixtures are fine here.
ROUND_TRIP = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
).filter(lambda value: value is not None)
FIXED_OFFSETS = st.builds(
    dt.timezone,
    st.timedeltas(min_value=-dt.timedelta(hours=23, minutes=59), max_value=dt.timedelta(hours=23)),
)


def _column_pair(name: str, inner: Any, deterministic: Any | None) -> list[sa.Column[Any]]:
    columns = [sa.Column(f"enc_{name}", Encrypted(inner))]
    if deterministic is not None:
        columns.append(sa.Column(f"det_{name}", deterministic))
    return columns


metadata = sa.MetaData()
values_table = sa.Table(
    "round_trip_values",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    *_column_pair("string", sa.String(50), DeterministicEncrypted(sa.String(50))),
    *_column_pair("text", sa.Text(), None),
    *_column_pair("unicode", sa.Unicode(40), DeterministicEncrypted(sa.Unicode(40))),
    *_column_pair("binary", sa.LargeBinary(64), DeterministicEncrypted(sa.LargeBinary(64))),
    *_column_pair("integer", sa.Integer(), DeterministicEncrypted(sa.Integer())),
    *_column_pair("biginteger", sa.BigInteger(), DeterministicEncrypted(sa.BigInteger())),
    *_column_pair("smallinteger", sa.SmallInteger(), DeterministicEncrypted(sa.SmallInteger())),
    *_column_pair("numeric", sa.Numeric(), DeterministicEncrypted(sa.Numeric(20, 6))),
    *_column_pair("float", sa.Float(), DeterministicEncrypted(sa.Float())),
    *_column_pair(
        "boolean",
        sa.Boolean(),
        DeterministicEncrypted(sa.Boolean(), allow_low_cardinality=True),
    ),
    *_column_pair("date", sa.Date(), DeterministicEncrypted(sa.Date())),
    *_column_pair("datetime", sa.DateTime(), DeterministicEncrypted(sa.DateTime())),
    *_column_pair(
        "datetime_tz",
        sa.DateTime(timezone=True),
        DeterministicEncrypted(sa.DateTime(timezone=True)),
    ),
    *_column_pair("time", sa.Time(), DeterministicEncrypted(sa.Time())),
    *_column_pair("interval", sa.Interval(), DeterministicEncrypted(sa.Interval())),
    *_column_pair("uuid", sa.Uuid(), DeterministicEncrypted(sa.Uuid())),
    *_column_pair("json", sa.JSON(), None),
    *_column_pair(
        "enum",
        sa.Enum(Color),
        DeterministicEncrypted(sa.Enum(Color), allow_low_cardinality=True),
    ),
    *_column_pair(
        "string_enum",
        sa.Enum("draft", "sent", "paid", name="state"),
        DeterministicEncrypted(
            sa.Enum("draft", "sent", "paid", name="state"), allow_low_cardinality=True
        ),
    ),
)


@pytest.fixture(scope="module")
def db(module_engine: sa.Engine) -> Iterator[sa.Engine]:
    metadata.create_all(module_engine)
    yield module_engine


@pytest.fixture
def tenant(keyring: InMemoryKeyring) -> Iterator[str]:
    se.set_default_tenant("t-roundtrip")
    yield "t-roundtrip"


def round_trip(engine: sa.Engine, name: str, value: Any, deterministic: bool = True) -> None:
    """Write ``value`` to both columns of ``name`` (or only the randomized
    one), read it back and compare."""
    enc = values_table.c[f"enc_{name}"]
    det = values_table.c.get(f"det_{name}") if deterministic else None
    row = {enc.key: value}
    if det is not None:
        row[det.key] = value
    with engine.begin() as conn:
        row_id = conn.execute(
            sa.insert(values_table).values(row).returning(values_table.c.id)
        ).scalar_one()
        stored = conn.execute(
            sa.select(enc, *([det] if det is not None else [])).where(values_table.c.id == row_id)
        ).one()
        assert_same_value(stored[0], value)
        if det is None:
            return
        assert_same_value(stored[1], value)
        det_type = det.type
        assert isinstance(det_type, DeterministicEncrypted)
        assert det_type.seal(value) == det_type.seal(value)
        found = conn.execute(sa.select(values_table.c.id).where(det == value)).scalars().all()
        assert row_id in found


PAD_LIKE = ["hunter2*", "*", "****", "x" + "*" * 31, "pad\x00", "ends with space ", "\t", "a" * 16]


@ROUND_TRIP
@given(value=st.text(max_size=50))
@example(value="")
@example(value="\U0001f600" * 50)
@example(value="\x00\x00")
@example(value="\u200b\ufeff\u3000 ")
def test_string_round_trip(db: sa.Engine, tenant: str, value: str) -> None:
    round_trip(db, "string", value)


@pytest.mark.parametrize("value", PAD_LIKE)
def test_string_pad_like_characters_round_trip(db: sa.Engine, tenant: str, value: str) -> None:
    round_trip(db, "string", value)


@ROUND_TRIP
@given(value=st.text())
@example(value="\U0001f600\U00010348" * 1000)
def test_text_round_trip(db: sa.Engine, tenant: str, value: str) -> None:
    round_trip(db, "text", value)


@ROUND_TRIP
@given(value=st.text(max_size=40))
def test_unicode_round_trip(db: sa.Engine, tenant: str, value: str) -> None:
    round_trip(db, "unicode", value)


@ROUND_TRIP
@given(value=st.binary(max_size=64))
@example(value=b"")
@example(value=b"\x01\x01\x00\x01")
def test_large_binary_round_trip(db: sa.Engine, tenant: str, value: bytes) -> None:
    round_trip(db, "binary", value)


@ROUND_TRIP
@given(value=INT64)
@example(value=0)
@example(value=-1)
@example(value=2**63 - 1)
@example(value=-(2**63))
def test_integer_round_trip(db: sa.Engine, tenant: str, value: int) -> None:
    round_trip(db, "integer", value)


@ROUND_TRIP
@given(value=st.integers())
@example(value=2**200 + 1)
@example(value=-(2**130))
def test_randomized_integer_beyond_64_bits(db: sa.Engine, tenant: str, value: int) -> None:
    with db.begin() as conn:
        row_id = conn.execute(
            sa.insert(values_table)
            .values(enc_biginteger=value, enc_integer=value)
            .returning(values_table.c.id)
        ).scalar_one()
        row = conn.execute(
            sa.select(values_table.c.enc_biginteger, values_table.c.enc_integer).where(
                values_table.c.id == row_id
            )
        ).one()
    assert_same_value(row[0], value)
    assert_same_value(row[1], value)


@ROUND_TRIP
@given(value=INT64)
def test_big_integer_round_trip(db: sa.Engine, tenant: str, value: int) -> None:
    round_trip(db, "biginteger", value)


@ROUND_TRIP
@given(value=st.integers(min_value=-(2**15), max_value=2**15 - 1))
def test_small_integer_round_trip(db: sa.Engine, tenant: str, value: int) -> None:
    round_trip(db, "smallinteger", value)


@ROUND_TRIP
@given(value=st.decimals())
@example(value=decimal.Decimal("1.10"))
@example(value=decimal.Decimal("-0.000"))
@example(value=decimal.Decimal("1E+400"))
@example(value=decimal.Decimal("NaN"))
@example(value=decimal.Decimal("-Infinity"))
def test_numeric_round_trip_keeps_scale(db: sa.Engine, tenant: str, value: decimal.Decimal) -> None:
    round_trip(db, "numeric", value, deterministic=False)


@ROUND_TRIP
@given(value=st.decimals(min_value=-(10**13), max_value=10**13, places=6))
@example(value=decimal.Decimal("12.500000"))
def test_deterministic_numeric_round_trip(
    db: sa.Engine, tenant: str, value: decimal.Decimal
) -> None:
    round_trip(db, "numeric", value)


@ROUND_TRIP
@given(value=st.floats())
@example(value=-0.0)
@example(value=float("inf"))
@example(value=5e-324)
def test_float_round_trip(db: sa.Engine, tenant: str, value: float) -> None:
    round_trip(db, "float", value)


@pytest.mark.parametrize("value", [True, False])
def test_boolean_round_trip(db: sa.Engine, tenant: str, value: bool) -> None:
    round_trip(db, "boolean", value)


@ROUND_TRIP
@given(value=st.dates())
def test_date_round_trip(db: sa.Engine, tenant: str, value: dt.date) -> None:
    round_trip(db, "date", value)


@ROUND_TRIP
@given(value=st.datetimes())
@example(value=dt.datetime(2021, 11, 7, 1, 30, fold=1))
def test_naive_datetime_round_trip(db: sa.Engine, tenant: str, value: dt.datetime) -> None:
    round_trip(db, "datetime", value)


@ROUND_TRIP
@given(value=st.datetimes(timezones=st.timezones() | FIXED_OFFSETS))
@example(value=dt.datetime(2021, 11, 7, 1, 30, tzinfo=dt.UTC))
def test_aware_datetime_round_trip_keeps_zone(
    db: sa.Engine, tenant: str, value: dt.datetime
) -> None:
    round_trip(db, "datetime_tz", value)


@ROUND_TRIP
@given(value=st.times() | st.times(timezones=st.timezones() | FIXED_OFFSETS))
def test_time_round_trip(db: sa.Engine, tenant: str, value: dt.time) -> None:
    round_trip(db, "time", value)


@ROUND_TRIP
@given(value=st.timedeltas())
@example(value=dt.timedelta.max)
@example(value=dt.timedelta.min)
def test_interval_round_trip(db: sa.Engine, tenant: str, value: dt.timedelta) -> None:
    round_trip(db, "interval", value)


@ROUND_TRIP
@given(value=st.uuids())
def test_uuid_round_trip(db: sa.Engine, tenant: str, value: uuid.UUID) -> None:
    round_trip(db, "uuid", value)


@ROUND_TRIP
@given(value=JSON_VALUES)
@example(value={"b": 1, "a": [1.0, True, None, {"x": 2**70}]})
@example(value=[[[[[]]]]])
@example(value="")
def test_json_round_trip_keeps_nested_types(db: sa.Engine, tenant: str, value: Any) -> None:
    round_trip(db, "json", value)


@ROUND_TRIP
@given(value=st.sampled_from(Color))
def test_enum_round_trip(db: sa.Engine, tenant: str, value: Color) -> None:
    round_trip(db, "enum", value)


@pytest.mark.parametrize("value", ["draft", "sent", "paid"])
def test_string_enum_round_trip(db: sa.Engine, tenant: str, value: str) -> None:
    round_trip(db, "string_enum", value)
