"""The application model under test: stands in for your own models."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    holder: Mapped[str] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)), index=True)
