"""Lookups through bound parameters while a tenant has several key versions.

A bound parameter (``bindparam()``, a ``lambda_stmt`` closure variable) gets
its value when the statement executes, and the compiled statement is cached
and executed again under other tenants and after rotations. Each execution
must still match the value under every decryptable key version of the
tenant in scope, as a lookup with a plain value does.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine.default import CACHE_HIT
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    TooManyKeyVersionsError,
    UnsupportedOperationError,
    ValueTypeError,
    _bound_search,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted._bound_search import MAX_BOUND_LOOKUP_VERSIONS
from sqlalchemy_encrypted.testing import InMemoryKeyring

OLD = "old@example.test"
NEW = "new@example.test"
OTHER = "other@example.test"
TENANT = "t-acme"


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "bound_customers"
    __table_args__ = ({"info": {"tenant_column": "tenant_id"}},)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)), index=True)
    code: Mapped[str | None] = mapped_column(
        DeterministicEncrypted(sa.String(40), storage="base64"), index=True
    )


COLUMNS = {"binary": Customer.email, "base64": Customer.code}


@pytest.fixture
def schema(engine: sa.Engine, keyring: InMemoryKeyring) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


def _add(engine: sa.Engine, row_id: int, value: str | None, tenant: str = TENANT) -> None:
    with Session(engine) as session:
        session.add(Customer(id=row_id, tenant_id=tenant, email=value, code=value))
        session.commit()


def _stored_versions(engine: sa.Engine, column: str) -> dict[int, int]:
    """Return the key version of each row's stored value, read without decrypting."""
    raw = sa.table("bound_customers", sa.column("id"), sa.column(column))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(raw.c.id, raw.c[column])).all()
    versions = {}
    for row_id, stored in rows:
        if stored is None:
            continue
        data = stored.encode() if isinstance(stored, str) else bytes(stored)
        if column == "code":
            data = base64.b64decode(data)
        versions[row_id] = parse_header(data).key_version
    return versions


def _rotated_rows(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """Add row 1 with OLD under key version 1, row 2 with NEW under version 2, row 3 NULL."""
    _add(engine, 1, OLD)
    keyring.rotate(TENANT)
    _add(engine, 2, NEW)
    _add(engine, 3, None)
    assert _stored_versions(engine, "email") == {1: 1, 2: 2}
    assert _stored_versions(engine, "code") == {1: 1, 2: 2}


def _ids(conn: sa.Connection, statement: Any, parameters: dict[str, Any] | None = None) -> Any:
    result = conn.execute(statement, parameters or {})
    return sorted(row[0] for row in result), result.context.cache_hit


# -- bindparam ---------------------------------------------------------------


@pytest.mark.parametrize("storage", list(COLUMNS))
def test_bindparam_finds_rows_of_every_version(
    schema: sa.Engine, keyring: InMemoryKeyring, storage: str
) -> None:
    column = COLUMNS[storage]
    statement = sa.select(Customer.id).where(column == sa.bindparam("e"))
    _add(schema, 1, OLD)

    with schema.connect() as conn, tenant_scope(TENANT):
        # Compiled and cached while the tenant has one key version.
        assert _ids(conn, statement, {"e": OLD})[0] == [1]
        keyring.rotate(TENANT)
        _add(schema, 2, NEW)

        found_old, old_cache = _ids(conn, statement, {"e": OLD})
        found_new, new_cache = _ids(conn, statement, {"e": NEW})
        assert found_old == [1]
        assert found_new == [2]
        assert old_cache == CACHE_HIT
        assert new_cache == CACHE_HIT
        assert _ids(conn, statement, {"e": OTHER})[0] == []

    assert _stored_versions(schema, column.key) == {1: 1, 2: 2}


def test_bound_value_packed_once_per_parameter(
    schema: sa.Engine, keyring: InMemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Packing seals the value under every version, so it must not run once
    # per placeholder: SQLite's "?" style repeats a parameter mentioned twice.
    calls: list[Any] = []
    original = _bound_search.pack_search_value

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(_bound_search, "pack_search_value", counting)
    _rotated_rows(schema, keyring)
    one = sa.select(Customer.id).where(Customer.email == sa.bindparam("e"))
    two = sa.select(Customer.id).where(Customer.email.in_([sa.bindparam("e"), sa.bindparam("f")]))

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, one, {"e": OLD})[0] == [1]
        assert calls == [OLD]
        calls.clear()
        assert _ids(conn, two, {"e": OLD, "f": NEW})[0] == [1, 2]
        assert sorted(calls) == sorted([OLD, NEW])


@pytest.mark.parametrize("storage", list(COLUMNS))
def test_bindparam_not_equal_matches_plain_form(
    schema: sa.Engine, keyring: InMemoryKeyring, storage: str
) -> None:
    column = COLUMNS[storage]
    _rotated_rows(schema, keyring)
    bound = sa.select(Customer.id).where(column != sa.bindparam("e"))

    with schema.connect() as conn, tenant_scope(TENANT):
        for value in (OLD, NEW, OTHER):
            plain = sa.select(Customer.id).where(column != value)
            expected = _ids(conn, plain)[0]
            assert _ids(conn, bound, {"e": value})[0] == expected, value
        # NULL rows are never returned by != or NOT IN, as with a plain value.
        assert _ids(conn, bound, {"e": OTHER})[0] == [1, 2]


def test_bindparam_none_matches_no_row(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)
    equal = sa.select(Customer.id).where(Customer.email == sa.bindparam("e"))
    not_equal = sa.select(Customer.id).where(Customer.email != sa.bindparam("e"))

    with schema.connect() as conn, tenant_scope(TENANT):
        # As for plain columns: a bound None compares as SQL NULL, and
        # neither "= NULL" nor "<> NULL" is true for any row.
        assert _ids(conn, equal, {"e": None})[0] == []
        assert _ids(conn, not_equal, {"e": None})[0] == []


def test_bindparam_with_typed_value_after_rotation(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _rotated_rows(schema, keyring)
    conditions = {
        "typed String": Customer.email == sa.bindparam("e", OLD, type_=sa.String(50)),
        "literal": Customer.email == sa.literal(OLD),
        "value given when built": Customer.email == sa.bindparam("e", OLD),
    }
    with schema.connect() as conn, tenant_scope(TENANT):
        for name, condition in conditions.items():
            assert _ids(conn, sa.select(Customer.id).where(condition))[0] == [1], name


def test_bindparam_in_orm_session(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)
    statement = sa.select(Customer).where(Customer.email == sa.bindparam("e"))

    with Session(schema) as session, tenant_scope(TENANT):
        found = session.scalars(statement, {"e": OLD}).all()

    assert [customer.email for customer in found] == [OLD]


# -- lambda_stmt -------------------------------------------------------------


def _find(value: Any) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(Customer.id).where(Customer.email == value))


def _find_code(value: Any) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(Customer.id).where(Customer.code == value))


