"""Insert invented plaintext customers, as the application did before encryption.

Run it at revision 0001: ``python seed.py`` with ``SQLALCHEMY_ENCRYPTED_URL``
set. It writes plain SQL, because the model in models.py already describes
the encrypted schema.
"""

from __future__ import annotations

import datetime
import os

import sqlalchemy as sa

CUSTOMERS = [
    ("harbor-books", "Mara Quint", "mara.quint@example.test", "+1 202 555 0101", "1984-02-29"),
    ("harbor-books", "Tomas Ekberg", "tomas.ekberg@example.test", None, "1979-11-03"),
    ("harbor-books", "Ines Duarte", "ines.duarte@example.test", "+1 202 555 0117", None),
    ("kite-travel", "Jonas Feld", "jonas.feld@example.test", "+1 202 555 0142", "1991-06-17"),
    ("kite-travel", "Edda Marlowe", "edda.marlowe@example.test", "+1 202 555 0159", "1968-01-08"),
    ("kite-travel", "Mara Quint", "mara.quint@example.test", None, "1984-02-29"),
]


def rows() -> list[dict[str, object]]:
    signed_up = datetime.datetime(2023, 5, 1, 9, 30)
    return [
        {
            "id": number,
            "tenant_id": tenant,
            "name": name,
            "email": email,
            "phone": phone,
            "birth_date": None if birth is None else datetime.date.fromisoformat(birth),
            "signed_up_at": signed_up + datetime.timedelta(days=number),
        }
        for number, (tenant, name, email, phone, birth) in enumerate(CUSTOMERS, start=1)
    ]


def seed(engine: sa.Engine) -> None:
    customers = sa.table(
        "customers",
        *(sa.column(name) for name in ["id", "tenant_id", "name", "email", "phone"]),
        sa.column("birth_date", sa.Date),
        sa.column("signed_up_at", sa.DateTime),
    )
    with engine.begin() as connection:
        connection.execute(sa.insert(customers), rows())


if __name__ == "__main__":
    seed(sa.create_engine(os.environ["SQLALCHEMY_ENCRYPTED_URL"]))
