"""Errors name the column and never carry plaintext or key bytes; a damaged
value fails only its own row."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import (
    DecryptionError,
    DeterministicEncrypted,
    Encrypted,
    EncryptionError,
    StorageFormatError,
    StoredKeyNotFoundError,
    TenantMismatchError,
    ValueTypeError,
    statement_errors,
)
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import assert_no_secret, exception_texts, record_key_material
from .models import Base, Person

SECRET = "Test Person 900-12-3456"


class LocalBase(DeclarativeBase):
    pass


class Patient(LocalBase):
    __tablename__ = "patients"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)), unique=True)
    age: Mapped[int | None] = mapped_column(Encrypted(sa.Integer()))
    born: Mapped[dt.date | None] = mapped_column(Encrypted(sa.Date()))
    ref: Mapped[uuid.UUID | None] = mapped_column(Encrypted(sa.Uuid()))
    profile: Mapped[Any] = mapped_column(Encrypted(sa.JSON()), nullable=True)
    score: Mapped[float | None] = mapped_column(Encrypted(sa.Float()))
    seen: Mapped[dt.datetime | None] = mapped_column(Encrypted(sa.DateTime(timezone=True)))
    wall: Mapped[dt.datetime | None] = mapped_column(Encrypted(sa.DateTime()))


class Legacy(LocalBase):
    __tablename__ = "legacy"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100), allow_plaintext_reads=True))


@pytest.fixture
def db(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    LocalBase.metadata.create_all(engine)
    Base.metadata.create_all(engine)
    yield engine


def _raw(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.begin() as conn:
        return conn.execute(sa.text(sql), params)


def _stored(engine: sa.Engine, table: str, column: str, row_id: int) -> bytes:
    with engine.connect() as conn:
        value = conn.execute(
            sa.text(f"SELECT {column} FROM {table} WHERE id = :id"), {"id": row_id}
        ).scalar_one()
    return bytes(value)


def _cyclic_list() -> list[Any]:
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    return cyclic


WRONG_TYPES = {
    "bytes into String": ("name", b"Test Person", "expected str, got bytes"),
    "str into Integer": ("age", "42", "expected int, got str"),
    "bool into Integer": ("age", True, "expected int, got bool"),
    "str into Date": ("born", "2020-01-01", "expected date, got str"),
    "datetime into Date": ("born", dt.datetime(2020, 1, 1), "got datetime"),
    "str into Uuid": ("ref", "not-a-uuid", "expected UUID, got str"),
    "int keys into JSON": ("profile", {1: "a"}, "keys must be str"),
    "set into JSON": ("profile", {"a": {1, 2}}, "not serializable as JSON"),
    "NaN into JSON": ("profile", float("nan"), "JSON has no NaN or Infinity"),
    "Infinity nested in JSON": ("profile", {"a": [1, float("inf")]}, "JSON has no NaN"),
    "-Infinity nested in JSON": ("profile", [{"b": float("-inf")}], "JSON has no NaN"),
    "cyclic JSON": ("profile", _cyclic_list(), "contains itself"),
    "huge int into Float": ("score", 10**400, "too large for a float"),
    "int into String": ("name", 12345, "expected str, got int"),
    "lone surrogate": ("name", "bad \ud800 text", "surrogate"),
    "naive into DateTime(timezone=True)": (
        "seen",
        dt.datetime(2024, 3, 1, 12, 30),
        "DateTime(timezone=True) expects an aware datetime, got a naive one",
    ),
    "aware into DateTime()": (
        "wall",
        dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.UTC),
        "DateTime() without timezone=True expects a naive datetime, got an aware one",
    ),
}


@pytest.mark.parametrize("attribute, value, message", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrong_python_type_names_column(
    db: sa.Engine, attribute: str, value: Any, message: str
) -> None:
    with Session(db) as session:
        session.add(Patient(id=1, tenant_id="t-acme", **{attribute: value}))
        with pytest.raises(ValueTypeError) as caught:
            session.flush()
    assert f"patients.{attribute}" in str(caught.value)
    assert message in str(caught.value)
    assert not isinstance(caught.value, sa.exc.StatementError)
    # The only chained exception is the original of this copy of the error
    # (see test_bind_error_cause_chain_ends), which chains nothing.
    original = caught.value.__cause__
    assert caught.value.__context__ is original
    assert type(original) is ValueTypeError
    assert original.__cause__ is None
    assert original.__context__ is None
    secrets = [value] if isinstance(value, (str, bytes)) and len(value) >= 4 else []
    assert_no_secret(exception_texts(caught.value), *secrets)


def test_datetime_kind_checked_in_search(db: sa.Engine) -> None:
    """A search value must be of the column's kind too, and the message
    does not show the value."""
    lookups = sa.Table(
        "lookups",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", DeterministicEncrypted(sa.DateTime(timezone=True))),
        sa.Column("local", DeterministicEncrypted(sa.DateTime())),
    )
    lookups.create(db)
    se.set_default_tenant("t-acme")
    searches = [
        (lookups.c.at, dt.datetime(2031, 7, 9, 18, 45)),
        (lookups.c.local, dt.datetime(2031, 7, 9, 18, 45, tzinfo=dt.UTC)),
    ]

    for column, value in searches:
        with pytest.raises(ValueTypeError) as caught, db.connect() as conn:
            conn.execute(sa.select(lookups.c.id).where(column == value))
        message = str(caught.value)
        assert f"lookups.{column.name}" in message
        assert "2031" not in message
        assert "18:45" not in message


def test_datetime_of_other_kind_stored_earlier_reads(db: sa.Engine) -> None:
    """Values written before the kind was checked read back unchanged."""
    se.set_default_tenant("t-acme")
    naive = dt.datetime(2024, 3, 1, 12, 30)
    aware = dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.UTC)
    # Without the timezone flag of the declared column: the flag is not
    # part of the envelope, so these envelopes are what earlier releases wrote.
    seen_writer = Encrypted(sa.DateTime(), context="patients.seen")
    wall_writer = Encrypted(sa.DateTime(timezone=True), context="patients.wall")
    with db.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO patients (id, tenant_id, seen, wall) VALUES (1, 't', :s, :w)"),
            {
                "s": seen_writer.seal(naive, tenant_id="t-acme"),
                "w": wall_writer.seal(aware, tenant_id="t-acme"),
            },
        )

    with Session(db) as session:
        patient = session.get_one(Patient, 1)

    assert (patient.seen, patient.wall) == (naive, aware)
    assert patient.seen.tzinfo is None
    assert patient.wall.tzinfo is dt.UTC


def _cause_chain(error: BaseException) -> list[BaseException]:
    """Follow ``__cause__`` from ``error``, stopping after a repeat."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        cause = chain[-1].__cause__
        repeated = any(cause is seen for seen in chain)
        chain.append(cause)
        if repeated:
            break
    return chain


