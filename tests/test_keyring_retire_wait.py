"""Retiring waits until no process can still seal under the retired version.

A process caches the active version for its ``active_key_ttl``. After
another process rotates, it keeps sealing new values under the old version
until that lookup expires, so a version retired within that time could get
new values that no process can decrypt any more.
"""

from __future__ import annotations

import datetime
import pickle

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    KeyInUseError,
    KeyPurpose,
    KeyRecentlyActiveError,
    KeyStateError,
)
from sqlalchemy_encrypted.keyring import RETIRE_MARGIN_SECONDS, Keyring, KeyState
from sqlalchemy_encrypted.rotation import reencrypt, retire_key_version

from .keyring_helpers import FakeClock
from .rotation_support import Base, Person, key_versions, raw_values

TENANT = "t-acme"
TTL = 60.0


class WallClock:
    """A UTC wall clock that moves only when ``advance`` is called."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


def _add(engine: sa.Engine, person_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Person.__table__),
            [
                {
                    "id": person_id,
                    "tenant_id": TENANT,
                    "name": f"Person {person_id}",
                    "email": f"person{person_id}@example.test",
                }
            ],
        )


def _state(keyring: Keyring, version: int, purpose: KeyPurpose) -> KeyState:
    return next(
        info.state
        for info in keyring.list_keys(TENANT)
        if info.version == version and info.purpose is purpose
    )


def _versions(engine: sa.Engine, person_id: int) -> list[int]:
    return key_versions(
        [
            raw_values(engine, "persons", "name")[person_id],
            raw_values(engine, "persons", "email")[person_id],
        ]
    )


@pytest.fixture
def schema(engine: sa.Engine) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


def test_writer_lease_blocks_early_retire(
    schema: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    """The application caches version 1 as active. Another keyring on the
    same table rotates, re-encrypts and retires: the retirement waits, and
    the census after the wait finds what the application wrote meanwhile."""
    clock = FakeClock()
    wall = WallClock()
    app = keyring_factory(active_key_ttl=TTL, clock=clock)
    operator = keyring_factory(active_key_ttl=TTL, set_default=False, wall_clock=wall)
    _add(schema, 1)
    operator.rotate(TENANT, activate_now=True)
    se.set_default_key_provider(operator)
    assert reencrypt(schema, Base).ok
    se.set_default_key_provider(app)

    with pytest.raises(KeyRecentlyActiveError) as direct:
        operator.retire(TENANT, 1)
    with pytest.raises(KeyRecentlyActiveError):
        retire_key_version(schema, Base, operator, TENANT, 1)
    _add(schema, 2)
    wall.advance(TTL + RETIRE_MARGIN_SECONDS - 1)
    with pytest.raises(KeyRecentlyActiveError) as late:
        retire_key_version(schema, Base, operator, TENANT, 1)

    # The application's lease on version 1 was still current.
    assert _versions(schema, 2) == [1]
    assert direct.value.retry_after == pytest.approx(TTL + RETIRE_MARGIN_SECONDS)
    assert late.value.retry_after == pytest.approx(1)
    for purpose in KeyPurpose:
        assert _state(operator, 1, purpose) is KeyState.DECRYPT_ONLY

    wall.advance(1)
    clock.advance(TTL)
    _add(schema, 3)
    assert _versions(schema, 3) == [2]
    with pytest.raises(KeyInUseError) as in_use:
        retire_key_version(schema, Base, operator, TENANT, 1)
    assert in_use.value.references == {"persons.name": 1, "persons.email": 1}

    assert reencrypt(schema, Base).ok
    retired = retire_key_version(schema, Base, operator, TENANT, 1)

    assert sorted(info.purpose.value for info in retired) == ["deterministic", "randomized"]
    reader = keyring_factory()
    with Session(schema) as session:
        names = session.scalars(sa.select(Person.name).order_by(Person.id)).all()
    assert names == ["Person 1", "Person 2", "Person 3"]
    assert reader.cache.stats.kms_calls > 0


def test_wait_counts_from_promotion(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    wall = WallClock()
    operator = keyring_factory(active_key_ttl=TTL, wall_clock=wall)
    operator.provision(TENANT)
    operator.rotate(TENANT, KeyPurpose.RANDOMIZED)
    wall.advance(TTL)
    assert [info.version for info in operator.promote_pending(TENANT)] == [2]
    wait = TTL + RETIRE_MARGIN_SECONDS

    wall.advance(wait - 1)
    with pytest.raises(KeyRecentlyActiveError):
        operator.retire(TENANT, 1, KeyPurpose.RANDOMIZED)
    wall.advance(1)
    retired = operator.retire(TENANT, 1, KeyPurpose.RANDOMIZED)

    assert [(info.version, info.state) for info in retired] == [(1, KeyState.RETIRED)]


def test_min_inactive_seconds_sets_wait(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    wall = WallClock()
    operator = keyring_factory(active_key_ttl=TTL, wall_clock=wall)
    operator.provision(TENANT)
    operator.rotate(TENANT, activate_now=True)
    wall.advance(TTL + RETIRE_MARGIN_SECONDS)

    with pytest.raises(KeyRecentlyActiveError) as longer:
        operator.check_retire_wait(TENANT, 1, min_inactive_seconds=600)
    with pytest.raises(se.ConfigurationError, match="0 or more"):
        operator.retire(TENANT, 1, min_inactive_seconds=-1)
    operator.check_retire_wait(TENANT, 1)
    retired = operator.retire(TENANT, 1, KeyPurpose.RANDOMIZED, min_inactive_seconds=0)

    assert longer.value.retry_after == pytest.approx(600 - TTL - RETIRE_MARGIN_SECONDS)
    assert "min_inactive_seconds (--min-inactive on the command line)" in str(longer.value)
    assert [info.purpose for info in retired] == [KeyPurpose.RANDOMIZED]


def test_recently_active_message(engine: sa.Engine, keyring_factory: type[Keyring]) -> None:
    wall = WallClock()
    operator = keyring_factory(active_key_ttl=TTL, wall_clock=wall)
    operator.provision(TENANT)
    operator.rotate(TENANT, KeyPurpose.RANDOMIZED, activate_now=True)
    old = next(
        info
        for info in operator.list_keys(TENANT)
        if info.version == 1 and info.purpose is KeyPurpose.RANDOMIZED
    )
    wall.advance(5)

    with pytest.raises(KeyRecentlyActiveError) as caught:
        operator.retire(TENANT, 1)

    error = caught.value
    message = str(error)
    assert isinstance(error, KeyStateError)
    assert (error.tenant_id, error.version) == (TENANT, 1)
    assert f"randomized key version 1 of tenant 't-acme' (key id {old.key_id})" in message
    assert "stopped being the active version 5 s ago" in message
    assert "Retry in 115 s" in message
    assert "active_key_ttl (60 s) plus 60 s" in message
    assert "--min-inactive" in message
    assert error.not_before == wall.now + datetime.timedelta(seconds=115)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is KeyRecentlyActiveError
    assert (copy.version, copy.retry_after) == (1, error.retry_after)


def test_unknown_inactive_time_needs_override(
    engine: sa.Engine, keyring_factory: type[Keyring]
) -> None:
    """A keyring row edited by hand, without the activation time of the
    version that replaced version 1: the wait cannot be computed."""
    operator = keyring_factory(active_key_ttl=TTL)
    operator.provision(TENANT)
    operator.rotate(TENANT, KeyPurpose.RANDOMIZED, activate_now=True)
    table = operator.table
    with engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.key_version == 2).values(activated_at=None))

    with pytest.raises(KeyStateError, match="cannot tell when") as caught:
        operator.retire(TENANT, 1)
    retired = operator.retire(TENANT, 1, min_inactive_seconds=0)

    assert type(caught.value) is KeyStateError
    assert "--min-inactive 0" in str(caught.value)
    assert [info.version for info in retired] == [1]
