"""Encrypted columns through ``create_async_engine`` (aiosqlite, psycopg async),
with a real Keyring on a sync engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sqlalchemy_encrypted import (
    Algorithm,
    ConfigurationError,
    KeyPurpose,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .rotation_support import Base, Person

PERSONS = [
    {"id": 1, "tenant_id": "t-acme", "name": "Mara Quint", "email": "mara@example.test"},
    {"id": 2, "tenant_id": "t-globex", "name": "Ola Berg", "email": "ola@example.test"},
]


def _async_engine(engine: sa.Engine) -> AsyncEngine:
    """Return an async engine on the same database as ``engine``."""
    if engine.dialect.name == "sqlite":
        return create_async_engine(engine.url.set(drivername="sqlite+aiosqlite"))
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    # create_async_engine selects psycopg's async connection for postgresql+psycopg.
    return create_async_engine(engine.url, connect_args={"options": f"-c search_path={schema}"})


async def _insert(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        session.add_all([Person(**person) for person in PERSONS])
        await session.commit()


async def _read(async_engine: AsyncEngine) -> dict[str, Any]:
    """Look one person up by the deterministic email, then read all names."""
    async with AsyncSession(async_engine) as session:
        with tenant_scope("t-acme"):
            query = sa.select(Person).where(Person.email == "mara@example.test")
            found = (await session.scalars(query)).one()
            found_name = found.name
        query = sa.select(Person.id, Person.name).order_by(Person.id)
        rows = (await session.execute(query)).all()
    async with async_engine.connect() as conn:
        query = sa.text("SELECT email FROM persons WHERE id = 1")
        stored = (await conn.execute(query)).scalar_one()
    return {"found": found_name, "rows": [tuple(row) for row in rows], "stored": bytes(stored)}


def _check(results: dict[str, Any]) -> None:
    assert results["found"] == "Mara Quint"
    assert results["rows"] == [(1, "Mara Quint"), (2, "Ola Berg")]
    assert b"mara" not in results["stored"]
    assert parse_header(results["stored"]).algorithm is Algorithm.AES_256_SIV


def test_async_session_separate_sync_keyring(engine: sa.Engine, local_kms: LocalKms) -> None:
    """The keyring gets its own sync engine on the same database."""
    writer = Keyring(engine, local_kms)
    writer.create_table()
    Base.metadata.create_all(engine)
    keyrings: dict[str, Keyring] = {}

    async def scenario() -> dict[str, Any]:
        async_engine = _async_engine(engine)
        try:
            for tenant in ("t-acme", "t-globex"):
                await asyncio.to_thread(writer.provision, tenant)
            await _insert(async_engine)
            # A new keyring starts with empty caches, so the reads below query
            # the keyring table and unwrap DEKs from inside the async session.
            keyrings["cold"] = Keyring(engine, local_kms)
            results = await _read(async_engine)
            # A warmed cache makes the same reads without a KMS call.
            keyrings["warm"] = warm = Keyring(engine, local_kms)
            for tenant in ("t-acme", "t-globex"):
                for purpose in KeyPurpose:
                    await asyncio.to_thread(warm.decryptable_keys, tenant, purpose)
            calls_before_read = warm.cache.stats.kms_calls
            await _read(async_engine)
            results["warm_calls"] = (calls_before_read, warm.cache.stats.kms_calls)
            return results
        finally:
            await async_engine.dispose()

    results = asyncio.run(scenario())

    _check(results)
    assert keyrings["cold"].cache.stats.kms_calls == 3
    assert results["warm_calls"] == (4, 4)


def test_async_session_keyring_on_sync_engine(engine: sa.Engine, local_kms: LocalKms) -> None:
    """The keyring uses ``async_engine.sync_engine``: lookups made while a
    statement runs work, and direct calls run through ``run_sync``."""

    async def scenario() -> dict[str, Any]:
        async_engine = _async_engine(engine)
        keyring = Keyring(async_engine.sync_engine, local_kms)
        try:
            async with async_engine.connect() as conn:
                await conn.run_sync(lambda _: keyring.create_table())
            async with async_engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            async with async_engine.connect() as conn:
                for tenant in ("t-acme", "t-globex"):
                    await conn.run_sync(lambda _, tenant=tenant: keyring.provision(tenant))
            await _insert(async_engine)
            keyring.cache.clear()
            return await _read(async_engine)
        finally:
            await async_engine.dispose()

    _check(asyncio.run(scenario()))


def test_keyring_rejects_async_engine(local_kms: LocalKms) -> None:
    async_engine = create_async_engine("sqlite+aiosqlite://")

    with pytest.raises(ConfigurationError) as caught:
        Keyring(async_engine, local_kms)  # type: ignore[arg-type]

    message = str(caught.value)
    assert "AsyncEngine" in message
    assert "async_engine.sync_engine" in message
    assert "create_engine" in message
