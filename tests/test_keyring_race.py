"""A tenant's first DEK is created once, even when processes race to create it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import KeyPurpose
from sqlalchemy_encrypted.keyring import Keyring, KeyState
from sqlalchemy_encrypted.kms import LocalKms

from .keyring_race_worker import write_for_new_tenants
from .models import Base, Person

TENANTS = [f"t-race-{index}" for index in range(4)]


def test_two_processes_first_write(
    engine: sa.Engine, keyring_factory: type[Keyring], tmp_path: Path
) -> None:
    key_file = tmp_path / "race.key"
    kms = LocalKms.create(key_file)
    keyring = keyring_factory(engine, kms)
    Base.metadata.create_all(engine)
    search_path = None
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            search_path = conn.exec_driver_sql("SHOW search_path").scalar_one()
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(
            target=write_for_new_tenants,
            args=(url, search_path, str(key_file), TENANTS, first_id, barrier),
        )
        for first_id in (100, 200)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]

    for tenant in TENANTS:
        keys = keyring.list_keys(tenant)
        for purpose in KeyPurpose:
            mine = [k for k in keys if k.purpose is purpose]
            assert [(k.version, k.state) for k in mine] == [(1, KeyState.ACTIVE)]
    keyring.cache.clear()
    with Session(engine) as session:
        people = session.scalars(sa.select(Person).order_by(Person.id)).all()
    assert [(p.id, p.tenant_id) for p in people] == [
        (first_id + offset, tenant)
        for first_id in (100, 200)
        for offset, tenant in enumerate(TENANTS)
    ]
    assert {p.name for p in people} == {"written by 100", "written by 200"}


def test_lost_race_uses_winner(
    engine: sa.Engine, keyring_factory: type[Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insert of the loser hits the unique constraint; it re-reads the winner's key."""
    winner = keyring_factory()
    loser = keyring_factory()
    real_rows = loser._store.tenant_rows
    calls = []

    def stale_first_read(tenant_id: str, *args: object, **kwargs: object) -> list[object]:
        calls.append(tenant_id)
        if len(calls) == 1:
            # The loser read before the winner inserted.
            winner.active_key(tenant_id, KeyPurpose.RANDOMIZED)
            return []
        return real_rows(tenant_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loser._store, "tenant_rows", stale_first_read)
    key = loser.active_key("t-acme", KeyPurpose.RANDOMIZED)
    expected = winner.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert key.key_id == expected.key_id
    assert len(winner.list_keys("t-acme")) == 1