def test_bind_error_cause_chain_ends(db: sa.Engine) -> None:
    """SQLAlchemy raises a column type's error from binding parameters
    with itself as ``__cause__``. The library's errors reach the caller as
    a copy instead, whose chain ends."""
    too_long = sa.insert(Patient).values(id=1, tenant_id="t-acme", name="x" * 101)
    with pytest.raises(se.PlaintextTooLongError) as core, db.begin() as conn:
        conn.execute(too_long)
    with Session(db) as session:
        session.add(Patient(id=2, tenant_id="t-acme", age="old"))
        with pytest.raises(ValueTypeError) as orm:
            session.commit()

    for caught in (core, orm):
        error = caught.value
        chain = _cause_chain(error)
        assert len(chain) == 2
        original = chain[1]
        assert original is not error
        assert type(original) is type(error)
        assert original.args == error.args
        assert original.__cause__ is None
        assert error.__suppress_context__
        assert "patients." in str(error)


def test_json_shared_lists_are_not_a_cycle(db: sa.Engine) -> None:
    shared = [1, 2]
    with Session(db) as session:
        session.add(Patient(id=1, tenant_id="t-acme", profile={"a": shared, "b": [shared]}))
        session.commit()
    with Session(db) as session:
        stored = session.get(Patient, 1)
        assert stored is not None
        assert stored.profile == {"a": [1, 2], "b": [[1, 2]]}


