"""``sqlalchemy-encrypted decrypt``: one stored value, without the application's
models, through a real keyring and local KMS on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import logging
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import Encrypted, KeyPurpose, tenant_scope
from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .rotation_support import Base, Color, Membership, Typed, fill_persons, raw_values


class RenamedBase(DeclarativeBase):
    pass


class Client(RenamedBase):
    """A table renamed from ``clients``: its values stay bound to the old name."""

    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    mail: Mapped[str | None] = mapped_column(Encrypted(sa.String(60), context="clients.email"))


@dataclass
class Database:
    """An application database with persons, typed values and memberships."""

    engine: sa.Engine
    url: str
    key_path: Path
    keyring: Keyring

    @property
    def env(self) -> dict[str, str]:
        return {
            "SQLALCHEMY_ENCRYPTED_URL": self.url,
            "SQLALCHEMY_ENCRYPTED_KMS": f"local://{self.key_path}",
        }

    def run(self, *args: str, input: str | None = None, **env: str) -> Result:
        return CliRunner().invoke(cli, list(args), env={**self.env, **env}, input=input)

    def decrypt_json(self, *args: str) -> Any:
        result = self.run("decrypt", *args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


SEEN = dt.datetime(2024, 3, 31, 1, 30, 15, 250, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
REF = uuid.UUID("6f1c2d3e-0000-4000-8000-00000000beef")


def _url_of(engine: sa.Engine) -> str:
    """Return a URL that reaches the engine's tables, PostgreSQL test schema included."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def db(engine: sa.Engine, local_kms: LocalKms, tmp_path: Path) -> Iterator[Database]:
    keyring = Keyring(engine, local_kms, active_key_ttl=0)
    keyring.create_table()
    Base.metadata.create_all(engine)
    RenamedBase.metadata.create_all(engine)
    for tenant in ("t-acme", "t-globex"):
        keyring.provision(tenant)
    fill_persons(engine, 4)
    with Session(engine) as session:
        session.add(
            Typed(
                id=1,
                tenant_id="t-acme",
                text_b64="base64 text",
                number=-(2**70),
                amount=decimal.Decimal("1234.50"),
                ratio=-0.1,
                flag=False,
                born=dt.date(1990, 2, 28),
                seen=SEEN,
                ref=REF,
                doc={"plan": "gold", "seats": [1, 2.5, None, True]},
                color=Color.BLUE,
                raw=b"\x00\xffbytes",
            )
        )
        session.add(Typed(id=2, tenant_id="t-acme"))
        session.add_all(
            [
                Membership(tenant_id="t-acme", user_key="u1", role="owner"),
                Membership(tenant_id="t-globex", user_key="u1", role="viewer"),
            ]
        )
        session.commit()
    with tenant_scope("t-acme"), engine.begin() as conn:
        conn.execute(sa.insert(Client.__table__), {"id": 1, "mail": "c@example.test"})
    yield Database(engine, _url_of(engine), tmp_path / "master.key", keyring)


# -- reading a row ----------------------------------------------------------------------


def test_decrypt_prints_plaintext(db: Database) -> None:
    for column, expected in (("email", "person1@example.test"), ("name", "Person 1")):
        result = db.run("decrypt", "--table", "persons", "--column", column, "--pk", "1")

        assert result.exit_code == 0, result.output
        assert result.stdout == f"{expected}\n"


def test_decrypt_json_names_key(db: Database) -> None:
    data = db.decrypt_json("--table", "persons", "--column", "email", "--pk", "2")

    key = db.keyring.active_key("t-acme", KeyPurpose.DETERMINISTIC)
    assert data == {
        "table": "persons",
        "column": "email",
        "context": "persons.email",
        "primary_key": {"id": 2},
        "tenant": "t-acme",
        "key_id": str(key.key_id),
        "key_version": 1,
        "algorithm": "AES_256_SIV",
        "value_type": "STR",
        "value": "person2@example.test",
    }


