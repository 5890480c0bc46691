"""Search tokens: how ``==`` and ``IN`` find values on a deterministic column.

A deterministic column's stored bytes depend on the DEK version that sealed
them. During a key rotation a table holds values under several versions,
so a lookup binds the searched value once per decryptable version of the
tenant, in one expanding ``IN`` parameter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import BinaryExpression, ColumnElement
from sqlalchemy.sql.sqltypes import BOOLEANTYPE

from .keys import DataKey, KeyPurpose
from .tenancy import current_tenant

if TYPE_CHECKING:
    from .types import DeterministicEncrypted

__all__ = ["SearchToken", "TokenSearch", "TokenSet"]


class SearchToken:
    """A plaintext paired with the DEK that must seal it."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any, key: DataKey) -> None:
        self.value = value
        self.key = key

    def __repr__(self) -> str:
        return f"<search token key_version={self.key.version}>"


class TokenSet(Sequence[SearchToken]):
    """Value of an expanding IN parameter on a deterministic column.

    SQLAlchemy expands the parameter when the statement executes, so the
    tenant's decryptable key versions are read then, under the tenant scope
    of the execution, not when the statement was built. ``repr()`` shows the
    number of values only.
    """

    def __init__(self, column_type: DeterministicEncrypted[Any], values: Sequence[Any]) -> None:
        self._type = column_type
        self._values = [value for value in values if value is not None]

    def __repr__(self) -> str:
        return f"<{len(self._values)} search value(s) for {self._type.column_identity}>"

    def _keys(self) -> Sequence[DataKey]:
        column_type = self._type
        tenant_id = current_tenant(column_type.column_identity, search=True)
        return column_type.key_provider.decryptable_keys(tenant_id, KeyPurpose.DETERMINISTIC)

    def _tokens(self) -> list[SearchToken]:
        keys = self._keys()
        return [SearchToken(value, key) for value in self._values for key in keys]

    def __len__(self) -> int:
        # No tokens are built to count them.
        return len(self._values) * len(self._keys())

    @overload
    def __getitem__(self, index: int) -> SearchToken: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SearchToken]: ...

    def __getitem__(self, index: int | slice) -> SearchToken | Sequence[SearchToken]:
        return self._tokens()[index]

    def __iter__(self) -> Iterator[SearchToken]:
        return iter(self._tokens())


class TokenSearch(BinaryExpression[bool]):
    """``column IN (tokens)`` or ``NOT IN``: the SQL form of ``==``, ``!=``,
    ``in_()`` and ``not_in()`` on a deterministic column.

    It compiles as the plain IN it is. Its own visit name stops the ORM from
    evaluating it in Python for ORM UPDATE and DELETE statements with
    ``synchronize_session="evaluate"`` or the default ``"auto"``. The
    evaluator would compare decrypted attributes with search tokens and so
    update the wrong objects in the session. With it, ``"auto"`` falls back
    to ``"fetch"`` and ``"evaluate"`` raises.
    """

    __visit_name__ = "encrypted_token_search"
    inherit_cache = True

    def __init__(self, binary: BinaryExpression[Any]) -> None:
        super().__init__(
            binary.left,
            binary.right,
            binary.operator,
            type_=binary.type,
            negate=binary.negate,
            modifiers=binary.modifiers,
        )

    @classmethod
    def build(
        cls, left: ColumnElement[Any], right: ColumnElement[Any], operator: Any, negate: Any
    ) -> TokenSearch:
        """Return ``left operator right`` with its negation ``negate``."""
        # Initialized in place: building a BinaryExpression first and copying
        # it costs a second construction for every comparison.
        search = cls.__new__(cls)
        BinaryExpression.__init__(search, left, right, operator, type_=BOOLEANTYPE, negate=negate)
        return search

    def _negate(self) -> Any:
        # The stock negation returns a plain BinaryExpression, which the ORM
        # would evaluate in Python again.
        negated = super()._negate()  # type: ignore[no-untyped-call]
        if isinstance(negated, BinaryExpression):
            return type(self)(negated)
        return negated


@compiles(TokenSearch)
def _compile_token_search(element: TokenSearch, compiler: Any, **kw: Any) -> str:
    return str(compiler.visit_binary(element, **kw))
