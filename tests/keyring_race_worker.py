"""Run in a separate process by the first-key race test."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .models import Person


def write_for_new_tenants(
    url: str,
    search_path: str | None,
    key_file: str,
    tenants: list[str],
    first_id: int,
    barrier: Any,
) -> None:
    connect_args = {"options": f"-c search_path={search_path}"} if search_path else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    Keyring(engine, LocalKms(key_file))
    try:
        for offset, tenant in enumerate(tenants):
            barrier.wait(30)
            with Session(engine) as session:
                session.add(
                    Person(
                        id=first_id + offset,
                        tenant_id=tenant,
                        name=f"written by {first_id}",
                        email=f"{first_id}@example.test",
                    )
                )
                session.commit()
    finally:
        engine.dispose()