TYPED_VALUES = {
    "text_b64": ("STR", "base64 text", "base64 text"),
    "number": ("INT", -(2**70), str(-(2**70))),
    "amount": ("DECIMAL", "1234.50", "1234.50"),
    "ratio": ("FLOAT", -0.1, "-0.1"),
    "flag": ("BOOL", False, "false"),
    "born": ("DATE", "1990-02-28", "1990-02-28"),
    "seen": ("DATETIME", SEEN.isoformat(), SEEN.isoformat()),
    "ref": ("UUID", str(REF), str(REF)),
    "doc": (
        "JSON",
        {"plan": "gold", "seats": [1, 2.5, None, True]},
        '{"plan": "gold", "seats": [1, 2.5, null, true]}',
    ),
    "color": ("ENUM", "BLUE", "BLUE"),
    "raw": ("BYTES", "00ff6279746573", "00ff6279746573"),
}


@pytest.mark.parametrize("column", TYPED_VALUES)
def test_decrypt_each_value_type(db: Database, column: str) -> None:
    value_type, json_value, text = TYPED_VALUES[column]

    data = db.decrypt_json("--table", "typed_values", "--column", column, "--pk", "1")
    result = db.run("decrypt", "--table", "typed_values", "--column", column, "--pk", "1")

    assert data["value_type"] == value_type
    assert data["value"] == json_value
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{text}\n"


HAND_BUILT = {
    "interval": (sa.Interval(), dt.timedelta(days=-1, seconds=5, microseconds=7), "-86394.999993"),
    "time": (sa.Time(), dt.time(23, 59, 1, 5), "23:59:01.000005"),
    "infinity": (sa.Float(), float("-inf"), "-inf"),
    "nan": (sa.Float(), float("nan"), "nan"),
}


@pytest.mark.parametrize("case", HAND_BUILT)
def test_decrypt_hand_built_values(db: Database, case: str) -> None:
    """Types and values the shared model does not store, sealed by hand."""
    inner, value, expected = HAND_BUILT[case]
    envelope = Encrypted(inner, context="typed_values.extra").seal(value, tenant_id="t-acme")
    args = ("decrypt", "--context", "typed_values.extra", "--hex", envelope.hex())

    data = db.decrypt_json(*args[1:])
    result = db.run(*args)

    assert data["value"] == expected
    assert result.stdout == f"{expected}\n"


def test_decrypt_null_value(db: Database) -> None:
    result = db.run("decrypt", "--table", "typed_values", "--column", "doc", "--pk", "2")
    data = db.decrypt_json("--table", "typed_values", "--column", "doc", "--pk", "2")

    assert result.exit_code == 0
    assert result.stdout == ""
    assert "NULL" in result.stderr
    assert data["value"] is None
    assert data["tenant"] is None


def test_decrypt_composite_primary_key(db: Database) -> None:
    args = ("decrypt", "--table", "memberships", "--column", "role")

    globex = db.run(*args, "--pk", "t-globex", "--pk", "u1")
    reordered = db.run(
        *args, "--pk-column", "user_key", "--pk-column", "tenant_id", "--pk", "u1", "--pk", "t-acme"
    )
    one_value = db.run(*args, "--pk", "t-acme")

    assert globex.stdout == "viewer\n"
    assert reordered.stdout == "owner\n"
    assert one_value.exit_code == 2
    assert "2 column(s) (tenant_id, user_key)" in one_value.output


def test_decrypt_by_other_column(db: Database) -> None:
    ambiguous = db.run(
        "decrypt", "--table", "memberships", "--column", "role", "--pk-column", "user_key",
        "--pk", "u1",
    )  # fmt: skip
    unique = db.run(
        "decrypt", "--table", "persons", "--column", "name", "--pk-column", "tenant_id",
        "--pk", "t-globex",
    )  # fmt: skip

    assert ambiguous.exit_code == 1
    assert ambiguous.output.startswith("error: more than one row of table memberships")
    assert unique.exit_code == 1
    assert "more than one row" in unique.output


def test_decrypt_with_context(db: Database) -> None:
    args = ("decrypt", "--table", "customers", "--column", "mail", "--pk", "1")

    without = db.run(*args)
    renamed = db.run(*args, "--context", "clients.email")

    assert without.exit_code == 1
    assert "authentication failed" in without.output
    assert "customers.mail" in without.output
    assert renamed.exit_code == 0, renamed.output
    assert renamed.stdout == "c@example.test\n"


# -- values given on the command line ------------------------------------------------------


