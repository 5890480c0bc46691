"""The application's model once revision 0003 has run."""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = (
        sa.Index("ix_customers_tenant_id", "tenant_id"),
        sa.Index("uq_customers_tenant_email", "tenant_id", "email", unique=True),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str] = mapped_column(Encrypted(sa.String(200)))
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)))
    phone: Mapped[str | None] = mapped_column(Encrypted(sa.String(40)))
    birth_date: Mapped[datetime.date | None] = mapped_column(Encrypted(sa.Date()))
    signed_up_at: Mapped[datetime.datetime]
