"""A deterministic lookup is an indexable IN over stored bytes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted, tenant_scope
from sqlalchemy_encrypted.testing import InMemoryKeyring


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (
        sa.Index("ix_members_tenant_email", "tenant_id", "email"),
        {"info": {"tenant_column": "tenant_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    name: Mapped[str] = mapped_column(Encrypted(sa.String(100)))
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)))


class _LastSelect:
    def __init__(self) -> None:
        self.statement = ""
        self.parameters: Any = None

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.statement, self.parameters = statement, parameters


def test_lookup_uses_tenant_email_index(engine: sa.Engine, keyring: InMemoryKeyring) -> None:
    """The database finds the row through the index, never by reading and
    decrypting the table: EXPLAIN of the statement the library sends."""
    Base.metadata.create_all(engine)
    rows = [
        {
            "id": i,
            "tenant_id": f"t-{i % 4}",
            "name": f"Member {i}",
            "email": f"m{i:05d}@example.test",
        }
        for i in range(4000)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(Member.__table__), rows)
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE members")
        else:
            conn.exec_driver_sql("ANALYZE")

    last = _LastSelect()
    sa.event.listen(engine, "before_cursor_execute", last)
    try:
        with tenant_scope("t-1"), Session(engine) as session:
            found = session.scalars(
                sa.select(Member).where(
                    Member.tenant_id == "t-1", Member.email == "m02001@example.test"
                )
            ).all()
    finally:
        sa.event.remove(engine, "before_cursor_execute", last)
    assert [(m.id, m.name) for m in found] == [(2001, "Member 2001")]

    explain = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    with engine.connect() as conn:
        plan = "\n".join(
            str(row[-1]) for row in conn.exec_driver_sql(explain + last.statement, last.parameters)
        )
    if engine.dialect.name == "postgresql":
        assert "ix_members_tenant_email" in plan, plan
        assert any(kind in plan for kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan"))
    else:
        assert "USING INDEX ix_members_tenant_email" in plan, plan
