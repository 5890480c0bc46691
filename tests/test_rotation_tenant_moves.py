"""Values sealed under another tenant's key than their row's tenant column
names: the census counts them and the re-encryption job moves them on request."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    KeyPurpose,
    ReencryptionError,
    TenantMismatchError,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted.rotation import ReencryptionJob, census
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import Base, Person, Typed, fill_persons, raw_values

# fill_persons() gives odd ids to t-globex and even ids to t-acme.


@pytest.fixture
def schema(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


def _copy_name(engine: sa.Engine, source: int, target: int) -> None:
    """Store row ``source``'s sealed name in row ``target``, past the column type."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE persons SET name = (SELECT name FROM persons WHERE id = :s) WHERE id = :t"
            ),
            {"s": source, "t": target},
        )


def _key_tenant(engine: sa.Engine, keyring: InMemoryKeyring, row_id: int) -> str:
    stored = raw_values(engine, "persons", "name")[row_id]
    assert stored is not None
    return keyring.key_by_id(parse_header(stored).key_id).tenant_id


def _name_in_scope(engine: sa.Engine, tenant: str, row_id: int) -> str | None:
    """Read one name inside ``tenant_scope(tenant)``, without the row's email."""
    with tenant_scope(tenant), Session(engine) as session:
        return session.scalar(sa.select(Person.name).where(Person.id == row_id))


def test_census_counts_mismatch_per_tenant_pair(schema: sa.Engine) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)

    column = census(schema, Base, columns=["persons.name"]).column("persons.name")

    assert column.tenant_mismatches == 1
    assert column.mismatches == {("t-globex", "t-acme"): 1}
    assert column.to_dict()["mismatches"] == [
        {"key_tenant": "t-globex", "row_tenant": "t-acme", "count": 1}
    ]


@pytest.mark.parametrize("tenant", ["t-acme", "t-globex"])
def test_census_counts_mismatch_for_either_tenant(schema: sa.Engine, tenant: str) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)

    result = census(schema, Base, columns=["persons.name"], tenants=[tenant])

    assert result.mismatched() == {"persons.name": 1}
    assert {entry.tenant_id for entry in result} == {tenant}


def test_census_counts_no_mismatch_of_other_tenants(schema: sa.Engine) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)

    result = census(schema, Base, columns=["persons.name"], tenants=["t-initech"])

    assert result.mismatched() == {}


def test_job_reports_mismatch_without_moving(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)
    stored = raw_values(schema, "persons", "name")[2]

    result = ReencryptionJob(schema, Base, columns=["persons.name"]).run()

    assert result.status == "succeeded"
    assert result.tenant_mismatches == {"persons.name": 1}
    assert result.values_moved == 0
    assert raw_values(schema, "persons", "name")[2] == stored
    with pytest.raises(ReencryptionError) as raised:
        result.raise_for_failures()
    assert "another tenant's key" in str(raised.value)
    assert "move_to_row_tenant=True" in str(raised.value)
    assert "Person 1" not in str(raised.value)


def test_job_moves_value_to_row_tenant(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)
    assert _name_in_scope(schema, "t-globex", 2) == "Person 1"

    result = ReencryptionJob(
        schema, Base, columns=["persons.name"], move_to_row_tenant=True, batch_size=1
    ).run()

    assert result.status == "succeeded"
    assert result.moves_planned == {"persons.name": 1}
    assert result.values_moved == 1
    assert result.values_reencrypted == 1
    assert result.tenant_mismatches == {}
    assert result.failures == []
    assert _key_tenant(schema, keyring, 2) == "t-acme"
    assert _name_in_scope(schema, "t-acme", 2) == "Person 1"
    with pytest.raises(TenantMismatchError):
        _name_in_scope(schema, "t-globex", 2)
    assert census(schema, Base, columns=["persons.name"]).mismatched() == {}
    result.raise_for_failures()


def test_job_moves_stale_mismatched_value(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)
    keyring.rotate("t-acme")
    keyring.rotate("t-globex")

    result = ReencryptionJob(schema, Base, columns=["persons.name"], move_to_row_tenant=True).run()

    assert result.status == "succeeded"
    assert result.failures == []
    assert result.values_reencrypted == 4
    assert result.values_moved == 1
    stored = raw_values(schema, "persons", "name")[2]
    assert stored is not None
    active = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    assert parse_header(stored).key_id == active.key_id
    assert _name_in_scope(schema, "t-acme", 2) == "Person 1"


def test_job_moves_only_selected_tenants(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    with schema.begin() as conn:
        conn.execute(
            sa.insert(Person.__table__),
            [{"id": 5, "tenant_id": "t-initech", "name": "Initech", "email": None}],
        )
    _copy_name(schema, 1, 2)
    _copy_name(schema, 1, 5)
    unselected = raw_values(schema, "persons", "name")[5]

    result = ReencryptionJob(
        schema, Base, columns=["persons.name"], tenants=["t-acme"], move_to_row_tenant=True
    ).run()

    assert result.status == "succeeded"
    assert result.values_moved == 1
    assert _key_tenant(schema, keyring, 2) == "t-acme"
    assert raw_values(schema, "persons", "name")[5] == unselected
    assert census(schema, Base, columns=["persons.name"]).mismatched() == {"persons.name": 1}


def test_job_cannot_move_to_missing_tenant(schema: sa.Engine) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)
    with schema.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET tenant_id = '' WHERE id = 2"))
    stored = raw_values(schema, "persons", "name")[2]

    result = ReencryptionJob(schema, Base, columns=["persons.name"], move_to_row_tenant=True).run()

    assert result.status == "failed"
    assert [(f.primary_key, f.error_class) for f in result.failures] == [
        ((2,), "TenantContextError")
    ]
    assert "holds no tenant" in result.failures[0].message
    assert result.tenant_mismatches == {"persons.name": 1}
    assert raw_values(schema, "persons", "name")[2] == stored


def test_dry_run_plans_moves(schema: sa.Engine) -> None:
    fill_persons(schema, 4)
    _copy_name(schema, 1, 2)
    before = raw_values(schema, "persons", "name")

    result = ReencryptionJob(
        schema, Base, columns=["persons.name"], move_to_row_tenant=True, dry_run=True
    ).run()

    assert result.status == "dry_run"
    assert result.moves_planned == {"persons.name": 1}
    assert result.tenant_mismatches == {"persons.name": 1}
    assert raw_values(schema, "persons", "name") == before


def test_job_in_transaction_moves_base64_value(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    with Session(schema) as session:
        session.add(Typed(id=1, tenant_id="t-acme", text_b64="Acme text"))
        session.add(Typed(id=2, tenant_id="t-globex", text_b64="Globex text"))
        session.commit()
    with schema.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE typed_values SET text_b64 = "
                "(SELECT text_b64 FROM typed_values WHERE id = 1) WHERE id = 2"
            )
        )

    with schema.begin() as conn:
        result = ReencryptionJob(
            conn,
            Base,
            columns=["typed_values.text_b64"],
            move_to_row_tenant=True,
            checkpoint=False,
        ).run()

    assert result.status == "succeeded"
    assert result.values_moved == 1
    with tenant_scope("t-globex"), Session(schema) as session:
        moved = session.get(Typed, 2)
        assert moved is not None
        assert moved.text_b64 == "Acme text"
