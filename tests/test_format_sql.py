"""The SQL that docs/format.md gives for reading envelope headers works."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import KeyPurpose
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .models import Base, Person

POSTGRESQL_HEADER = """
SELECT id,
       get_byte(name, 0) AS format_version,
       get_byte(name, 1) AS algorithm,
       encode(substring(name from 5 for 16), 'hex')::uuid AS key_id,
       ('x' || encode(substring(name from 21 for 4), 'hex'))::bit(32)::bigint AS key_version
FROM persons ORDER BY id
"""

SQLITE_HEADER = """
SELECT id,
       hex(substr(name, 1, 1)) AS format_version,
       hex(substr(name, 2, 1)) AS algorithm,
       lower(hex(substr(name, 5, 16))) AS key_id,
       hex(substr(name, 21, 4)) AS key_version
FROM persons ORDER BY id
"""

POSTGRESQL_STALE = (
    "SELECT count(*) FROM persons WHERE substring(name from 21 for 4) < '\\x00000002'::bytea"
)
SQLITE_STALE = "SELECT count(*) FROM persons WHERE substr(name, 21, 4) < x'00000002'"


def test_documented_header_queries(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Old Person"))
        session.commit()
        keyring.rotate("t-acme")
        session.add(Person(id=2, tenant_id="t-acme", name="New Person"))
        session.commit()
    keys = keyring.decryptable_keys("t-acme", KeyPurpose.RANDOMIZED)
    by_version = {key.version: key.key_id for key in keys}
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(POSTGRESQL_HEADER if postgres else SQLITE_HEADER).all()
        stale = conn.exec_driver_sql(POSTGRESQL_STALE if postgres else SQLITE_STALE).scalar_one()
    if postgres:
        assert [tuple(row) for row in rows] == [
            (1, 1, 1, by_version[1], 1),
            (2, 1, 1, by_version[2], 2),
        ]
    else:
        assert [tuple(row) for row in rows] == [
            (1, "01", "01", by_version[1].hex, "00000001"),
            (2, "01", "01", by_version[2].hex, "00000002"),
        ]
    assert stale == 1
