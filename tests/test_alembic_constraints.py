"""Encrypt, decrypt and encrypt again a column that UNIQUE, CHECK or NOT NULL constrains.

Each table is created from SQL as written, so unnamed and column-level
constraints stay exactly as a user would have them. On SQLite such a
column cannot be dropped, and the conversion writes the values back in
place. On PostgreSQL the constraints are recreated on the swapped column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, tenant_scope
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .test_alembic_autogenerate import function_bodies


@dataclass(frozen=True)
class Variant:
    """How the email column is constrained, in SQL and in the model."""

    email_sql: str
    table_sql: str = ""
    model_args: tuple[Any, ...] = ()
    unique: bool = False
    nullable: bool = True
    requires_email: bool = False

    @property
    def rejects_duplicates(self) -> bool:
        return self.unique or any(isinstance(arg, sa.UniqueConstraint) for arg in self.model_args)


CHECK_SQL = "email IS NOT NULL OR tenant_id IS NULL"

VARIANTS = {
    "named table unique": Variant(
        "email VARCHAR(254)",
        ", CONSTRAINT uq_accounts_tenant_email UNIQUE (tenant_id, email)",
        (sa.UniqueConstraint("tenant_id", "email", name="uq_accounts_tenant_email"),),
    ),
    "unnamed table unique": Variant(
        "email VARCHAR(254)",
        ", UNIQUE (tenant_id, email)",
        (sa.UniqueConstraint("tenant_id", "email"),),
    ),
    "column unique": Variant("email VARCHAR(254) UNIQUE", unique=True),
    "table check": Variant(
        "email VARCHAR(254)",
        f", CONSTRAINT ck_accounts_email CHECK ({CHECK_SQL})",
        requires_email=True,
    ),
    "column check": Variant(f"email VARCHAR(254) CHECK ({CHECK_SQL})", requires_email=True),
    # A "%" in the recreated constraint's SQL must reach the database as it is.
    "check with percent": Variant(
        "email VARCHAR(254)",
        ", CONSTRAINT ck_accounts_email CHECK (email IS NOT NULL OR tenant_id NOT LIKE '%-%')",
        requires_email=True,
    ),
    "not null and unnamed unique": Variant(
        "email VARCHAR(254) NOT NULL",
        ", UNIQUE (tenant_id, email)",
        (sa.UniqueConstraint("tenant_id", "email"),),
        nullable=False,
    ),
}

ENCRYPT_EMAIL = """
op.encrypt_column(
    "accounts", "email",
    type_=sqlalchemy_encrypted.DeterministicEncrypted(sa.String(254)),
    existing_type=sa.String(254),
    tenant_column="tenant_id",
    batch_size=5,
)
"""

DECRYPT_EMAIL = """
op.decrypt_column(
    "accounts", "email",
    type_=sa.String(254),
    from_type=sqlalchemy_encrypted.DeterministicEncrypted(sa.String(254)),
    tenant_column="tenant_id",
    batch_size=5,
)
"""

EMAILS = {i: f"user{i}@example.test" for i in range(1, 13)}


def _tenant(row_id: int) -> str:
    return "t-acme" if row_id % 2 else "t-globex"


def _model(variant: Variant, *, encrypted: bool = True) -> type[Any]:
    email_type: Any = DeterministicEncrypted(sa.String(254)) if encrypted else sa.String(254)

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        __table_args__ = (*variant.model_args, {"info": {"tenant_column": "tenant_id"}})

        id: Mapped[int] = mapped_column(primary_key=True)
        tenant_id: Mapped[str | None] = mapped_column(sa.String(40))
        email: Mapped[str | None] = mapped_column(
            email_type,
            unique=variant.unique,
            nullable=variant.nullable,
        )

    return Account


def _environment(tmp_path: Path, engine: sa.Engine, variant: Variant) -> AlembicEnv:
    env = AlembicEnv(tmp_path / "migrations", engine)
    create = (
        "CREATE TABLE accounts (id INTEGER NOT NULL PRIMARY KEY, tenant_id VARCHAR(40), "
        f"{variant.email_sql}{variant.table_sql})"
    )
    env.write_revision("r1", None, f"op.execute({create!r})", 'op.drop_table("accounts")')
    return env


def _autogenerate(env: AlembicEnv, metadata: sa.MetaData, revision: str) -> dict[str, list[str]]:
    env.target_metadata = metadata
    path = env.autogenerate(revision)
    bodies = function_bodies(path)
    path.unlink()
    return bodies


def _raw_emails(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT email FROM accounts ORDER BY id").scalars())


def _check_encrypted(engine: sa.Engine, account: type[Any], variant: Variant) -> None:
    stored = _raw_emails(engine)
    assert all(isinstance(value, bytes) for value in stored)
    assert len(set(stored)) == len(EMAILS)

    with Session(engine) as session:
        emails = session.scalars(sa.select(account.email).order_by(account.id)).all()
        assert emails == list(EMAILS.values())
        for row_id in (1, 2, 7):
            with tenant_scope(_tenant(row_id)):
                query = sa.select(account.id).where(account.email == EMAILS[row_id])
                assert session.scalars(query).one() == row_id

    _check_constraint_enforced(engine, account, variant)


def _check_constraint_enforced(engine: sa.Engine, account: type[Any], variant: Variant) -> None:
    """Insert one row the constraint must reject, through the model."""
    if variant.rejects_duplicates:
        rejected = account(id=100, tenant_id=_tenant(3), email=EMAILS[3])
    else:
        assert variant.requires_email or not variant.nullable
        rejected = account(id=100, tenant_id="t-acme", email=None)
    with Session(engine) as session, pytest.raises(sa.exc.IntegrityError):
        session.add(rejected)
        session.commit()

    # Each tenant's key seals the same address differently, so even a UNIQUE
    # constraint on the email alone accepts it in another tenant.
    if variant.rejects_duplicates:
        with Session(engine) as session:
            session.add(account(id=101, tenant_id="t-initech", email=EMAILS[3]))
            session.commit()
            session.delete(session.get(account, 101))
            session.commit()


# The baseline of the column-level UNIQUE on SQLite renders an unnamed
# drop_constraint() in its downgrade, and Alembic warns about that.
@pytest.mark.filterwarnings("ignore:Autogenerate rendered a drop_constraint")
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_constrained_column_cycle(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring, variant: Variant
) -> None:
    account = _model(variant)
    env = _environment(tmp_path, engine, variant)
    env.upgrade("r1")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO accounts (id, tenant_id, email) VALUES (:id, :tenant, :email)"),
            [{"id": i, "tenant": _tenant(i), "email": email} for i, email in EMAILS.items()],
        )

    # What autogenerate reports before encryption is the baseline: SQLAlchemy
    # does not reflect a column-level UNIQUE on SQLite, for example.
    baseline = _autogenerate(env, _model(variant, encrypted=False).metadata, "plain")
    env.write_revision("r2", "r1", ENCRYPT_EMAIL, DECRYPT_EMAIL)

    env.upgrade("head")
    _check_encrypted(engine, account, variant)
    assert _autogenerate(env, account.metadata, "encrypted") == baseline

    env.downgrade("r1")
    assert _raw_emails(engine) == list(EMAILS.values())
    columns = [c["name"] for c in sa.inspect(engine).get_columns("accounts")]
    assert columns == ["id", "tenant_id", "email"]

    env.upgrade("head")
    _check_encrypted(engine, account, variant)
