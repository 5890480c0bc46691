"""Run in a separate process by the usage limit tests."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .models import Person


def insert_rows(
    url: str,
    search_path: str | None,
    key_file: str,
    limit: int,
    first_id: int,
    count: int,
    barrier: Any,
) -> None:
    """Insert ``count`` rows of tenant t-acme, one transaction each, through
    a keyring with usage limit ``limit``."""
    connect_args = {"options": f"-c search_path={search_path}"} if search_path else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    Keyring(engine, LocalKms(key_file), key_usage_limit=limit)
    try:
        barrier.wait(30)
        for offset in range(count):
            with Session(engine) as session:
                session.add(
                    Person(
                        id=first_id + offset,
                        tenant_id="t-acme",
                        name=f"worker {first_id} row {offset}",
                        email=f"w{first_id}-{offset}@example.test",
                    )
                )
                session.commit()
    finally:
        engine.dispose()
