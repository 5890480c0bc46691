"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL comes from, in this order: the URL in
``SQLALCHEMY_ENCRYPTED_TEST_PG_URL``, or a private cluster started from the
local server binaries (see ``pgcluster.py``). Each test gets its own
PostgreSQL schema, dropped afterwards, so tests never see each other's
tables.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import tenancy
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.testing import InMemoryKeyring

from . import mariadbserver, pgcluster
from .motoserver import running_moto_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_schema_counter = itertools.count()
# The databases of the ``engine`` fixtures. MariaDB has its own test module
# and is left out by default, because it adds about 4 minutes to the suite.
# NOTE: with "mariadb" in this list, about 80 tests fail for reasons of the
# tests (REPEATABLE READ snapshots, PostgreSQL-only SQL, AUTO_INCREMENT of
# id 0, conversions that MySQL does not support), not of the library.
ENGINE_DIALECTS = os.environ.get("SQLALCHEMY_ENCRYPTED_TEST_DIALECTS", "sqlite,postgresql").split(
    ","
)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    explicit = os.environ.get("SQLALCHEMY_ENCRYPTED_TEST_PG_URL")
    if explicit:
        yield explicit
        return
    try:
        cluster, root = pgcluster.start_cluster()
    except pgcluster.ClusterUnavailable as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb_server_url() -> Iterator[str]:
    explicit = os.environ.get("SQLALCHEMY_ENCRYPTED_TEST_MARIADB_URL")
    if explicit:
        yield explicit
        return
    try:
        import pymysql  # noqa: F401
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"PyMySQL is required in CI: {exc}")
        pytest.skip(f"PyMySQL is not installed: {exc}")
    try:
        with mariadbserver.running_mariadb_server() as url:
            yield url
    except mariadbserver.ServerUnavailable as exc:
        if IN_CI:
            pytest.fail(f"MariaDB is required in CI: {exc}")
        pytest.skip(str(exc))


def _mariadb_engine(server_url: str) -> Iterator[sa.Engine]:
    database = f"test_{os.getpid()}_{next(_schema_counter)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{database}`")
    engine = sa.create_engine(sa.make_url(server_url).set(database=database))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE `{database}`")
        admin.dispose()


def _server_engine(request: pytest.FixtureRequest, dialect: str) -> Iterator[sa.Engine]:
    if dialect == "mariadb":
        yield from _mariadb_engine(request.getfixturevalue("mariadb_server_url"))
    else:
        yield from _postgres_engine(request.getfixturevalue("pg_server_url"))


def _postgres_engine(server_url: str) -> Iterator[sa.Engine]:
    schema = f"test_{os.getpid()}_{next(_schema_counter)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine = sa.create_engine(server_url, connect_args={"options": f"-c search_path={schema}"})
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=ENGINE_DIALECTS)
def engine(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[sa.Engine]:
    """An empty database, once on SQLite (a file) and once on PostgreSQL."""
    if request.param == "sqlite":
        sqlite_engine = sa.create_engine(f"sqlite:///{tmp_path}/test.db")
        yield sqlite_engine
        sqlite_engine.dispose()
        return
    yield from _server_engine(request, request.param)


@pytest.fixture
def mariadb_engine(mariadb_server_url: str) -> Iterator[sa.Engine]:
    """An empty MariaDB database, for the tests of MySQL-family support."""
    yield from _mariadb_engine(mariadb_server_url)


@pytest.fixture(scope="module", params=ENGINE_DIALECTS)
def module_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sa.Engine]:
    """Like ``engine``, but shared by the tests of one module, for tests that
    create their tables once (property-based tests, for example)."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "test.db"
        sqlite_engine = sa.create_engine(f"sqlite:///{path}")
        yield sqlite_engine
        sqlite_engine.dispose()
        return
    yield from _server_engine(request, request.param)


@pytest.fixture
def pg_engine(pg_server_url: str) -> Iterator[sa.Engine]:
    """An empty PostgreSQL schema, for tests that need PostgreSQL only."""
    yield from _postgres_engine(pg_server_url)


@pytest.fixture
def keyring() -> Iterator[InMemoryKeyring]:
    """An in-memory keyring installed as the default key provider."""
    provider = InMemoryKeyring()
    se.set_default_key_provider(provider)
    yield provider
    se.set_default_key_provider(None)


@pytest.fixture(autouse=True)
def _reset_global_state() -> Iterator[None]:
    yield
    se.set_default_tenant(None)
    se.set_default_key_provider(None)
    assert tenancy.scoped_tenant() is None, "a test leaked a tenant_scope"


# -- keyring and KMS -------------------------------------------------------


@pytest.fixture
def local_kms(tmp_path: Path) -> LocalKms:
    return LocalKms.create(tmp_path / "master.key", kek="kek-a")


@pytest.fixture
def keyring_factory(engine: sa.Engine, local_kms: LocalKms) -> type[Keyring]:
    """A Keyring class that defaults to the test engine and LocalKms and creates its table."""

    class _Factory(Keyring):
        def __init__(self, *args: object, **kwargs: object) -> None:
            if not args:
                args = (engine, local_kms)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.create_table()

    return _Factory


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """URL of a moto server on 127.0.0.1 shared by the session's AWS KMS tests."""
    with running_moto_server() as url:
        yield url
