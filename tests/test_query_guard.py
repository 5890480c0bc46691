"""SQL that would silently work on ciphertext: ORDER BY, functions, casts,
window functions and hybrid expressions."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

import sqlalchemy_encrypted as se
from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, UnsupportedOperationError
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .helpers import count_statements


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    __table_args__ = {"info": {"tenant_column": "tenant_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str | None] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str | None] = mapped_column(DeterministicEncrypted(sa.String(254)))

    @hybrid_property
    def initial(self) -> str:
        """The first letter of the name; has no SQL form over ciphertext."""
        return (self.name or "")[:1]


def _add_members(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine)
    rows = [("Charlie", "x@example.test"), ("Alpha", "x@example.test"), ("Bravo", "y@example.test")]
    with Session(engine) as session:
        for number, (name, email) in enumerate(rows, start=1):
            session.add(Member(id=number, tenant_id="t-acme", name=name, email=email))
        session.commit()


@pytest.fixture
def members(engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    _add_members(engine)
    with se.tenant_scope("t-acme"):
        yield engine


@pytest.fixture
def pg_members(pg_engine: sa.Engine, keyring: InMemoryKeyring) -> Iterator[sa.Engine]:
    """The members table on PostgreSQL only, for DISTINCT ON."""
    _add_members(pg_engine)
    with se.tenant_scope("t-acme"):
        yield pg_engine


REJECTED: dict[str, tuple[Callable[[], Any], str]] = {
    "order by randomized": (lambda: sa.select(Member).order_by(Member.name), "members.name"),
    "order by desc": (lambda: sa.select(Member).order_by(Member.name.desc()), "members.name"),
    "order by deterministic": (lambda: sa.select(Member).order_by(Member.email), "members.email"),
    "min": (lambda: sa.select(sa.func.min(Member.name)), "members.name"),
    "max deterministic": (lambda: sa.select(sa.func.max(Member.email)), "members.email"),
    "group by randomized": (
        lambda: sa.select(Member.name, sa.func.count()).group_by(Member.name),
        "members.name",
    ),
    "substr": (lambda: sa.select(sa.func.substr(Member.name, 1, 2)), "members.name"),
    "lower": (lambda: sa.select(sa.func.lower(Member.email)), "members.email"),
    "length": (lambda: sa.select(sa.func.length(Member.name)), "members.name"),
    "concat": (lambda: sa.select(Member.name + "x"), "members.name"),
    "cast": (lambda: sa.select(sa.cast(Member.name, sa.Integer)), "members.name"),
    "cast in where": (
        lambda: sa.select(Member.id).where(sa.cast(Member.email, sa.String) == "x"),
        "members.email",
    ),
    "window order": (
        lambda: sa.select(sa.func.row_number().over(order_by=Member.name)),
        "members.name",
    ),
    "window partition randomized": (
        lambda: sa.select(sa.func.row_number().over(partition_by=Member.name)),
        "members.name",
    ),
    "union order by": (
        lambda: sa.union(sa.select(Member.email), sa.select(Member.email)).order_by("email"),
        "members.email",
    ),
    "subquery order by": (
        lambda: sa.select(sa.select(Member.id).order_by(Member.name).subquery()),
        "members.name",
    ),
    "deterministic like": (
        lambda: sa.select(Member).where(Member.email.like("x%")),
        "members.email",
    ),
    "deterministic range": (lambda: sa.select(Member).where(Member.email > "m"), "members.email"),
    "deterministic between": (
        lambda: sa.select(Member).where(Member.email.between("a", "z")),
        "members.email",
    ),
    "update where function": (
        lambda: sa.update(Member).where(sa.func.lower(Member.email) == "x").values(name="y"),
        "members.email",
    ),
    "delete where cast": (
        lambda: sa.delete(Member).where(sa.cast(Member.name, sa.String) == "x"),
        "members.name",
    ),
    "deterministic other column": (
        lambda: sa.select(Member).where(Member.email == Member.tenant_id),
        "members.email",
    ),
    "select distinct randomized": (lambda: sa.select(Member.name).distinct(), "members.name"),
    "select distinct label": (
        lambda: sa.select(Member.name.label("n"), Member.email).distinct(),
        "members.name",
    ),
    "select distinct subquery": (
        lambda: sa.select(sa.select(Member.name).subquery().c.name).distinct(),
        "members.name",
    ),
    "distinct function randomized": (lambda: sa.select(sa.distinct(Member.name)), "members.name"),
    "distinct method randomized": (lambda: sa.select(Member.name.distinct()), "members.name"),
    "count distinct randomized": (
        lambda: sa.select(sa.func.count(Member.name.distinct())),
        "members.name",
    ),
    "union randomized": (
        lambda: sa.union(sa.select(Member.name), sa.select(Member.name)),
        "members.name",
    ),
    "intersect randomized": (
        lambda: sa.intersect(sa.select(Member.name), sa.select(Member.name)),
        "members.name",
    ),
    "except randomized": (
        lambda: sa.except_(sa.select(Member.name), sa.select(Member.name)),
        "members.name",
    ),
    "tuple range randomized": (
        lambda: sa.select(Member).where(sa.tuple_(Member.name, Member.id) > ("A", 0)),
        "members.name",
    ),
    "tuple equality randomized": (
        lambda: sa.select(Member).where(sa.tuple_(Member.name, Member.id) == ("x", 1)),
        "members.name",
    ),
    "tuple range deterministic": (
        lambda: sa.select(Member).where(sa.tuple_(Member.email, Member.id) < ("z", 9)),
        "members.email",
    ),
    "tuple equality deterministic": (
        lambda: sa.select(Member).where(sa.tuple_(Member.id, Member.email) == (1, "x")),
        "members.email",
    ),
    "tuple in deterministic": (
        lambda: sa.select(Member).where(
            sa.tuple_(Member.email, Member.id).in_([("x@example.test", 1)])
        ),
        "members.email",
    ),
    "tuple in delete": (
        lambda: sa.delete(Member).where(sa.tuple_(Member.name, Member.id) == ("x", 1)),
        "members.name",
    ),
    "plain column equals encrypted": (
        lambda: sa.select(Member).where(Member.tenant_id == Member.email),
        "members.email",
    ),
    "literal equals encrypted": (
        lambda: sa.select(Member).where(sa.literal("x@example.test") == Member.email),
        "members.email",
    ),
    "typed bindparam equals encrypted": (
        lambda: sa.select(Member).where(sa.bindparam("e", "x", type_=sa.String) == Member.name),
        "members.name",
    ),
    "case value randomized": (
        lambda: sa.select(sa.case({"x": "hit"}, value=Member.name)),
        "members.name",
    ),
    "case value deterministic": (
        lambda: sa.select(sa.case({"x@example.test": "hit"}, value=Member.email)),
        "members.email",
    ),
    "type_coerce equality": (
        lambda: sa.select(Member).where(sa.type_coerce(Member.email, sa.String) == "x"),
        "members.email",
    ),
    "type_coerce like": (
        lambda: sa.select(Member).where(sa.type_coerce(Member.name, sa.String).like("A%")),
        "members.name",
    ),
    "type_coerce tuple": (
        lambda: sa.select(Member).where(
            sa.type_coerce(sa.tuple_(Member.email, Member.id), sa.types.NullType())
            == sa.tuple_(sa.literal("x"), sa.literal(1))
        ),
        "members.email",
    ),
    "plain in encrypted subquery": (
        lambda: sa.select(Member).where(Member.tenant_id.in_(sa.select(Member.email))),
        "members.email",
    ),
    "deterministic in subquery": (
        lambda: sa.select(Member).where(Member.email.in_(sa.select(Member.email))),
        "members.email",
    ),
    "between encrypted bound": (
        lambda: sa.select(Member).where(Member.tenant_id.between(Member.email, "z")),
        "members.email",
    ),
    "is distinct from encrypted": (
        lambda: sa.select(Member).where(Member.tenant_id.is_distinct_from(Member.name)),
        "members.name",
    ),
    "join on encrypted": (
        lambda: sa.select(Member).join(other := aliased(Member), other.tenant_id == Member.email),
        "members.email",
    ),
    "is true randomized": (
        lambda: sa.select(Member).where(Member.name.is_(True)),
        "members.name",
    ),
    "is value deterministic": (
        lambda: sa.select(Member).where(Member.email.is_("x@example.test")),
        "members.email",
    ),
    "is distinct from value": (
        lambda: sa.select(Member).where(Member.email.is_distinct_from("x@example.test")),
        "members.email",
    ),
    "is not value randomized": (
        lambda: sa.select(Member).where(Member.name.is_not("x")),
        "members.name",
    ),
    "insert returning function": (
        lambda: (
            sa.insert(Member)
            .values(id=99, tenant_id="t-acme", name="n", email="n@example.test")
            .returning(sa.func.lower(Member.email))
        ),
        "members.email",
    ),
    "union over union all": (
        lambda: sa.union(
            sa.union_all(sa.select(Member.name), sa.select(Member.name)).subquery().select(),
            sa.select(Member.name),
        ),
        "members.name",
    ),
}


@pytest.mark.parametrize("build, column", REJECTED.values(), ids=REJECTED.keys())
def test_operation_over_ciphertext_raises_before_sql(
    members: sa.Engine, build: Callable[[], Any], column: str
) -> None:
    with count_statements(members) as counter, Session(members) as session:
        with pytest.raises(UnsupportedOperationError) as caught:
            session.execute(build())
    assert counter.count == 0
    assert column in str(caught.value)


def test_group_by_deterministic_column(members: sa.Engine) -> None:
    with Session(members) as session:
        rows = session.execute(
            sa.select(Member.email, sa.func.count()).group_by(Member.email)
        ).all()
    assert sorted((email, count) for email, count in rows) == [
        ("x@example.test", 2),
        ("y@example.test", 1),
    ]


def test_distinct_deterministic_column(members: sa.Engine) -> None:
    with Session(members) as session:
        emails = session.scalars(sa.select(Member.email).distinct()).all()
        counted = session.scalar(sa.select(sa.func.count(Member.email.distinct())))
    assert sorted(emails) == ["x@example.test", "y@example.test"]
    assert counted == 2


def test_distinct_on_randomized_column(members: sa.Engine) -> None:
    """DISTINCT ON, from ``distinct(*columns)`` and from SQLAlchemy 2.1's
    ``postgresql.distinct_on()``, raises for a randomized column on any dialect."""
    statements = []
    distinct_on = getattr(postgresql, "distinct_on", None)
    if distinct_on is not None:
        statements.append(sa.select(Member.id, Member.name).ext(distinct_on(Member.name)))
    with warnings.catch_warnings():
        # Deprecated in SQLAlchemy 2.1 in favour of distinct_on().
        warnings.simplefilter("ignore", sa.exc.SADeprecationWarning)
        statements.append(sa.select(Member.id, Member.name).distinct(Member.name))

    for statement in statements:
        with count_statements(members) as counter, Session(members) as session:
            with pytest.raises(UnsupportedOperationError) as caught:
                session.execute(statement)
        assert counter.count == 0
        assert "DISTINCT ON" in str(caught.value)
        assert "members.name" in str(caught.value)


def test_distinct_on_deterministic_column(pg_members: sa.Engine) -> None:
    # Without ORDER BY, which is rejected on encrypted columns: PostgreSQL
    # then keeps an arbitrary row of each email.
    statement = sa.select(Member.email, Member.id)
    distinct_on = getattr(postgresql, "distinct_on", None)
    if distinct_on is None:
        statement = statement.distinct(Member.email)
    else:
        statement = statement.ext(distinct_on(Member.email))

    with Session(pg_members) as session:
        rows = session.execute(statement).all()

    assert sorted(row.id for row in rows) in ([1, 3], [2, 3])
    assert sorted(row.email for row in rows) == ["x@example.test", "y@example.test"]


ALLOWED_DUPLICATE_REMOVAL: dict[str, tuple[Callable[[], Any], int]] = {
    "distinct with primary key": (lambda: sa.select(Member.id, Member.name).distinct(), 3),
    "distinct entity": (lambda: sa.select(Member).distinct(), 3),
    "distinct deterministic": (lambda: sa.select(Member.email).distinct(), 2),
    "union all randomized": (
        lambda: sa.union_all(sa.select(Member.name), sa.select(Member.name)),
        6,
    ),
    "union with primary key": (
        lambda: sa.union(sa.select(Member.id, Member.name), sa.select(Member.id, Member.name)),
        3,
    ),
    "union deterministic": (
        lambda: sa.union(sa.select(Member.email), sa.select(Member.email)),
        2,
    ),
}


@pytest.mark.parametrize(
    "build, count", ALLOWED_DUPLICATE_REMOVAL.values(), ids=ALLOWED_DUPLICATE_REMOVAL.keys()
)
def test_duplicate_removal_allowed(
    members: sa.Engine, build: Callable[[], Any], count: int
) -> None:
    """Rows that contain the primary key are unique anyway, UNION ALL keeps
    duplicates, and deterministic columns compare like plaintext."""
    with Session(members) as session:
        rows = session.execute(build()).all()
    assert len(rows) == count


def test_window_partition_by_deterministic_column(members: sa.Engine) -> None:
    with Session(members) as session:
        rows = session.execute(
            sa.select(
                Member.id, sa.func.count().over(partition_by=Member.email).label("same")
            ).order_by(Member.id)
        ).all()
    assert [(row.id, row.same) for row in rows] == [(1, 2), (2, 2), (3, 1)]


def test_hybrid_property_over_encrypted_column(members: sa.Engine) -> None:
    """The instance form of a hybrid works on decrypted values; its class
    form would slice ciphertext, so it raises."""
    with Session(members) as session:
        charlie = session.get(Member, 1)
        assert charlie is not None
        assert charlie.initial == "C"
    with pytest.raises(UnsupportedOperationError, match=r"members\.name"):
        sa.select(Member.initial)


def test_order_by_plain_columns_still_works(members: sa.Engine) -> None:
    with Session(members) as session:
        names = session.scalars(sa.select(Member.name).order_by(Member.id.desc())).all()
    assert names == ["Bravo", "Alpha", "Charlie"]


def test_raw_stored_values_can_be_selected(members: sa.Engine) -> None:
    # Reading the stored bytes under the storage type compares nothing.
    with Session(members) as session:
        stored = session.scalars(sa.select(sa.type_coerce(Member.email, sa.LargeBinary))).all()
        nulls = session.scalars(sa.select(Member.id).where(Member.email.is_not(None))).all()
        not_null = session.scalars(sa.select(Member.id).where(Member.name != sa.null())).all()
        distinct_from_null = session.scalars(
            sa.select(Member.id).where(Member.email.is_distinct_from(None))
        ).all()
        plain = session.scalars(
            sa.select(Member.id).where(sa.literal("t-acme") == Member.tenant_id)
        ).all()
    assert len(stored) == 3
    assert all(isinstance(value, bytes) for value in stored)
    assert len(nulls) == 3
    assert len(not_null) == 3
    assert len(distinct_from_null) == 3
    assert len(plain) == 3


def test_type_coerce_around_safe_expressions(members: sa.Engine) -> None:
    # type_coerce() over a count, or over a subquery that only filters on a
    # deterministic column, compares no ciphertext.
    other = aliased(Member)
    matches = (
        sa.select(sa.func.count())
        .where(other.tenant_id == Member.tenant_id, other.email == "x@example.test")
        .scalar_subquery()
    )
    with Session(members) as session, se.tenant_scope("t-acme"):
        ids = session.scalars(
            sa.select(Member.id).where(sa.type_coerce(matches, sa.Integer) > 0)
        ).all()
        grouped = session.execute(
            sa.select(Member.tenant_id)
            .group_by(Member.tenant_id)
            .having(sa.type_coerce(sa.func.count(Member.name), sa.Integer) > 0)
        ).all()
    assert sorted(ids) == [1, 2, 3]
    assert grouped == [("t-acme",)]


@pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite"])
def test_insert_on_conflict_is_checked(dialect_name: str) -> None:
    module = postgresql if dialect_name == "postgresql" else sqlite
    statement = module.insert(Member).values(
        id=1, tenant_id="t-acme", name="n", email="n@example.test"
    )
    upsert = statement.on_conflict_do_update(
        index_elements=[Member.id],
        set_={"tenant_id": "t-acme"},
        where=sa.literal("n@example.test") == Member.email,
    )

    with pytest.raises(UnsupportedOperationError, match=r"members\.email"):
        upsert.compile(dialect=module.dialect())
