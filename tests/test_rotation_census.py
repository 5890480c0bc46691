"""The census counts values per column, tenant and key version without decrypting."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import ConfigurationError, Encrypted, EncryptedType, KeyPurpose
from sqlalchemy_encrypted.rotation import EncryptedColumn, census, encrypted_columns
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import NOTE_TYPE, Base, Invoice, Note, Typed, fill_persons


@pytest.fixture
def schema(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


def _no_decrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any, stored: Any) -> Any:
        raise AssertionError("the census must not decrypt values")

    monkeypatch.setattr(EncryptedType, "decrypt", refuse)


def test_census_counts_per_tenant_and_version(
    schema: sa.Engine, keyring: InMemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_persons(schema, 10)
    keyring.rotate("t-acme")
    fill_persons(schema, 4, start=11)
    _no_decrypt(monkeypatch)

    result = census(schema, Base, tables=["persons"])

    name = result.column("persons.name")
    counts = {(e.tenant_id, e.key_version): e.count for e in name.entries}
    assert counts == {("t-acme", 1): 5, ("t-acme", 2): 2, ("t-globex", 1): 7}
    stale = {(e.tenant_id, e.key_version) for e in name.entries if e.stale}
    assert stale == {("t-acme", 1)}
    assert name.total == 14
    assert result.stale() == {"persons.name": 5, "persons.email": 5}
    assert result.stale(tenants=["t-globex"]) == {}


def test_census_reports_key_states(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 4)
    keyring.rotate("t-acme")
    fill_persons(schema, 2, start=5)

    result = census(schema, Base, columns=["persons.name"])

    states = {(e.tenant_id, e.key_version): e.key_state for e in result}
    assert states[("t-acme", 1)] == "decrypt_only"
    assert states[("t-acme", 2)] == "active"
    assert states[("t-globex", 1)] == "active"
    assert all(e.active_version == 2 for e in result if e.tenant_id == "t-acme")


def test_census_counts_nulls_and_plaintext(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 3)
    with schema.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO persons (id, tenant_id, name) VALUES (100, 't-acme', NULL)"
        )
        for i, text in enumerate(["legacy plaintext", "x", "\x01\x01\x00 looks like a header"]):
            conn.execute(
                sa.text("INSERT INTO persons (id, tenant_id, name) VALUES (:id, 't-acme', :v)"),
                {"id": 200 + i, "v": text.encode()},
            )

    column = census(schema, Base, columns=["persons.name"]).column("persons.name")

    assert column.encrypted == 3
    assert column.nulls == 1
    assert column.not_encrypted == 3
    assert column.total == 7


def test_census_reads_base64_storage(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    with schema.begin() as conn:
        conn.execute(
            sa.insert(Typed.__table__),
            [{"id": i, "tenant_id": "t-acme", "text_b64": f"v{i}"} for i in range(5)],
        )
        conn.exec_driver_sql(
            "INSERT INTO typed_values (id, tenant_id, text_b64) VALUES (9, 't-acme', 'AQ plain')"
        )
    keyring.rotate("t-acme")

    column = census(schema, Base, columns=["typed_values.text_b64"]).column("typed_values.text_b64")

    assert [(e.key_version, e.count, e.stale) for e in column.entries] == [(1, 5, True)]
    assert column.not_encrypted == 1
    assert column.nulls == 0


def test_census_finds_registered_external_column(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    stored = NOTE_TYPE.seal("free text", tenant_id="t-acme")
    with schema.begin() as conn:
        conn.execute(sa.insert(Note.__table__), [{"id": 1, "blob": stored}])

    labels = [c.label for c in encrypted_columns(Base)]
    result = census(schema, Base, tables=["notes"])

    assert "notes.blob" in labels
    assert [(e.tenant_id, e.key_version, e.count) for e in result] == [("t-acme", 1, 1)]


def test_census_flags_value_of_other_tenant(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 2)
    with schema.begin() as conn:
        # Copy row 1's value (tenant t-globex) into row 2 (tenant t-acme).
        conn.exec_driver_sql(
            "UPDATE persons SET name = (SELECT name FROM persons WHERE id = 1) WHERE id = 2"
        )

    column = census(schema, Base, columns=["persons.name"]).column("persons.name")

    assert column.tenant_mismatches == 1
    assert [(e.tenant_id, e.count) for e in column.entries] == [("t-globex", 2)]


def test_census_reports_unknown_key(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    foreign_type = Encrypted(sa.String(34), context="invoices.iban", keyring=InMemoryKeyring())
    with schema.begin() as conn:
        conn.execute(
            sa.insert(Invoice.__table__),
            [{"id": 1, "tenant_id": "t-acme", "iban": "DE00"}],
        )
        conn.execute(
            sa.text("INSERT INTO invoices (id, tenant_id, iban) VALUES (2, 't-acme', :v)"),
            {"v": foreign_type.seal("DE11", tenant_id="t-acme")},
        )

    result = census(schema, Base, tables=["invoices"])

    assert result.unknown_keys == {"invoices.iban": 1}
    states = sorted(e.key_state for e in result)
    assert states == ["active", "unknown"]
    assert not any(e.stale for e in result)


def test_census_unknown_keys_by_row_tenant(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    """A key id missing from the keyring names no tenant, so the row's tenant
    column does. A table without one gives None."""
    foreign = InMemoryKeyring()
    iban = Encrypted(sa.String(34), context="invoices.iban", keyring=foreign)
    blob = Encrypted(sa.String(), context="notes.blob", keyring=foreign)
    fill_persons(schema, 2)
    with schema.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO invoices (id, tenant_id, iban) VALUES (:id, :tenant, :v)"),
            [
                {"id": 1, "tenant": "t-acme", "v": iban.seal("DE00", tenant_id="t-acme")},
                {"id": 2, "tenant": "t-acme", "v": iban.seal("DE11", tenant_id="t-acme")},
                {"id": 3, "tenant": "t-globex", "v": iban.seal("DE22", tenant_id="t-acme")},
            ],
        )
        conn.execute(
            sa.text("INSERT INTO notes (id, blob) VALUES (1, :v)"),
            {"v": blob.seal("note", tenant_id="t-globex")},
        )
    acme_key = foreign.active_key("t-acme", KeyPurpose.RANDOMIZED).key_id
    globex_key = foreign.active_key("t-globex", KeyPurpose.RANDOMIZED).key_id

    result = census(schema, Base)

    assert result.unknown_keys_by_tenant() == {
        "t-acme": {"invoices.iban": {acme_key: 2}},
        "t-globex": {"invoices.iban": {acme_key: 1}},
        None: {"notes.blob": {globex_key: 1}},
    }
    assert census(schema, Base, tenants=["t-globex"]).unknown_keys_by_tenant() == {
        "t-globex": {"invoices.iban": {acme_key: 1}}
    }


def test_census_of_one_tenant(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 6)

    result = census(schema, Base, tables=["persons"], tenants=["t-acme"])

    assert {e.tenant_id for e in result} == {"t-acme"}
    assert sum(e.count for e in result if e.column == "name") == 3


def test_census_of_one_tenant_counts_its_rows(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    """With a tenant filter, a NULL or plaintext value belongs to the tenant
    in its row. A table without a tenant column counts none of them."""
    fill_persons(schema, 4)
    with schema.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO persons (id, tenant_id, name) VALUES "
            "(100, 't-acme', NULL), (101, 't-globex', NULL), (102, 't-new', NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO persons (id, tenant_id, name) VALUES (103, 't-globex', :v)"),
            {"v": b"legacy plaintext"},
        )
        conn.exec_driver_sql("INSERT INTO notes (id, blob) VALUES (1, NULL)")

    acme = census(schema, Base, tables=["persons", "notes"], tenants=["t-acme"])
    everyone = census(schema, Base, tables=["persons", "notes"])
    new = census(schema, Base, tables=["persons"], tenants=["t-new", "t-nope"])

    name = acme.column("persons.name")
    assert name.encrypted == 2
    assert name.nulls == 1
    assert name.not_encrypted == 0
    assert acme.column("notes.blob").nulls == 0
    assert acme.tenants() == {"t-acme"}
    assert everyone.column("persons.name").nulls == 3
    assert everyone.column("persons.name").not_encrypted == 1
    assert everyone.column("notes.blob").nulls == 1
    assert everyone.tenants() == {"t-acme", "t-globex", "t-new"}
    assert new.column("persons.name").nulls == 1
    assert new.tenants() == {"t-new"}


def test_census_to_dict_is_json_ready(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 2)
    data = census(schema, Base, tables=["persons"]).to_dict()

    text = json.dumps(data)
    assert '"persons"' in text
    assert data["columns"][0]["keys"][0]["key_version"] == 1


def test_census_rejects_unknown_names(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    with pytest.raises(ConfigurationError, match="no encrypted columns in table"):
        census(schema, Base, tables=["nope"])
    with pytest.raises(ConfigurationError, match="no encrypted column named"):
        census(schema, Base, columns=["persons.nope"])


def test_encrypted_column_needs_context_in_info() -> None:
    table = sa.Table(
        "loose",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("blob", sa.LargeBinary, info={"encrypted_type": Encrypted(sa.String())}),
    )
    with pytest.raises(ConfigurationError, match="needs context="):
        EncryptedColumn.of(table, "blob")


def test_census_uses_sql_not_python(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 50)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(schema, "before_cursor_execute", record)
    try:
        result = census(schema, Base, columns=["persons.name"])
    finally:
        sa.event.remove(schema, "before_cursor_execute", record)

    assert result.column("persons.name").encrypted == 50
    grouped = [s for s in statements if "GROUP BY" in s]
    assert len(grouped) == 1
    assert "substr(" in grouped[0]


def test_census_entry_names_sealing_key(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    fill_persons(schema, 1)

    entry = next(iter(census(schema, Base, columns=["persons.name"])))

    assert entry.tenant_id == "t-globex"
    assert entry.key_id == keyring.active_key("t-globex", KeyPurpose.RANDOMIZED).key_id