def test_json_nan_stored_earlier_still_reads(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    """Python's json module writes NaN and Infinity tokens unless
    allow_nan=False is passed. Values sealed that way before the codec
    rejected them stay readable."""
    profile_type = Patient.__table__.c.profile.type
    assert isinstance(profile_type, Encrypted)
    key = keyring.active_key("t-acme", se.KeyPurpose.RANDOMIZED)
    encoded = b'{"a":NaN,"b":[Infinity,-Infinity]}'
    envelope = profile_type._seal_encoded(encoded, key, "patients.profile")
    _raw(db, "INSERT INTO patients (id, tenant_id, profile) VALUES (1, 't-acme', :v)", v=envelope)
    with Session(db) as session:
        stored = session.get(Patient, 1)
        assert stored is not None
        profile = stored.profile
    assert math.isnan(profile["a"])
    assert profile["b"] == [math.inf, -math.inf]


def test_unexpected_failure_while_sealing_is_not_wrapped(
    db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    column_type = Patient.__table__.c.name.type
    assert isinstance(column_type, Encrypted)

    def broken_encode(value: Any) -> bytes:
        raise RuntimeError(f"codec failed on {value}")

    with Session(db) as session:
        session.add(Patient(id=1, tenant_id="t-acme", name=SECRET))
        # The type that binds is SQLAlchemy's copy of the column type for the dialect.
        bound_type = column_type.dialect_impl(db.dialect)
        # Off the inlined str path, so that every value goes through the codec.
        monkeypatch.setattr(bound_type._hot, "str_limit", -1)
        monkeypatch.setattr(bound_type._hot, "encode", lambda value, column: broken_encode(value))
        with pytest.raises(EncryptionError) as caught:
            session.flush()
    assert "patients.name" in str(caught.value)
    assert "RuntimeError" in str(caught.value)
    assert_no_secret(exception_texts(caught.value), SECRET)


def test_errors_carry_no_plaintext_or_key_bytes(
    db: sa.Engine,
    keyring: InMemoryKeyring,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    created = record_key_material(monkeypatch)
    caught: list[BaseException] = []
    db.echo = "debug"
    try:
        with caplog.at_level(logging.DEBUG):
            with Session(db) as session:
                session.add(Patient(id=1, tenant_id="t-acme", name=SECRET, email=SECRET))
                session.commit()
            tampered = bytearray(_stored(db, "patients", "name", 1))
            tampered[-1] ^= 1
            _raw(db, "UPDATE patients SET name = :v WHERE id = 1", v=bytes(tampered))
            scenarios = [
                lambda: _get(db, 1),
                lambda: _with_scope("t-globex", lambda: _get(db, 1)),
                lambda: _select(db, sa.select(Patient).where(Patient.name == SECRET)),
                lambda: _flush(db, Patient(id=3, tenant_id="t-acme", name=SECRET.encode())),
                lambda: _flush(db, Patient(id=4, tenant_id="t-acme", name=SECRET + "x" * 90)),
                lambda: _flush(db, Patient(id=5, tenant_id="t-acme", email=SECRET)),
                lambda: _flush(db, Patient(id=6, tenant_id="t-acme", profile={SECRET: {1, 2}})),
            ]
            for scenario in scenarios:
                try:
                    scenario()
                except Exception as exc:
                    caught.append(exc)
    finally:
        db.echo = False
    assert len(caught) == len(scenarios)
    assert created
    texts = [text for exc in caught for text in exception_texts(exc)]
    texts += [record.getMessage() for record in caplog.records]
    assert_no_secret(texts, SECRET, *created)
    for exc in caught:
        if isinstance(exc, EncryptionError):
            assert "patients." in str(exc), str(exc)


def _get(engine: sa.Engine, row_id: int) -> Any:
    with Session(engine) as session:
        return session.get(Patient, row_id)


def _select(engine: sa.Engine, statement: Any) -> Any:
    with Session(engine) as session:
        return session.execute(statement).all()


def _with_scope(tenant: str, action: Any) -> Any:
    with se.tenant_scope(tenant):
        return action()


def _flush(engine: sa.Engine, obj: Any) -> None:
    with Session(engine) as session:
        session.add(obj)
        session.commit()


def test_damaged_value_fails_only_its_row(db: sa.Engine) -> None:
    with Session(db) as session:
        for number in (1, 2, 3):
            session.add(Person(id=number, tenant_id="t-acme", name=f"Person {number}"))
        session.commit()
    flipped = bytearray(_stored(db, "persons", "name", 2))
    flipped[-1] ^= 0x01
    _raw(db, "UPDATE persons SET name = :v WHERE id = 2", v=bytes(flipped))
    truncated = _stored(db, "persons", "name", 3)[:-1]
    _raw(db, "UPDATE persons SET name = :v WHERE id = 3", v=truncated)

    with Session(db) as session:
        assert session.get(Person, 1).name == "Person 1"  # type: ignore[union-attr]
    for row_id in (2, 3):
        with Session(db) as session:
            with pytest.raises(DecryptionError) as caught:
                session.get(Person, row_id)
        assert "persons.name" in str(caught.value)
        assert "t-acme" in str(caught.value)
        assert f"Person {row_id}" not in str(caught.value)
    with Session(db) as session:
        rows = session.execute(sa.select(Person.id, Person.tenant_id).order_by(Person.id)).all()
        assert [tuple(row) for row in rows] == [(1, "t-acme"), (2, "t-acme"), (3, "t-acme")]
        with pytest.raises(DecryptionError):
            session.scalars(sa.select(Person.name)).all()


def test_retired_key_is_a_decryption_error(db: sa.Engine, keyring: InMemoryKeyring) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Old Person"))
        session.commit()
    keyring.rotate("t-acme")
    keyring.retire("t-acme", 1)
    with Session(db) as session:
        with pytest.raises(StoredKeyNotFoundError) as caught:
            session.get(Person, 1)
    assert isinstance(caught.value, DecryptionError)
    assert isinstance(caught.value, se.KeyNotFoundError)
    assert "persons.name" in str(caught.value)
    assert "retired" in str(caught.value)


def test_other_tenant_error_names_tenants(db: sa.Engine) -> None:
    with Session(db) as session:
        session.add(Person(id=1, tenant_id="t-acme", name=SECRET))
        session.commit()
    with se.tenant_scope("t-globex"), Session(db) as session:
        with pytest.raises(TenantMismatchError) as caught:
            session.get(Person, 1)
    message = str(caught.value)
    assert "persons.name" in message
    assert "t-globex" in message
    assert "t-acme" in message
    assert "key id" in message


@pytest.mark.parametrize(
    "dialect",
    [sqlite.dialect(), postgresql.psycopg.dialect(), mysql.pymysql.dialect()],
    ids=["sqlite", "postgresql+psycopg", "mysql+pymysql"],
)
def test_result_processor_accepts_driver_buffers(keyring: InMemoryKeyring, dialect: Any) -> None:
    column_type = Encrypted(sa.String(40), context="persons.name")
    envelope = column_type.seal("Test Person", tenant_id="t-acme")
    process = column_type.dialect_impl(dialect).result_processor(dialect, None)
    assert process is not None
    for stored in (envelope, bytearray(envelope), memoryview(envelope)):
        assert process(stored) == "Test Person"
    assert process(None) is None
    with pytest.raises(StorageFormatError, match="returned str where bytes were expected"):
        process(base64.b64encode(envelope).decode())


def _recreate_as_text(engine: sa.Engine, table: str, column: str) -> None:
    text_type = "TEXT" if engine.dialect.name == "sqlite" else "VARCHAR(500)"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, tenant_id VARCHAR(40), "
            f"{column} {text_type}, email {text_type})"
        )


def test_base64_in_text_column_is_storage_error(db: sa.Engine) -> None:
    """The model stores bytes, but the database column is text holding a
    base64 envelope: a named storage error, not a bare TypeError."""
    name_type = Person.__table__.c.name.type
    assert isinstance(name_type, Encrypted)
    envelope = name_type.seal("Test Person", tenant_id="t-acme")
    _recreate_as_text(db, "persons", "name")
    _raw(
        db,
        "INSERT INTO persons (id, tenant_id, name) VALUES (1, 't-acme', :v)",
        v=base64.b64encode(envelope).decode(),
    )
    with Session(db) as session:
        with pytest.raises(StorageFormatError) as caught:
            session.get(Person, 1)
    message = str(caught.value)
    assert "persons.name returned str where bytes were expected" in message
    assert "storage" in message
    assert isinstance(caught.value, DecryptionError)


def test_plaintext_in_stale_column_says_so(db: sa.Engine) -> None:
    """A column decrypted by a migration but still mapped as encrypted."""
    _recreate_as_text(db, "persons", "name")
    _raw(db, "INSERT INTO persons (id, tenant_id, email) VALUES (1, 't-acme', 'a@example.test')")
    with Session(db) as session:
        with pytest.raises(StorageFormatError) as caught:
            session.scalars(sa.select(Person.email)).all()
    message = str(caught.value)
    assert "persons.email" in message
    assert "looks like plaintext" in message
    assert "migration state" in message
    assert "a@example.test" not in message


def test_plaintext_bytes_in_binary_column_say_so(db: sa.Engine) -> None:
    _raw(db, "INSERT INTO persons (id, tenant_id, name) VALUES (1, 't-acme', :v)", v=b"Plain Name")
    with Session(db) as session:
        with pytest.raises(StorageFormatError, match="looks like plaintext"):
            session.get(Person, 1)


def test_legacy_empty_value_is_rejected(db: sa.Engine) -> None:
    """A literal '' written by raw SQL is not an envelope; "" written through
    the column type is."""
    _raw(db, "INSERT INTO persons (id, tenant_id, name) VALUES (1, 't-acme', '')")
    _raw(db, "INSERT INTO persons (id, tenant_id, name) VALUES (2, 't-acme', :v)", v=b"")
    for row_id in (1, 2):
        with Session(db) as session:
            with pytest.raises(
                StorageFormatError, match="empty value, which is not a valid envelope"
            ):
                session.get(Person, row_id)
    with Session(db) as session:
        session.add(Person(id=3, tenant_id="t-acme", name=""))
        session.commit()
        assert session.get(Person, 3).name == ""  # type: ignore[union-attr]


def test_plaintext_transition_mode(db: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """With allow_plaintext_reads, legacy plaintext rows read back as they
    are with one warning that counts them; damaged envelopes still raise."""
    legacy_type = Legacy.__table__.c.name.type
    assert isinstance(legacy_type, Encrypted)
    legacy_type._plaintext_reads = type(legacy_type._plaintext_reads)()
    with se.tenant_scope("t-acme"), Session(db) as session:
        session.add_all([Legacy(id=number, name=f"Sealed {number}") for number in (1, 2, 3)])
        session.commit()
    plaintexts = {4: "Legacy Four", 5: "Legacy \u00e9", 6: "", 7: "multi\nline"}
    for row_id, text in plaintexts.items():
        _raw(db, "INSERT INTO legacy (id, name) VALUES (:id, :v)", id=row_id, v=text.encode())
    _raw(db, "INSERT INTO legacy (id, name) VALUES (8, NULL)")
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted"), Session(db) as session:
        rows = dict(session.execute(sa.select(Legacy.id, Legacy.name)).all())  # type: ignore[arg-type]
    assert rows == {1: "Sealed 1", 2: "Sealed 2", 3: "Sealed 3", **plaintexts, 8: None}
    warnings = [r for r in caplog.records if r.name == "sqlalchemy_encrypted"]
    assert len(warnings) == 1
    assert "legacy.name" in warnings[0].getMessage()
    assert "plaintext value" in warnings[0].getMessage()
    for text in plaintexts.values():
        if text:
            assert text not in warnings[0].getMessage()

    damaged = bytearray(_stored(db, "legacy", "name", 1))
    damaged[-1] ^= 1
    _raw(db, "UPDATE legacy SET name = :v WHERE id = 1", v=bytes(damaged))
    with Session(db) as session:
        with pytest.raises(DecryptionError, match=r"legacy\.name"):
            session.get(Legacy, 1)


def test_plaintext_transition_mode_needs_string_type() -> None:
    with pytest.raises(se.ConfigurationError, match=r"t\.n"):
        sa.Table(
            "t", sa.MetaData(), sa.Column("n", Encrypted(sa.Integer, allow_plaintext_reads=True))
        )


def test_statement_error_text_hides_plaintext(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """Errors raised before a statement reaches the database hold raw
    parameters; the library hides them. Database errors show ciphertext."""
    LocalBase.metadata.create_all(engine)
    insert = sa.text("INSERT INTO patients (id, tenant_id, email) VALUES (:id, :t, :e)").bindparams(
        sa.bindparam("e", type_=Patient.__table__.c.email.type)
    )
    with se.tenant_scope("t-acme"), engine.connect() as conn:
        with pytest.raises(sa.exc.StatementError) as missing:
            conn.execute(insert, {"id": 1, "e": SECRET})
        conn.rollback()
        conn.execute(insert, {"id": 1, "t": "t-acme", "e": SECRET})
        with pytest.raises(sa.exc.IntegrityError) as duplicate:
            conn.execute(insert, {"id": 2, "t": "t-acme", "e": SECRET})
    assert "parameters hidden" in str(missing.value)
    assert_no_secret(exception_texts(missing.value), SECRET)
    assert_no_secret(exception_texts(duplicate.value), SECRET)


def test_hide_parameters_engine_hides_all(tmp_path: Any, keyring: InMemoryKeyring) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/hidden.db", hide_parameters=True)
    LocalBase.metadata.create_all(engine)
    with se.tenant_scope("t-acme"), Session(engine) as session:
        session.add(Patient(id=1, tenant_id="t-acme", email=SECRET))
        session.commit()
        session.add(Patient(id=2, tenant_id="t-acme", email=SECRET))
        with pytest.raises(sa.exc.IntegrityError) as caught:
            session.commit()
    assert "parameters hidden" in str(caught.value)
    assert_no_secret(exception_texts(caught.value), SECRET)
    engine.dispose()


def test_copied_error_keeps_attributes() -> None:
    """The copy made for the cause chain keeps the attributes that
    ``__init__`` sets, for error types whose ``__init__`` takes keywords."""
    original = se.KeyPendingError("pending", tenant_id="t-acme", purpose="randomized", version=2)
    original.add_note("a note")

    copy = statement_errors._copy_error(original)

    assert type(copy) is se.KeyPendingError
    assert copy is not original
    assert copy.args == ("pending",)
    assert (copy.tenant_id, copy.purpose, copy.version) == ("t-acme", "randomized", 2)
    assert copy.__notes__ == ["a note"]


def test_tenant_mismatch_names_key_once(keyring: InMemoryKeyring) -> None:
    column = Encrypted(sa.String(20), context="persons.name")
    stored = column.seal("Private", tenant_id="t-acme")
    key_id = str(se.parse_header(stored).key_id)

    with se.tenant_scope("t-globex"), pytest.raises(se.TenantMismatchError) as raised:
        column.decrypt(stored)

    message = str(raised.value)
    assert message.count(key_id) == 1
    assert "persons.name" in message
    assert "'t-acme'" in message
    assert "'t-globex'" in message
    assert "Private" not in message


def test_base64_reads_after_the_first(keyring: InMemoryKeyring) -> None:
    # The first read remembers a plan for the header, so the later reads
    # below take the decoded fast path and must still reject what the full
    # path rejects.
    column = Encrypted(sa.String(40), storage="base64", context="persons.note")
    # 12 characters make a 64-byte envelope, whose base64 ends in "==".
    stored = base64.b64encode(column.seal("First value!", tenant_id="t-acme")).decode()
    assert stored.endswith("==")
    with se.tenant_scope("t-acme"):
        assert column.decrypt(stored) == "First value!"
        assert column.decrypt(stored) == "First value!"

        # Unused low bits set in the last character: the same bytes, another spelling.
        last = stored.rstrip("=")[-1]
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        twin = alphabet[alphabet.index(last) | 1]
        assert twin != last
        head = stored.rstrip("=")[:-1]
        non_canonical = head + twin + stored[len(stored.rstrip("=")) :]
        assert base64.b64decode(non_canonical) == base64.b64decode(stored)
        with pytest.raises(StorageFormatError, match=r"persons\.note"):
            column.decrypt(non_canonical)

        with pytest.raises(StorageFormatError, match=r"persons\.note"):
            column.decrypt(stored[:20] + "\n" + stored[20:])

        raw = bytearray(base64.b64decode(stored))
        raw[-1] ^= 1
        with pytest.raises(DecryptionError, match=r"persons\.note"):
            column.decrypt(base64.b64encode(bytes(raw)).decode())

        with pytest.raises(StorageFormatError, match=r"persons\.note"):
            column.decrypt("Plain text with spaces")


def test_transition_mode_rejects_respelled_envelopes(keyring: InMemoryKeyring) -> None:
    # With allow_plaintext_reads, text that is not an envelope is returned as
    # legacy plaintext. An envelope spelled in non-canonical base64 is a
    # damaged value, never plaintext: returning it would hand ciphertext to
    # the application as if it were the value.
    column = Encrypted(
        sa.String(40), storage="base64", allow_plaintext_reads=True, context="persons.note"
    )
    stored = base64.b64encode(column.seal("Private value", tenant_id="t-acme")).decode()
    respelled = [
        stored + "\n",
        stored[:30] + "\n" + stored[30:],
        stored.replace("+", "-").replace("/", "_") if "+" in stored or "/" in stored else None,
        stored.rstrip("=") if stored.endswith("=") else None,
    ]
    with se.tenant_scope("t-acme"):
        assert column.decrypt(stored) == "Private value"
        for text in respelled:
            if text is None:
                continue
            with pytest.raises(StorageFormatError, match=r"persons\.note"):
                column.decrypt(text)
        # Real legacy plaintext still reads, also text in the base64 alphabet.
        assert column.decrypt("Legacy plaintext value") == "Legacy plaintext value"
        assert column.decrypt("HelloWorld2024") == "HelloWorld2024"
