"""The application of the AWS KMS rotation walkthrough: customer accounts per tenant.

``python accounts.py write BATCH`` writes the invented accounts of batch 1
or 2 for each tenant. ``python accounts.py check`` reads every account
back, looks each one up by its encrypted email, and prints a count per
tenant. Both read ``SQLALCHEMY_ENCRYPTED_URL`` and ``SQLALCHEMY_ENCRYPTED_KMS``,
the settings of the ``sqlalchemy-encrypted`` command line.
"""

from __future__ import annotations

import os
import sys

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import kms_from_uri

TENANTS = ["acme-payroll", "birch-dental"]
HOLDERS = {
    1: ["Mara Quint", "Tomas Ekberg", "Ines Duarte"],
    2: ["Jonas Feld", "Edda Marlowe"],
}


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        sa.Index("uq_accounts_tenant_email", "tenant_id", "email", unique=True),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    holder: Mapped[str] = mapped_column(Encrypted(sa.String(200)))
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)))
    iban: Mapped[str] = mapped_column(Encrypted(sa.String(34)))


def email_of(holder: str) -> str:
    return holder.lower().replace(" ", ".") + "@example.test"


def connect() -> sa.Engine:
    engine = sa.create_engine(os.environ["SQLALCHEMY_ENCRYPTED_URL"])
    Keyring(engine, kms_from_uri(os.environ["SQLALCHEMY_ENCRYPTED_KMS"]))
    return engine


def write(batch: int) -> None:
    engine = connect()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for tenant_number, tenant in enumerate(TENANTS):
            for number, holder in enumerate(HOLDERS[batch]):
                # Variations of the IBAN registry's example GB82 WEST 1234 5698 7654 32,
                # with invalid check digits: no real account.
                iban = f"GB82WEST1234569876{tenant_number}{batch}{number:02d}"
                session.add(
                    Account(tenant_id=tenant, holder=holder, email=email_of(holder), iban=iban)
                )
        session.commit()
    print(f"wrote batch {batch}: {len(HOLDERS[batch])} accounts for each of {', '.join(TENANTS)}")


def check() -> None:
    engine = connect()
    with Session(engine) as session:
        for tenant in TENANTS:
            with tenant_scope(tenant):
                accounts = session.scalars(
                    sa.select(Account).where(Account.tenant_id == tenant).order_by(Account.id)
                ).all()
                for account in accounts:
                    query = sa.select(Account.id).where(Account.email == account.email)
                    if session.scalars(query).all() != [account.id]:
                        raise SystemExit(f"lookup by email failed for account {account.id}")
            print(f"{tenant}: {len(accounts)} accounts read, each found by its email")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "write" and len(sys.argv) == 3:
        write(int(sys.argv[2]))
    elif command == "check":
        check()
    else:
        raise SystemExit("usage: accounts.py write 1|2, or accounts.py check")
