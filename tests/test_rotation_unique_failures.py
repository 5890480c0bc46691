"""A re-encrypted row rejected by a unique index is reported once, naming the index.

The same deterministic value under versions 1 and 2 is stored as two byte
strings, so a unique index accepts both until the job re-encrypts the older
one. The database then rejects the whole row update. The failure names the
column of the index, not every encrypted column of the row, and quotes no
value: PostgreSQL's DETAIL line would quote the email.
"""

from __future__ import annotations

import binascii
import decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted
from sqlalchemy_encrypted.rotation import reencrypt
from sqlalchemy_encrypted.rotation.integrity import describe_rejection
from sqlalchemy_encrypted.testing import InMemoryKeyring

CAROL = "carol@example.test"
DAVE = "dave@example.test"


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """Only ``email`` is unique, and ``name`` and ``balance`` have no index."""

    __tablename__ = "patients"
    __table_args__ = (
        sa.UniqueConstraint("email", name="uq_patients_email"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    balance: Mapped[decimal.Decimal | None] = mapped_column(Encrypted(sa.Numeric(10, 2)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))


class UnnamedBase(DeclarativeBase):
    pass


class Visitor(UnnamedBase):
    """A unique column whose constraint the database names itself."""

    __tablename__ = "visitors"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)), unique=True)


def _stored_emails(engine: sa.Engine, table: str) -> list[bytes]:
    with engine.connect() as conn:
        return [bytes(row[0]) for row in conn.execute(sa.text(f"SELECT email FROM {table}"))]


def _forbidden(engine: sa.Engine, table: str) -> list[str]:
    """Return the plaintexts and stored forms that no failure message may contain."""
    stored = _stored_emails(engine, table)
    return [CAROL, DAVE, "Carol", *(binascii.hexlify(value).decode() for value in stored)]


def test_duplicate_reported_once_per_row(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Patient(id=1, tenant_id="t-acme", name="Carol", balance=1, email=CAROL))
        session.add(Patient(id=2, tenant_id="t-acme", name="Dave", balance=2, email=DAVE))
        session.commit()
    keyring.rotate("t-acme")
    with Session(engine) as session:
        session.add(Patient(id=3, tenant_id="t-acme", name="Carol", balance=3, email=CAROL))
        session.commit()

    result = reencrypt(engine, Base)

    assert result.status == "failed"
    assert len(result.failures) == 1
    failure = result.failures[0]
    assert (failure.table, failure.column, failure.primary_key) == ("patients", "email", (1,))
    assert failure.error_class == "IntegrityError"
    assert "unique index" in failure.message
    assert "(email)" in failure.message
    if engine.dialect.name == "postgresql":
        assert "uq_patients_email" in failure.message
        assert "UniqueViolation" in failure.message
    for text in _forbidden(engine, "patients"):
        assert text not in failure.message
    assert result.failures_total == 1
    assert result.remaining == {"patients.name": 1, "patients.balance": 1, "patients.email": 1}


def test_duplicate_under_unnamed_constraint(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    UnnamedBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Visitor(id=1, tenant_id="t-acme", name="Carol", email=CAROL))
        session.commit()
    keyring.rotate("t-acme")
    with Session(engine) as session:
        session.add(Visitor(id=2, tenant_id="t-acme", name="Carol", email=CAROL))
        session.commit()

    result = reencrypt(engine, UnnamedBase)

    assert [(f.column, f.primary_key) for f in result.failures] == [("email", (1,))]
    message = result.failures[0].message
    assert "(email)" in message
    if engine.dialect.name == "postgresql":
        # The name PostgreSQL gave the constraint, which the metadata lacks.
        assert "visitors_email_key" in message
    for text in _forbidden(engine, "visitors"):
        assert text not in message


class _PostgresError(Exception):
    """A stand-in for a psycopg UniqueViolation, with its diagnostics."""

    sqlstate = "23505"

    class diag:
        constraint_name = "uq_patients_email"
        message_detail = "Key (email)=(\\x01c0ffee) already exists."


class _MySqlError(Exception):
    pass


@pytest.mark.parametrize(
    ("original", "unique", "constraint", "columns"),
    [
        (Exception("UNIQUE constraint failed: patients.email"), True, None, ("email",)),
        (
            Exception("UNIQUE constraint failed: patients.tenant_id, patients.email"),
            True,
            None,
            ("tenant_id", "email"),
        ),
        (Exception("UNIQUE constraint failed: patients.nickname"), True, None, ()),
        (Exception("NOT NULL constraint failed: patients.name"), False, None, ()),
        (_PostgresError("duplicate key value"), True, "uq_patients_email", ("email",)),
        (
            _MySqlError(1062, "Duplicate entry 'x' for key 'patients.uq_patients_email'"),
            True,
            "uq_patients_email",
            ("email",),
        ),
        (_MySqlError(1062, "Duplicate entry 'x' for key 'email_copy'"), True, None, ()),
    ],
)
def test_rejection_names_only_known_names(
    original: Exception, unique: bool, constraint: str | None, columns: tuple[str, ...]
) -> None:
    error = sa.exc.IntegrityError("UPDATE patients ...", {}, original)

    rejection = describe_rejection(error, Patient.__table__)  # type: ignore[arg-type]

    assert rejection.unique is unique
    assert rejection.constraint == constraint
    assert rejection.columns == columns
    assert "c0ffee" not in rejection.message()
    assert "'x'" not in rejection.message()