def test_decrypt_hex_and_base64_input(db: Database) -> None:
    stored = raw_values(db.engine, "persons", "email")[3]
    assert stored is not None
    identity = ("--table", "persons", "--column", "email")

    for args, stdin in (
        (("--hex", stored.hex()), None),
        (("--hex", "\\x" + stored.hex()), None),
        (("--hex", "-"), "0x" + stored.hex() + "\n"),
        (("--base64", base64.b64encode(stored).decode()), None),
        (("--base64", "-"), base64.b64encode(stored).decode() + "\n"),
    ):
        result = db.run("decrypt", *identity, *args, input=stdin)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout == "person3@example.test\n"
    via_context = db.run("decrypt", "--context", "persons.email", "--hex", stored.hex())
    assert via_context.stdout == "person3@example.test\n"


def test_decrypt_invalid_input_is_one_line(db: Database) -> None:
    identity = ("--table", "persons", "--column", "email")
    cases = {
        ("--hex", "zz"): "the --hex value is not valid hex",
        ("--base64", "***"): "the --base64 value is not valid base64",
        ("--hex", "0102"): "too short to be an envelope",
        ("--hex", b"plain text value here!!!".hex()): "looks like plaintext",
    }
    for args, message in cases.items():
        result = db.run("decrypt", *identity, *args)
        assert result.exit_code == 1, args
        assert result.output.startswith("error: "), args
        assert message in result.output, args
        assert len(result.output.strip().splitlines()) == 1, args


# -- errors ---------------------------------------------------------------------------------


def test_decrypt_not_found_errors(db: Database) -> None:
    cases = {
        ("--table", "nowhere", "--column", "email", "--pk", "1"): "table 'nowhere' not found",
        ("--table", "persons", "--column", "emial", "--pk", "1"): "has no column 'emial'",
        (
            "--table",
            "persons",
            "--column",
            "email",
            "--pk",
            "99",
        ): "no row of table persons has id = 99",
    }
    for args, message in cases.items():
        result = db.run("decrypt", *args)
        assert result.exit_code == 1, args
        assert message in result.output, args
        assert len(result.output.strip().splitlines()) == 1, args


def test_decrypt_plain_column_named(db: Database) -> None:
    """A column that is not encrypted is named with its type, from the
    stored value without --models and from the models with them."""
    args = ("decrypt", "--table", "persons", "--column", "tenant_id", "--pk", "1")
    models = "tests.rotation_support:Base"

    plain = db.run(*args)
    declared = db.run(*args, SQLALCHEMY_ENCRYPTED_MODELS=models)
    integer = db.run("decrypt", "--table", "persons", "--column", "id", "--pk", "1")
    encrypted = db.run(
        "decrypt",
        "--table",
        "persons",
        "--column",
        "email",
        "--pk",
        "1",
        SQLALCHEMY_ENCRYPTED_MODELS=models,
    )

    assert plain.exit_code == 1
    assert "column persons.tenant_id (VARCHAR(40)) does not contain an encrypted value" in (
        plain.output
    )
    assert "text that is not base64" in plain.output
    assert "t-acme" not in plain.output
    assert "t-globex" not in plain.output
    assert len(plain.output.strip().splitlines()) == 1
    assert declared.exit_code == 3
    assert (
        "column persons.tenant_id is not an encrypted column: --models declares it as "
        "String(length=40)" in declared.output
    )
    assert integer.exit_code == 1
    assert "column persons.id (INTEGER)" in integer.output
    assert "of type int, not bytes or text" in integer.output
    assert encrypted.exit_code == 0, encrypted.output
    assert encrypted.output.strip() == "person1@example.test"


def test_decrypt_invalid_primary_key(db: Database) -> None:
    result = db.run("decrypt", "--table", "persons", "--column", "email", "--pk", "one")

    assert result.exit_code == 2
    assert "'one' is not a valid int for column id" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ("--table", "persons", "--column", "email"),
        ("--table", "persons", "--column", "email", "--pk", "1", "--hex", "01"),
        ("--table", "persons", "--pk", "1"),
        ("--hex", "01"),
        ("--table", "persons", "--column", "email", "--hex", "01", "--pk-column", "id"),
    ],
    ids=["no source", "two sources", "no column", "no identity", "pk column without pk"],
)
def test_decrypt_usage_errors(db: Database, args: tuple[str, ...]) -> None:
    result = db.run("decrypt", *args)

    assert result.exit_code == 2


