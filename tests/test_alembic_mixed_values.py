"""Tables mixing envelopes, plaintext and NULL, and values that only look encrypted."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import DecryptionError, MixedValuesError, tenant_scope
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .alembic_env import AlembicEnv
from .models import Person

# The schema an application declaring Person creates: encrypted columns are binary.
CREATE_ENCRYPTED_PERSONS = """
op.create_table(
    "persons",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.String(40)),
    sa.Column("name", sa.LargeBinary),
    sa.Column("email", sa.LargeBinary),
)
"""

DECRYPT_NAME = """
op.get_context().config.attributes["reports"].append(op.decrypt_column(
    "persons", "name",
    type_=sa.String(100),
    from_type=sqlalchemy_encrypted.Encrypted(sa.String(100)),
    tenant_column="tenant_id",
    batch_size=64,
    strict={strict},
))
"""

ENCRYPT_NAME = """
op.get_context().config.attributes["reports"].append(op.encrypt_column(
    "persons", "name",
    type_=sqlalchemy_encrypted.Encrypted(sa.String(100)),
    tenant_column="tenant_id",
    batch_size=64,
    strict={strict},
))
"""


def _mixed_rows() -> list[dict[str, Any]]:
    """300 envelopes, 200 plaintext values and 10 NULLs, shuffled, seeded as raw bytes."""
    states = ["envelope"] * 300 + ["plaintext"] * 200 + ["null"] * 10
    random.Random(36).shuffle(states)
    name_type = Person.__table__.c.name.type
    rows = []
    for row_id, state in enumerate(states, start=1):
        tenant = "t-acme" if row_id % 3 else "t-globex"
        text = f"Name {row_id}"
        if state == "envelope":
            stored: bytes | None = name_type.seal(text, tenant_id=tenant)
        elif state == "plaintext":
            stored = text.encode("utf-8")
        else:
            stored = None
        rows.append({"id": row_id, "tenant_id": tenant, "name": stored, "state": state})
    return rows


def _seed(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    table = sa.table(
        "persons",
        sa.column("id"),
        sa.column("tenant_id"),
        sa.column("name", sa.LargeBinary),
    )
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{k: row[k] for k in ("id", "tenant_id", "name")} for row in rows],
        )


def _stored(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        values = conn.exec_driver_sql("SELECT name FROM persons ORDER BY id").scalars().all()
    return [bytes(v) if isinstance(v, memoryview) else v for v in values]


def _columns(engine: sa.Engine) -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns("persons")]


@pytest.fixture
def mixed(
    tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring
) -> tuple[AlembicEnv, list[dict[str, Any]]]:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision("r1", None, CREATE_ENCRYPTED_PERSONS)
    env.upgrade("r1")
    rows = _mixed_rows()
    _seed(engine, rows)
    return env, rows


def test_decrypt_mixed_column_counts(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, rows = mixed
    env.write_revision("r2", "r1", DECRYPT_NAME.format(strict=False))

    env.upgrade("r2")

    (report,) = env.reports
    assert str(report) == "persons.name: decrypted 300, already plaintext 200, NULL 10"
    expected = [None if r["state"] == "null" else f"Name {r['id']}" for r in rows]
    assert _stored(engine) == expected


def test_decrypt_strict_aborts_before_writing(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, rows = mixed
    env.write_revision("r2", "r1", DECRYPT_NAME.format(strict=True))
    before = _stored(engine)

    with pytest.raises(MixedValuesError) as raised:
        env.upgrade("r2")

    error = raised.value
    plaintext_ids = [r["id"] for r in rows if r["state"] == "plaintext"]
    assert error.count == 200
    assert [key[0] for key in error.primary_keys] == plaintext_ids[:10]
    assert "200 value(s) are already plaintext and strict=True" in str(error)
    assert str(plaintext_ids[0]) in str(error)
    assert _stored(engine) == before
    assert _columns(engine) == ["id", "tenant_id", "name", "email"]
    assert env.current() == "r1"


def test_encrypt_mixed_column_counts(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, rows = mixed
    before = _stored(engine)
    env.write_revision("r2", "r1", ENCRYPT_NAME.format(strict=False))

    env.upgrade("r2")

    (report,) = env.reports
    assert str(report) == "persons.name: encrypted 200, already encrypted 300, NULL 10"
    after = _stored(engine)
    for row, old, new in zip(rows, before, after, strict=True):
        if row["state"] == "envelope":
            assert new == old, "an existing envelope was re-encrypted"
        elif row["state"] == "null":
            assert new is None
        else:
            assert new != old
    with Session(engine) as session:
        names = session.scalars(sa.select(Person.name).order_by(Person.id)).all()
    assert names == [None if r["state"] == "null" else f"Name {r['id']}" for r in rows]


def test_encrypt_strict_lists_encrypted_keys(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, rows = mixed
    env.write_revision("r2", "r1", ENCRYPT_NAME.format(strict=True))

    with pytest.raises(MixedValuesError, match=r"300 value\(s\) are already encrypted") as raised:
        env.upgrade("r2")

    envelope_ids = [r["id"] for r in rows if r["state"] == "envelope"]
    assert [key[0] for key in raised.value.primary_keys] == envelope_ids[:10]
    assert "first 10 shown" in str(raised.value)


@pytest.fixture
def plain_env(tmp_path: Path, engine: sa.Engine, keyring: InMemoryKeyring) -> AlembicEnv:
    env = AlembicEnv(tmp_path / "migrations", engine)
    env.write_revision(
        "r1",
        None,
        """
        op.create_table(
            "persons",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("tenant_id", sa.String(40)),
            sa.Column("name", sa.String(100)),
            sa.Column("email", sa.String(254)),
        )
        """,
    )
    env.write_revision("r2", "r1", ENCRYPT_NAME.format(strict=False))
    env.upgrade("r1")
    return env


def _insert_names(engine: sa.Engine, names: dict[int, str]) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO persons (id, tenant_id, name) VALUES (:id, 't-acme', :name)"),
            [{"id": k, "name": v} for k, v in names.items()],
        )


def test_plaintext_starting_with_version_byte(plain_env: AlembicEnv, engine: sa.Engine) -> None:
    names = {1: "\x01hello", 2: "\x01\x01", 3: "\x01\x02\x01short", 4: "plain"}
    _insert_names(engine, names)

    plain_env.upgrade("r2")

    (report,) = plain_env.reports
    assert (report.converted, report.already_converted) == (4, 0)
    with Session(engine) as session:
        stored = dict(session.execute(sa.select(Person.id, Person.name)).all())
    assert stored == names


# A valid header (format 1, AES-256-GCM, flags 0, str tag), a key id no keyring
# holds, a key version and enough bytes for a GCM body.
LOOKALIKE = b"\x01\x01\x00\x01" + b"k" * 16 + b"\x00\x00\x00\x01" + b"b" * 40


def test_binary_plaintext_starting_with_version_byte(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, _ = mixed
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persons SET name = :value WHERE id = 1"),
            {"value": b"\x01\x01\x00 not a header"},
        )
    env.write_revision("r2", "r1", ENCRYPT_NAME.format(strict=False))

    env.upgrade("r2")

    with Session(engine) as session:
        assert session.get(Person, 1).name == "\x01\x01\x00 not a header"


@pytest.mark.parametrize("operation", [ENCRYPT_NAME, DECRYPT_NAME])
def test_header_lookalike_stops_before_writing(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine, operation: str
) -> None:
    env, _ = mixed
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET name = :value WHERE id = 2"), {"value": LOOKALIKE})
    before = _stored(engine)
    env.write_revision("r2", "r1", operation.format(strict=False))

    with pytest.raises(DecryptionError, match=r"persons\.name \(primary key 2\).*valid envelope"):
        env.upgrade("r2")

    assert _stored(engine) == before
    assert env.current() == "r1"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_text_lookalike_is_plaintext(plain_env: AlembicEnv, engine: sa.Engine) -> None:
    # Text can never be an envelope of a binary column. PostgreSQL text cannot
    # even hold the NUL bytes a header needs; SQLite text can.
    text = LOOKALIKE.decode("latin-1")
    _insert_names(engine, {1: text})

    plain_env.upgrade("r2")

    with Session(engine) as session:
        assert session.get(Person, 1).name == text


def test_envelope_of_other_column_is_not_plaintext(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, rows = mixed
    email_type = Person.__table__.c.email.type
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persons SET name = :value WHERE id = 5"),
            {"value": email_type.seal("x@example.test", tenant_id=rows[4]["tenant_id"])},
        )
    env.write_revision("r2", "r1", ENCRYPT_NAME.format(strict=False))

    with pytest.raises(DecryptionError, match=r"primary key 5\).*AES_256_SIV"):
        env.upgrade("r2")


def test_envelope_of_other_tenant_is_rejected(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, _ = mixed
    name_type = Person.__table__.c.name.type
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persons SET tenant_id = 't-acme', name = :value WHERE id = 3"),
            {"value": name_type.seal("moved", tenant_id="t-globex")},
        )
    env.write_revision("r2", "r1", DECRYPT_NAME.format(strict=False))

    with pytest.raises(DecryptionError, match=r"primary key 3\).*t-globex"):
        env.upgrade("r2")
    with tenant_scope("t-globex"):
        assert name_type.decrypt(_stored(engine)[2]) == "moved"


def test_transition_mode_type_still_rejects_lookalike(
    mixed: tuple[AlembicEnv, list[dict[str, Any]]], engine: sa.Engine
) -> None:
    env, _ = mixed
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET name = :value WHERE id = 2"), {"value": LOOKALIKE})
    operation = ENCRYPT_NAME.format(strict=False).replace(
        "Encrypted(sa.String(100))", "Encrypted(sa.String(100), allow_plaintext_reads=True)"
    )
    env.write_revision("r2", "r1", operation)

    with pytest.raises(DecryptionError, match=r"persons\.name \(primary key 2\)"):
        env.upgrade("r2")