def _find_either(first: Any, second: Any) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(Customer.id).where(Customer.email.in_([first, second])))


def _find_none_of(first: Any, second: Any) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(
        lambda: sa.select(Customer.id).where(Customer.email.not_in([first, second]))
    )


def _find_any(values: list[Any]) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(Customer.id).where(Customer.email.in_(values)))


def _find_none(values: list[Any]) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(Customer.id).where(Customer.email.not_in(values)))


@pytest.mark.parametrize("finder", [_find, _find_code], ids=["binary", "base64"])
def test_lambda_finds_rows_of_every_version(
    schema: sa.Engine, keyring: InMemoryKeyring, finder: Callable[[Any], Any]
) -> None:
    _add(schema, 1, OLD)

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, finder(OLD))[0] == [1]
        keyring.rotate(TENANT)
        _add(schema, 2, NEW)

        found_old, old_cache = _ids(conn, finder(OLD))
        found_new, new_cache = _ids(conn, finder(NEW))
        assert found_old == [1]
        assert found_new == [2]
        assert old_cache == CACHE_HIT
        assert new_cache == CACHE_HIT
        assert _ids(conn, finder(OTHER))[0] == []


def test_lambda_shared_by_two_tenants(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _add(schema, 1, OLD, tenant="a")
    _add(schema, 2, OTHER, tenant="b")
    keyring.rotate("a")
    _add(schema, 3, NEW, tenant="a")

    with schema.connect() as conn:
        with tenant_scope("a"):
            # First compiled while tenant a has two key versions.
            assert _ids(conn, _find(OLD))[0] == [1]
            assert _ids(conn, _find(NEW))[0] == [3]
        with tenant_scope("b"):
            found, cache = _ids(conn, _find(OTHER))
            assert found == [2]
            assert cache == CACHE_HIT
            # Tenant b's key never sealed tenant a's values.
            assert _ids(conn, _find(OLD))[0] == []
        with tenant_scope("a"):
            assert _ids(conn, _find(OLD))[0] == [1]
            assert _ids(conn, _find(OTHER))[0] == []


def test_lambda_after_reencrypt_and_retire(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)
    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, _find(OLD))[0] == [1]

    with Session(schema) as session, tenant_scope(TENANT):
        # Writing the same value again seals it under the active version 2.
        session.get_one(Customer, 1).email = OLD + ".tmp"
        session.flush()
        session.get_one(Customer, 1).email = OLD
        session.commit()
    keyring.retire(TENANT, 1)

    assert _stored_versions(schema, "email") == {1: 2, 2: 2}
    with schema.connect() as conn, tenant_scope(TENANT):
        found, cache = _ids(conn, _find(OLD))
        assert found == [1]
        assert cache == CACHE_HIT


