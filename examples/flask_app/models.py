"""The example's one table: patients, each belonging to one clinic (the tenant)."""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    # Each row is sealed under the keys of the clinic in its clinic_id column.
    __table_args__ = (
        sa.UniqueConstraint("clinic_id", "email"),
        {"info": {"tenant_column": "clinic_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str] = mapped_column(sa.String(40), index=True)
    name: Mapped[str] = mapped_column(Encrypted(sa.String(200)))
    # Deterministic, so the API can look patients up by email and the
    # database can enforce one patient per email and clinic.
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)))
    date_of_birth: Mapped[datetime.date | None] = mapped_column(Encrypted(sa.Date))
    notes: Mapped[str | None] = mapped_column(Encrypted(sa.Text))

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "date_of_birth": None if self.date_of_birth is None else self.date_of_birth.isoformat(),
            "notes": self.notes,
        }
