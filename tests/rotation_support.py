"""Models and helpers shared by the rotation and command line tests."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, parse_header
from sqlalchemy_encrypted.envelope import HEADER_SIZE

TENANTS = ("t-acme", "t-globex")


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "persons"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)), index=True)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    iban: Mapped[str | None] = mapped_column(Encrypted(sa.String(34)))


class Note(Base):
    """A table filled through the low-level API: ``blob`` is plain bytes to
    SQLAlchemy, registered as encrypted through ``Column.info``."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    blob: Mapped[bytes | None] = mapped_column(
        sa.LargeBinary,
        info={"encrypted_type": Encrypted(sa.String(), context="notes.blob")},
    )


NOTE_TYPE: Encrypted[Any] = Note.__table__.c.blob.info["encrypted_type"]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Typed(Base):
    """One encrypted column per supported inner type, stored as base64 for one."""

    __tablename__ = "typed_values"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    text_b64: Mapped[str | None] = mapped_column(Encrypted(sa.String(50), storage="base64"))
    number: Mapped[int | None] = mapped_column(Encrypted(sa.Integer()))
    amount: Mapped[decimal.Decimal | None] = mapped_column(Encrypted(sa.Numeric(12, 2)))
    ratio: Mapped[float | None] = mapped_column(Encrypted(sa.Float()))
    flag: Mapped[bool | None] = mapped_column(Encrypted(sa.Boolean()))
    born: Mapped[dt.date | None] = mapped_column(Encrypted(sa.Date()))
    seen: Mapped[dt.datetime | None] = mapped_column(Encrypted(sa.DateTime(timezone=True)))
    ref: Mapped[uuid.UUID | None] = mapped_column(DeterministicEncrypted(sa.Uuid()))
    doc: Mapped[Any] = mapped_column(Encrypted(sa.JSON()), nullable=True)
    color: Mapped[Color | None] = mapped_column(Encrypted(sa.Enum(Color)))
    raw: Mapped[bytes | None] = mapped_column(Encrypted(sa.LargeBinary()))


class Membership(Base):
    """A table with a composite primary key."""

    __tablename__ = "memberships"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    tenant_id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    user_key: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    role: Mapped[str | None] = mapped_column(Encrypted(sa.String(40)))


def fill_persons(bind: sa.Engine | sa.Connection, count: int, start: int = 1) -> None:
    """Insert ``count`` persons, alternating the two tenants, with Core."""
    rows = [
        {
            "id": i,
            "tenant_id": TENANTS[i % 2],
            "name": f"Person {i}",
            "email": f"person{i}@example.test",
        }
        for i in range(start, start + count)
    ]
    if isinstance(bind, sa.Engine):
        with bind.begin() as conn:
            conn.execute(sa.insert(Person.__table__), rows)
    else:
        bind.execute(sa.insert(Person.__table__), rows)


def raw_values(bind: sa.Engine, table: str, column: str) -> dict[Any, bytes | None]:
    """Return ``{id: stored bytes}`` of one column, read past the column type."""
    with bind.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT id, {column} FROM {table}").all()
    return {row[0]: None if row[1] is None else bytes(row[1]) for row in rows}


def key_versions(values: Iterable[bytes | None]) -> list[int]:
    """Return the sorted distinct key versions of stored envelopes."""
    return sorted({parse_header(v).key_version for v in values if v is not None})


def header_of(value: bytes) -> bytes:
    return value[:HEADER_SIZE]


class Contact(Base):
    """A unique deterministic column, unique per tenant."""

    __tablename__ = "contacts"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "email", name="uq_contacts_tenant_email"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))