def test_lambda_in_list_of_closure_variables(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, _find_either(OLD, NEW))[0] == [1, 2]
        found, cache = _ids(conn, _find_either(NEW, OTHER))
        assert found == [2]
        assert cache == CACHE_HIT
        # None in a list is skipped, as it is among plain values.
        assert _ids(conn, _find_either(OLD, None))[0] == [1]
        assert _ids(conn, _find_none_of(OLD, OTHER))[0] == [2]
        assert _ids(conn, _find_none_of(OLD, None))[0] == [2]


def test_in_list_mixing_bindparam_and_value(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)
    statement = sa.select(Customer.id).where(Customer.email.in_([sa.bindparam("e"), NEW]))

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, statement, {"e": OLD})[0] == [1, 2]
        assert _ids(conn, statement, {"e": OTHER})[0] == [2]


def test_lambda_in_closure_list(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, _find_any([OLD]))[0] == [1]
        found, cache = _ids(conn, _find_any([OLD, NEW, OTHER]))
        assert found == [1, 2]
        assert cache == CACHE_HIT
        assert _ids(conn, _find_any([]))[0] == []
        assert _ids(conn, _find_any([NEW, None]))[0] == [2]
        assert _ids(conn, _find_none([OLD]))[0] == [2]
        # An empty NOT IN is true for every row, NULL rows included, as
        # SQLAlchemy renders it for plain columns.
        assert _ids(conn, _find_none([]))[0] == [1, 2, 3]


def test_expanding_bindparam_finds_every_version(
    schema: sa.Engine, keyring: InMemoryKeyring
) -> None:
    _rotated_rows(schema, keyring)
    statement = sa.select(Customer.id).where(
        Customer.code.in_(sa.bindparam("codes", expanding=True))
    )

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, statement, {"codes": [OLD]})[0] == [1]
        found, cache = _ids(conn, statement, {"codes": [OLD, NEW]})
        assert found == [1, 2]
        assert cache == CACHE_HIT


def test_orm_delete_with_bindparam(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)
    statement = sa.delete(Customer).where(Customer.email == sa.bindparam("e"))

    with Session(schema) as session, tenant_scope(TENANT):
        loaded = session.scalars(sa.select(Customer).order_by(Customer.id)).all()
        # The default synchronize_session="auto" cannot evaluate the lookup
        # in Python, so it fetches the matching rows instead.
        session.execute(statement, {"e": OLD})
        session.commit()
        remaining = session.scalars(sa.select(Customer.id)).all()

    assert sorted(remaining) == [2, 3]
    assert loaded[0] not in session


def test_expanding_bindparam_rejected_on_mysql() -> None:
    statement = sa.select(Customer.id).where(Customer.email.in_(sa.bindparam("e", expanding=True)))

    with pytest.raises(UnsupportedOperationError, match="not supported on mysql"):
        statement.compile(dialect=mysql.dialect())


# -- limits and errors ---------------------------------------------------------


