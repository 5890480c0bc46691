"""The smallest useful program: one encrypted table on SQLite with the local KMS.

Run it with ``python examples/quickstart.py [FOLDER]``. It writes the
database and the key file to FOLDER, or to a temporary folder that is
deleted at the end.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    # Each row is sealed under the keys of the tenant in its tenant_id column.
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    # Randomized (AES-256-GCM): equal names give different ciphertexts.
    name: Mapped[str] = mapped_column(Encrypted(sa.String(100)))
    # Deterministic (AES-256-SIV): searchable with == and IN.
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)), index=True)


def run(folder: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{folder / 'app.db'}")

    # The KEK lives in a key file (mode 0600). It wraps the per-tenant DEKs,
    # which the keyring stores in the encryption_keys table.
    kms = LocalKms.create(folder / "master.key")
    keyring = Keyring(engine, kms)  # also becomes the default key provider
    keyring.create_table()
    Base.metadata.create_all(engine)

    with Session(engine) as session:
        session.add_all(
            [
                Customer(tenant_id="acme", name="Mara Quint", email="mara@example.test"),
                Customer(tenant_id="acme", name="Tomas Ekberg", email="tomas@example.test"),
                Customer(tenant_id="globex", name="Ines Duarte", email="ines@example.test"),
            ]
        )
        session.commit()

    # Lookups by a deterministic column run inside the tenant's scope, because
    # the search value is sealed under that tenant's key.
    with tenant_scope("acme"), Session(engine) as session:
        query = sa.select(Customer).where(Customer.email == "mara@example.test")
        customer = session.scalars(query).one()
        print(f"found by email: {customer.name} <{customer.email}>")

    with engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT name FROM customers ORDER BY id").scalars()
        for value in stored:
            print(f"stored name: {bytes(value)[:32].hex()}... ({len(value)} bytes)")

    engine.dispose()


def main() -> None:
    if len(sys.argv) > 1:
        folder = Path(sys.argv[1])
        folder.mkdir(parents=True, exist_ok=True)
        run(folder)
        return
    with tempfile.TemporaryDirectory(prefix="sqlalchemy-encrypted-") as name:
        run(Path(name))


if __name__ == "__main__":
    main()
