"""Re-encoding with the re-encryption job: values stored before a codec rule existed."""

from __future__ import annotations

import decimal
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import (
    ConfigurationError,
    DeterministicEncrypted,
    KeyPurpose,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted.rotation import CheckpointStore, EncryptedColumn, ReencryptionJob
from sqlalchemy_encrypted.testing import InMemoryKeyring

D = decimal.Decimal
TENANT = "t-acme"


class LedgerBase(DeclarativeBase):
    pass


class Price(LedgerBase):
    __tablename__ = "reencode_prices"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    amount: Mapped[D | None] = mapped_column(DeterministicEncrypted(sa.Numeric(10, 2)))


AMOUNT_TYPE = Price.__table__.c.amount.type
RAW_PRICES = sa.table(
    "reencode_prices",
    sa.column("id", sa.Integer),
    sa.column("tenant_id", sa.String),
    sa.column("amount", sa.LargeBinary),
)


@pytest.fixture
def prices(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    LedgerBase.metadata.create_all(engine)
    yield engine
    LedgerBase.metadata.drop_all(engine)


def _seal_encoded(keyring: InMemoryKeyring, encoded: bytes) -> bytes:
    """Seal ``encoded`` as it is, as a release without today's codec rules did."""
    key = keyring.active_key(TENANT, KeyPurpose.DETERMINISTIC)
    return AMOUNT_TYPE._seal_encoded(encoded, key, AMOUNT_TYPE.column_identity)


def _insert_encoded(engine: sa.Engine, keyring: InMemoryKeyring, rows: dict[int, bytes]) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(RAW_PRICES),
            [
                {"id": row_id, "tenant_id": TENANT, "amount": _seal_encoded(keyring, encoded)}
                for row_id, encoded in rows.items()
            ],
        )


def _stored(engine: sa.Engine) -> dict[int, bytes]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RAW_PRICES.c.id, RAW_PRICES.c.amount)).all()
    return {row.id: bytes(row.amount) for row in rows}


def _find(engine: sa.Engine, value: D) -> list[int]:
    with tenant_scope(TENANT), Session(engine) as session:
        query = sa.select(Price.id).where(Price.amount == value).order_by(Price.id)
        return list(session.scalars(query))


def _read(engine: sa.Engine, row_id: int) -> str:
    with tenant_scope(TENANT), Session(engine) as session:
        return str(session.get_one(Price, row_id).amount)


def _job(engine: sa.Engine, **options: object) -> ReencryptionJob:
    column = EncryptedColumn.of(Price.__table__, "amount")
    return ReencryptionJob(engine, [column], **options)  # type: ignore[arg-type]