def test_decrypt_tampered_value(db: Database) -> None:
    stored = bytearray(raw_values(db.engine, "persons", "name")[1] or b"")
    stored[-1] ^= 1
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE persons SET name = :v WHERE id = 1"), {"v": bytes(stored)})

    result = db.run("decrypt", "--table", "persons", "--column", "name", "--pk", "1")

    assert result.exit_code == 1
    assert result.output.startswith("error: could not decrypt encrypted column persons.name")
    assert "authentication failed" in result.output
    assert "Person 1" not in result.output


def test_decrypt_other_tenant_rejected(db: Database) -> None:
    args = ("decrypt", "--table", "persons", "--column", "email", "--pk", "1")

    own = db.run(*args, "--tenant", "t-globex")
    other = db.run(*args, "--tenant", "t-acme")

    assert own.stdout == "person1@example.test\n"
    assert other.exit_code == 1
    assert "but tenant_scope is 't-acme'" in other.output
    assert "person1" not in other.output


def test_decrypt_shredded_tenant(db: Database) -> None:
    db.keyring.shred("t-globex")

    result = db.run("decrypt", "--table", "persons", "--column", "email", "--pk", "1")

    assert result.exit_code == 1
    assert "destroyed" in result.output


def test_decrypt_exit_codes(db: Database, tmp_path: Path) -> None:
    args = ("decrypt", "--table", "persons", "--column", "email", "--pk", "1")
    other_key = tmp_path / "other.key"
    LocalKms.create(other_key, kek="kek-b")

    no_kms = db.run(*args, SQLALCHEMY_ENCRYPTED_KMS="")
    wrong_kms = db.run(*args, SQLALCHEMY_ENCRYPTED_KMS=f"local://{other_key}")

    assert no_kms.exit_code == 3
    assert no_kms.output.startswith("error: no KMS")
    assert wrong_kms.exit_code == 4
    assert "kek-a" in wrong_kms.output
    assert len(wrong_kms.output.strip().splitlines()) == 1


# -- audit ------------------------------------------------------------------------------------


def test_decrypt_logs_audit_event(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sqlalchemy_encrypted.audit"):
        result = db.run("decrypt", "--table", "persons", "--column", "email", "--pk", "4")

    assert result.exit_code == 0, result.output
    events = [r for r in caplog.records if getattr(r, "audit_event", None) == "value.decrypted"]
    assert len(events) == 1
    fields = events[0].audit_fields  # type: ignore[attr-defined]
    assert events[0].levelno == logging.WARNING
    assert fields["table"] == "persons"
    assert fields["column"] == "email"
    assert fields["row"] == "id=4"
    assert fields["tenant"] == "t-acme"
    assert fields["version"] == 1
    assert fields["source"] == "row"
    assert fields["user"]
    assert "person4" not in events[0].getMessage()


def test_audit_log_option_writes_file(db: Database, tmp_path: Path) -> None:
    audit_log = tmp_path / "audit.log"

    result = db.run(
        "--audit-log", str(audit_log), "decrypt", "--table", "persons", "--column", "name",
        "--pk", "2",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    lines = audit_log.read_text().splitlines()
    assert len(lines) == 1
    assert "value.decrypted" in lines[0]
    assert "row=id=2" in lines[0]
    assert "Person 2" not in lines[0]


def test_decrypt_table_in_other_schema(
    pg_engine: sa.Engine, local_kms: LocalKms, tmp_path: Path
) -> None:
    keyring = Keyring(pg_engine, local_kms)
    keyring.create_table()
    schema = f"archive_{uuid.uuid4().hex[:8]}"
    email_type = Encrypted(sa.String(60), context="persons.email")
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        conn.exec_driver_sql(f"CREATE TABLE {schema}.persons (id INTEGER PRIMARY KEY, email BYTEA)")
        conn.execute(
            sa.text(f"INSERT INTO {schema}.persons VALUES (7, :v)"),
            {"v": email_type.seal("old@example.test", tenant_id="t-acme")},
        )
    try:
        database = Database(pg_engine, _url_of(pg_engine), tmp_path / "master.key", keyring)
        result = database.run(
            "decrypt", "--schema", schema, "--table", "persons", "--column", "email", "--pk", "7"
        )
    finally:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")

    assert result.exit_code == 0, result.output
    assert result.stdout == "old@example.test\n"


def test_decrypt_help_warns() -> None:
    result = CliRunner().invoke(cli, ["decrypt", "--help"])

    assert result.exit_code == 0
    assert "prints sensitive data" in result.output
    assert "audit" in result.output