def test_too_many_key_versions_raises(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _add(schema, 1, OLD)
    for _ in range(MAX_BOUND_LOOKUP_VERSIONS):
        keyring.rotate(TENANT)
    statement = sa.select(Customer.id).where(Customer.email == sa.bindparam("e"))

    with schema.connect() as conn, tenant_scope(TENANT):
        with pytest.raises(TooManyKeyVersionsError) as raised:
            conn.execute(statement, {"e": OLD})
        # The plain form has no such limit.
        assert _ids(conn, sa.select(Customer.id).where(Customer.email == OLD))[0] == [1]

    message = str(raised.value)
    assert isinstance(raised.value, UnsupportedOperationError)
    assert "bound_customers.email" in message
    assert repr(TENANT) in message
    assert f"{MAX_BOUND_LOOKUP_VERSIONS + 1} decryptable key versions" in message
    assert "retire" in message
    assert OLD not in message


def test_at_most_versions_still_found(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _add(schema, 1, OLD)
    for _ in range(MAX_BOUND_LOOKUP_VERSIONS - 1):
        keyring.rotate(TENANT)
    _add(schema, 2, NEW)

    with schema.connect() as conn, tenant_scope(TENANT):
        assert _ids(conn, _find(OLD))[0] == [1]
        assert _ids(conn, _find(NEW))[0] == [2]


def test_tenant_without_keys_finds_nothing(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _add(schema, 1, OLD)
    with schema.connect() as conn, tenant_scope("t-new"):
        assert _ids(conn, _find(OLD))[0] == []


# -- what the database and error messages see ---------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Any, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/plain.db")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_compiled_sql_contains_no_plaintext(sqlite_engine: sa.Engine) -> None:
    statements = [
        sa.select(Customer.id).where(Customer.email == sa.bindparam("e", OLD)),
        sa.select(Customer.id).where(Customer.email.in_([sa.bindparam("e", OLD), NEW])),
        sa.select(Customer.id).where(Customer.code.in_(sa.bindparam("e", [OLD], expanding=True))),
        _find(OLD),
        _find_any([OLD]),
    ]
    for statement in statements:
        for dialect in (sqlite_engine.dialect, postgresql.dialect()):
            compiled = statement.compile(dialect=dialect)
            assert OLD not in str(compiled)
            assert NEW not in str(compiled)


@pytest.mark.parametrize(
    "condition",
    [
        lambda: Customer.email == sa.bindparam("e", OLD),
        lambda: Customer.email.in_([sa.bindparam("e", OLD)]),
        lambda: Customer.email.in_(sa.bindparam("e", [OLD], expanding=True)),
    ],
    ids=["scalar", "list", "expanding"],
)
def test_literal_binds_raise_without_plaintext(condition: Callable[[], Any]) -> None:
    statement = sa.select(Customer.id).where(condition())

    with pytest.raises(UnsupportedOperationError) as raised:
        statement.compile(compile_kwargs={"literal_binds": True})

    assert "bound_customers.email" in str(raised.value)
    assert OLD not in str(raised.value)


def test_statement_error_hides_search_value(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    statement = sa.select(Customer.id).where(
        Customer.email == sa.bindparam("e"), Customer.id == sa.bindparam("row")
    )
    with schema.connect() as conn, tenant_scope(TENANT):
        with pytest.raises(StatementError) as raised:
            conn.execute(statement, {"e": OLD})

    assert "row" in str(raised.value)
    assert OLD not in str(raised.value)


def test_wrong_value_type_raises_at_execution(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _add(schema, 1, OLD)
    statement = sa.select(Customer.id).where(Customer.email == sa.bindparam("e"))
    with schema.connect() as conn, tenant_scope(TENANT):
        with pytest.raises(ValueTypeError) as raised:
            conn.execute(statement, {"e": 12345})

    assert "bound_customers.email" in str(raised.value)
    assert "12345" not in str(raised.value)


# -- index use ---------------------------------------------------------------------


def _query_plan(engine: sa.Engine, statement: Any, parameters: dict[str, Any]) -> str:
    """Return the database's plan for ``statement`` as one string."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
        sent.append((sql, params))

    with engine.connect() as conn, tenant_scope(TENANT):
        sa.event.listen(conn, "before_cursor_execute", record)
        conn.execute(statement, parameters).all()
        sa.event.remove(conn, "before_cursor_execute", record)
        sql, params = sent[-1]
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params).all()
            return "\n".join(str(row[-1]) for row in rows)
        # The test tables are tiny, so a sequential scan is always cheaper.
        # Turning it off shows whether the index can serve the lookup.
        conn.exec_driver_sql("SET enable_seqscan = off")
        rows = conn.exec_driver_sql("EXPLAIN " + sql, params).all()
        return "\n".join(str(row[0]) for row in rows)


@pytest.mark.parametrize("storage", list(COLUMNS))
def test_bound_lookup_uses_index(schema: sa.Engine, keyring: InMemoryKeyring, storage: str) -> None:
    column = COLUMNS[storage]
    _rotated_rows(schema, keyring)
    index = f"ix_bound_customers_{column.key}"

    plan = _query_plan(
        schema, sa.select(Customer.id).where(column == sa.bindparam("e")), {"e": OLD}
    )

    if schema.dialect.name == "sqlite":
        assert f"SEARCH bound_customers USING COVERING INDEX {index}" in plan, plan
    else:
        assert f"Index Scan using {index}" in plan or f"Bitmap Index Scan on {index}" in plan
        assert "Seq Scan" not in plan, plan


def test_lambda_lookup_uses_index(schema: sa.Engine, keyring: InMemoryKeyring) -> None:
    _rotated_rows(schema, keyring)

    plan = _query_plan(schema, _find(OLD), {})

    assert "ix_bound_customers_email" in plan, plan
    assert "SCAN bound_customers" not in plan, plan
    assert "Seq Scan" not in plan, plan