def test_reencode_finds_unpadded_value(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    _insert_encoded(prices, keyring, {1: b"1.5", 2: b"2.50"})
    canonical = _stored(prices)[2]

    assert _find(prices, D("1.50")) == []
    plain = _job(prices).run()
    assert plain.planned == {}
    assert _find(prices, D("1.50")) == []

    result = _job(prices, reencode=True).run()

    assert result.status == "succeeded", result.failures
    assert result.planned == {"reencode_prices.amount": 2}
    assert result.values_reencrypted == 1
    assert _find(prices, D("1.50")) == [1]
    assert _find(prices, D("1.5")) == [1]
    assert _read(prices, 1) == "1.50"
    stored = _stored(prices)
    assert parse_header(stored[1]).key_version == 1
    assert stored[2] == canonical


def test_reencode_moves_stale_value(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    _insert_encoded(prices, keyring, {1: b"1.5"})
    keyring.rotate(TENANT)

    result = _job(prices, reencode=True, batch_size=1).run()

    assert result.status == "succeeded", result.failures
    assert result.values_reencrypted == 1
    assert parse_header(_stored(prices)[1]).key_version == 2
    assert _find(prices, D("1.50")) == [1]


def test_reencode_reports_value_over_precision(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    # Numeric(10, 2) allows 8 integer digits; releases before the check stored 9.
    _insert_encoded(prices, keyring, {1: b"1.5", 2: b"123456789.5"})
    before = _stored(prices)[2]

    result = _job(prices, reencode=True).run()

    assert result.status == "failed"
    assert result.failures_total == 1
    failure = result.failures[0]
    assert (failure.table, failure.column, failure.primary_key) == (
        "reencode_prices",
        "amount",
        (2,),
    )
    assert failure.error_class == "PlaintextTooLongError"
    assert "123456789" not in failure.message
    assert "reencode_prices.amount" in failure.message
    assert _stored(prices)[2] == before
    assert _find(prices, D("1.50")) == [1]


def test_reencode_restarts_plain_checkpoint(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A checkpoint saved by a run without re-encoding is not resumed, because
    the rows before its cursor kept their encoding."""
    _insert_encoded(prices, keyring, {1: b"1.5", 2: b"2.5"})
    store = CheckpointStore()
    store.create(prices)
    with prices.begin() as conn:
        checkpoint = store.start(conn, "default", "reencode_prices", 0, "amount")
        checkpoint.cursor = (1,)
        checkpoint.status = "failed"
        store.save(conn, checkpoint)

    result = _job(prices, reencode=True).run()

    assert result.status == "succeeded", result.failures
    assert result.values_reencrypted == 2
    assert _find(prices, D("1.50")) == [1]


def test_reencode_resumes_own_checkpoint(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    _insert_encoded(prices, keyring, {1: b"1.5", 2: b"2.5"})
    store = CheckpointStore()
    store.create(prices)
    with prices.begin() as conn:
        checkpoint = store.start(conn, "default", "reencode_prices", 0, "amount (reencode)")
        checkpoint.cursor = (1,)
        checkpoint.status = "failed"
        store.save(conn, checkpoint)

    result = _job(prices, reencode=True).run()

    assert result.status == "succeeded", result.failures
    assert result.values_reencrypted == 1
    assert _find(prices, D("2.50")) == [2]
    assert _find(prices, D("1.50")) == []


def test_reencode_rejects_several_workers(prices: sa.Engine) -> None:
    with pytest.raises(ConfigurationError, match="cannot re-encode"):
        _job(prices, reencode=True, workers=2)


def test_reencode_waits_for_locked_row(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A row another transaction holds is re-encoded once it is released,
    not skipped: no later pass reads a value under the active version again."""
    if prices.dialect.name != "postgresql":
        pytest.skip("row locks are a PostgreSQL feature here")
    _insert_encoded(prices, keyring, {1: b"1.5", 2: b"2.5"})
    results = []
    with prices.connect() as holder:
        holder.execute(sa.select(RAW_PRICES.c.id).where(RAW_PRICES.c.id == 1).with_for_update())
        worker = threading.Thread(target=lambda: results.append(_job(prices, reencode=True).run()))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()
        holder.commit()
    worker.join(timeout=30)

    assert results[0].status == "succeeded", results[0].failures
    assert results[0].values_reencrypted == 2
    assert _find(prices, D("1.50")) == [1]


class UniquePrice(LedgerBase):
    __tablename__ = "reencode_unique_prices"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "amount", name="uq_reencode_prices_amount"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    amount: Mapped[D | None] = mapped_column(DeterministicEncrypted(sa.Numeric(10, 2)))


def test_reencode_reports_unique_collision(prices: sa.Engine, keyring: InMemoryKeyring) -> None:
    """1.5 stored unpadded next to 1.50 becomes a duplicate: its row fails and keeps its value."""
    column_type = UniquePrice.__table__.c.amount.type
    key = keyring.active_key(TENANT, KeyPurpose.DETERMINISTIC)
    old = column_type._seal_encoded(b"1.5", key, column_type.column_identity)
    with prices.begin() as conn:
        conn.execute(
            sa.insert(UniquePrice.__table__).values(id=1, tenant_id=TENANT, amount=sa.null())
        )
        conn.execute(
            sa.text("UPDATE reencode_unique_prices SET amount = :a WHERE id = 1"), {"a": old}
        )
    with tenant_scope(TENANT), Session(prices) as session:
        session.add(UniquePrice(id=2, tenant_id=TENANT, amount=D("1.50")))
        session.commit()
    column = EncryptedColumn.of(UniquePrice.__table__, "amount")

    result = ReencryptionJob(prices, [column], reencode=True).run()

    assert result.status == "failed"
    assert [(f.column, f.primary_key, f.error_class) for f in result.failures] == [
        ("amount", (1,), "IntegrityError")
    ]
    with prices.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT amount FROM reencode_unique_prices WHERE id = 1")
        ).scalar_one()
    assert bytes(stored) == old
