"""The census: how many values each key version still protects.

For every encrypted column the census counts values per tenant, key id and
key version by grouping rows on the stored header (see :mod:`.headers`).
It decrypts nothing and, with the keyring, calls no KMS. The cost is one
scan of each table per encrypted column.

A value is *stale* when its key version is lower than the active version of
its tenant for the column's purpose. Values under a destroyed key (a
shredded tenant) are unreadable on purpose and never count as stale.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..keys import KeyProvider, KeyPurpose
from .catalog import KeyCatalog, KeyLister, KeyStateName
from .columns import EncryptedColumn, Target, resolve_columns
from .headers import HeaderPrefix, decode_prefix, envelope_condition, header_prefix

__all__ = ["Census", "CensusEntry", "ColumnCensus", "census", "census_column"]

_NULL, _ENVELOPE, _OTHER = 0, 1, 2


@dataclass(frozen=True)
class CensusEntry:
    """The number of values of one column under one key."""

    table: str
    column: str
    tenant_id: str | None
    key_id: uuid.UUID
    key_version: int
    key_state: str
    active_version: int | None
    count: int

    @property
    def label(self) -> str:
        return f"{self.table}.{self.column}"

    @property
    def stale(self) -> bool:
        """True when the tenant has a newer active version for this column."""
        return (
            self.key_state != KeyStateName.DESTROYED
            and self.active_version is not None
            and self.key_version < self.active_version
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "column": self.column,
            "tenant_id": self.tenant_id,
            "key_id": str(self.key_id),
            "key_version": self.key_version,
            "key_state": self.key_state,
            "active_version": self.active_version,
            "count": self.count,
            "stale": self.stale,
        }


def _is_current(entry: CensusEntry) -> bool:
    """True when the entry's key is its tenant's active version and not destroyed."""
    return (
        entry.key_state != KeyStateName.DESTROYED
        and entry.tenant_id is not None
        and entry.key_version == entry.active_version
    )


@dataclass
class ColumnCensus:
    """The census of one encrypted column.

    ``not_encrypted`` counts non-NULL values that are not envelopes (legacy
    plaintext). ``tenant_mismatches`` counts values sealed under a keyring
    key of another tenant than their row's tenant column names (a NULL
    tenant column included), and ``mismatches`` splits that count by the
    key's tenant and the row's tenant. ``row_tenants`` is the set of tenant
    column values of the rows counted, empty for a table without a tenant
    column.

    With a tenant filter, an envelope belongs to the tenant of its key, and
    a NULL, a non-envelope value or an envelope whose key id no keyring row
    has to the tenant in its row's tenant column.
    A table without a tenant column then counts no NULL or non-envelope
    value, because no column names the tenant of such a row. A value under
    another tenant's key counts in ``tenant_mismatches`` when either its
    key's tenant or its row's tenant is selected.
    """

    column: EncryptedColumn
    entries: list[CensusEntry] = field(default_factory=list)
    nulls: int = 0
    not_encrypted: int = 0
    tenant_mismatches: int = 0
    # (tenant of the key, tenant in the row's tenant column) -> values.
    mismatches: dict[tuple[str, str | None], int] = field(default_factory=dict)
    row_tenants: set[str] = field(default_factory=set)
    # Values under key ids that no keyring row has, per (row tenant, key id).
    # The row tenant is None in a table without a tenant column, or for a NULL one.
    unknown_key_rows: dict[tuple[str | None, uuid.UUID], int] = field(
        default_factory=dict, repr=False
    )
    # Stored header -> (tenant, key version, stale) for every header found.
    headers: dict[HeaderPrefix, CensusEntry] = field(default_factory=dict, repr=False)
    # Stored header -> tenant of its key, for the headers of values counted
    # in tenant_mismatches.
    mismatch_headers: dict[HeaderPrefix, str] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.column.label

    @property
    def encrypted(self) -> int:
        return sum(entry.count for entry in self.entries)

    @property
    def total(self) -> int:
        return self.encrypted + self.nulls + self.not_encrypted

    def matching(
        self,
        tenants: Iterable[str] | None = None,
        versions: Iterable[int] | None = None,
        *,
        include_current: bool = False,
    ) -> list[CensusEntry]:
        """Return the stale entries of the given tenants and key versions (all if None).

        With ``include_current``, also the entries under their tenant's
        active version, which a re-encoding job rewrites too.
        """
        tenant_set = None if tenants is None else set(tenants)
        version_set = None if versions is None else set(versions)
        return [
            entry
            for entry in self.entries
            if (entry.stale or (include_current and _is_current(entry)))
            and (tenant_set is None or entry.tenant_id in tenant_set)
            and (version_set is None or entry.key_version in version_set)
        ]

    def stale_headers(
        self,
        tenants: Iterable[str] | None = None,
        versions: Iterable[int] | None = None,
        *,
        include_current: bool = False,
    ) -> dict[HeaderPrefix, CensusEntry]:
        """Return the stored headers of the values a re-encryption should rewrite,
        each with the entry naming its tenant and key version."""
        selected = {
            id(entry) for entry in self.matching(tenants, versions, include_current=include_current)
        }
        return {prefix: entry for prefix, entry in self.headers.items() if id(entry) in selected}

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.column.qualified_table,
            "column": self.column.name,
            "purpose": self.column.purpose.value,
            "total": self.total,
            "encrypted": self.encrypted,
            "nulls": self.nulls,
            "not_encrypted": self.not_encrypted,
            "tenant_mismatches": self.tenant_mismatches,
            "mismatches": [
                {"key_tenant": key_tenant, "row_tenant": row_tenant, "count": count}
                for (key_tenant, row_tenant), count in sorted(
                    self.mismatches.items(), key=lambda item: (item[0][0], item[0][1] or "")
                )
            ],
            "stale": sum(entry.count for entry in self.entries if entry.stale),
            "keys": [entry.to_dict() for entry in self.entries],
        }


@dataclass
class Census:
    """The census of several columns, with the queries that rotation needs."""

    columns: list[ColumnCensus]

    def __iter__(self) -> Iterator[CensusEntry]:
        for column in self.columns:
            yield from column.entries

    def column(self, label: str) -> ColumnCensus:
        """Return the census of ``table.column``."""
        for column in self.columns:
            if column.label == label or f"{column.column.table.name}.{column.column.name}" == label:
                return column
        raise KeyError(label)

    def stale(
        self,
        tenants: Iterable[str] | None = None,
        versions: Iterable[int] | None = None,
        *,
        include_current: bool = False,
    ) -> dict[str, int]:
        """Return ``{table.column: count}`` of stale values, omitting clean columns.

        With ``include_current``, the counts also include the values under
        their tenant's active version.
        """
        tenant_list = None if tenants is None else list(tenants)
        version_list = None if versions is None else list(versions)
        counts = {}
        for column in self.columns:
            entries = column.matching(tenant_list, version_list, include_current=include_current)
            count = sum(entry.count for entry in entries)
            if count:
                counts[column.label] = count
        return counts

    @property
    def stale_total(self) -> int:
        return sum(self.stale().values())

    def mismatched(self) -> dict[str, int]:
        """Return ``{table.column: count}`` of values sealed under another
        tenant's key than their row's tenant column names, omitting clean columns."""
        return {
            column.label: column.tenant_mismatches
            for column in self.columns
            if column.tenant_mismatches
        }

    def tenants(self) -> set[str]:
        """Return the tenants found: those of the keys that sealed the values
        counted, and those in the tenant columns of the rows counted."""
        found: set[str] = set()
        for column in self.columns:
            found |= column.row_tenants
            found |= {entry.tenant_id for entry in column.entries if entry.tenant_id is not None}
        return found

    def references(
        self, tenant_id: str, version: int, purpose: KeyPurpose | None = None
    ) -> dict[str, int]:
        """Return ``{table.column: count}`` of values sealed under one key version
        of a tenant (of one purpose, or of both)."""
        counts: dict[str, int] = {}
        for column in self.columns:
            if purpose is not None and column.column.purpose is not purpose:
                continue
            for entry in column.entries:
                if entry.tenant_id == tenant_id and entry.key_version == version:
                    counts[column.label] = counts.get(column.label, 0) + entry.count
        return counts

    @property
    def unknown_keys(self) -> dict[str, int]:
        """Return ``{table.column: count}`` of values whose key id no keyring row has."""
        counts: dict[str, int] = {}
        for column in self.columns:
            for entry in column.entries:
                if entry.key_state == KeyStateName.UNKNOWN:
                    counts[column.label] = counts.get(column.label, 0) + entry.count
        return counts

    def unknown_keys_by_tenant(self) -> dict[str | None, dict[str, dict[uuid.UUID, int]]]:
        """Return ``{row tenant: {table.column: {key id: count}}}`` of the values
        whose key id no keyring row has.

        Such a key names no tenant, so the row's tenant column does. The
        tenant is None for the values of a table without a tenant column, and
        of rows whose tenant column is NULL: any tenant may own them.
        """
        found: dict[str | None, dict[str, dict[uuid.UUID, int]]] = {}
        for column in self.columns:
            for (tenant, key_id), count in column.unknown_key_rows.items():
                keys = found.setdefault(tenant, {}).setdefault(column.label, {})
                keys[key_id] = keys.get(key_id, 0) + count
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [column.to_dict() for column in self.columns]}


def census(
    bind: Engine | Connection,
    target: Target | Sequence[EncryptedColumn],
    *,
    tables: Iterable[str] | None = None,
    columns: Iterable[str] | None = None,
    tenants: Iterable[str] | None = None,
    keys: KeyProvider | KeyLister | None = None,
) -> Census:
    """Count the values of every encrypted column of ``target`` per tenant,
    key id and key version, without decrypting any.

    ``target`` is a MetaData, a Table, a declarative base, or a list of
    :class:`EncryptedColumn`; ``tables`` and ``columns`` narrow it by name and
    ``tenants`` keeps only the entries of those tenants. Key metadata comes
    from ``keys`` (a Keyring, a :class:`KeyringMetadata` or any key
    provider), else from each column's key provider.
    """
    selected = _select_columns(target, tables, columns)
    tenant_filter = None if tenants is None else set(tenants)
    catalogs: dict[int, KeyCatalog] = {}
    results = []
    with _connect(bind) as conn:
        for column in selected:
            provider = keys if keys is not None else column.column_type.key_provider
            catalog = catalogs.get(id(provider))
            if catalog is None:
                catalog = catalogs[id(provider)] = KeyCatalog(provider)
            results.append(census_column(conn, column, catalog, tenant_filter))
    return Census(results)


def _select_columns(
    target: Target | Sequence[EncryptedColumn],
    tables: Iterable[str] | None,
    columns: Iterable[str] | None,
) -> list[EncryptedColumn]:
    if isinstance(target, Sequence) and all(isinstance(c, EncryptedColumn) for c in target):
        selected = [c for c in target if isinstance(c, EncryptedColumn)]
        table_set = None if tables is None else set(tables)
        column_set = None if columns is None else set(columns)
        return [
            c
            for c in selected
            if (table_set is None or c.qualified_table in table_set or c.table.name in table_set)
            and (column_set is None or c.name in column_set or c.label in column_set)
        ]
    return resolve_columns(target, tables, columns)  # type: ignore[arg-type]


class _connect:
    """Use a given Connection as is, or open one from an Engine for the census."""

    def __init__(self, bind: Engine | Connection) -> None:
        self._bind = bind
        self._owned: Connection | None = None

    def __enter__(self) -> Connection:
        if isinstance(self._bind, Connection):
            return self._bind
        self._owned = self._bind.connect()
        return self._owned

    def __exit__(self, *exc: object) -> None:
        if self._owned is not None:
            self._owned.close()


def census_column(
    conn: Connection,
    column: EncryptedColumn,
    catalog: KeyCatalog | KeyProvider,
    tenants: set[str] | None = None,
) -> ColumnCensus:
    """Count the values of one column; see :func:`census`."""
    if not isinstance(catalog, KeyCatalog):
        catalog = KeyCatalog(catalog)
    raw = column.raw_table()
    value = raw.c[column.name]
    is_base64 = column.is_base64
    is_envelope = envelope_condition(value, is_base64)
    kind = sa.case((value.is_(None), _NULL), (is_envelope, _ENVELOPE), else_=_OTHER)
    prefix = sa.case((is_envelope, header_prefix(value, is_base64)), else_=sa.null())
    tenant_name = column.tenant_column
    inner_columns: list[Any] = [kind.label("kind"), prefix.label("prefix")]
    if tenant_name is not None:
        inner_columns.append(raw.c[tenant_name].label("row_tenant"))
    inner = sa.select(*inner_columns).select_from(raw).subquery("census_rows")
    grouped: list[Any] = [inner.c.kind, inner.c.prefix]
    if tenant_name is not None:
        grouped.append(inner.c.row_tenant)
    query = sa.select(*grouped, sa.func.count().label("n")).group_by(*grouped)

    result = ColumnCensus(column)
    counts: dict[tuple[uuid.UUID, int], int] = {}
    prefixes: dict[HeaderPrefix, tuple[uuid.UUID, int]] = {}
    for row in conn.execute(query):
        count = int(row.n)
        row_tenant = row.row_tenant if tenant_name is not None else None
        row_selected = tenants is None or row_tenant in tenants
        header = decode_prefix(row.prefix, is_base64) if row.kind == _ENVELOPE else None
        if header is None:
            # A NULL or legacy plaintext has no key: only its row names a tenant.
            if not row_selected:
                continue
            if row_tenant is not None:
                result.row_tenants.add(row_tenant)
            if row.kind == _NULL:
                result.nulls += count
            else:
                result.not_encrypted += count
            continue
        if row_tenant is not None and row_selected:
            result.row_tenants.add(row_tenant)
        record = catalog.lookup(header.key_id)
        # A key id missing from the keyring names no tenant, so the row does.
        owner = record.tenant_id if record.tenant_id is not None else row_tenant
        stored = bytes(row.prefix) if not is_base64 else row.prefix
        if (
            tenant_name is not None
            and record.tenant_id is not None
            and row_tenant != record.tenant_id
            and (tenants is None or owner in tenants or row_tenant in tenants)
        ):
            result.tenant_mismatches += count
            pair = (record.tenant_id, row_tenant)
            result.mismatches[pair] = result.mismatches.get(pair, 0) + count
            result.mismatch_headers[stored] = record.tenant_id
        if tenants is not None and owner not in tenants:
            continue
        if record.state == KeyStateName.UNKNOWN:
            unknown = (row_tenant, header.key_id)
            result.unknown_key_rows[unknown] = result.unknown_key_rows.get(unknown, 0) + count
        slot = (header.key_id, header.key_version)
        counts[slot] = counts.get(slot, 0) + count
        prefixes[stored] = slot

    entries: dict[tuple[uuid.UUID, int], CensusEntry] = {}
    for (key_id, version), count in sorted(counts.items(), key=_entry_order(catalog)):
        record = catalog.lookup(key_id)
        active = None
        if record.tenant_id is not None:
            active = catalog.active_version(record.tenant_id, column.purpose)
        entries[(key_id, version)] = CensusEntry(
            table=column.qualified_table,
            column=column.name,
            tenant_id=record.tenant_id,
            key_id=key_id,
            key_version=version,
            key_state=record.state,
            active_version=active,
            count=count,
        )
    result.entries = list(entries.values())
    result.headers = {prefix: entries[slot] for prefix, slot in prefixes.items()}
    return result


def _entry_order(catalog: KeyCatalog) -> Any:
    def order(item: tuple[tuple[uuid.UUID, int], int]) -> tuple[str, int, str]:
        (key_id, version), _ = item
        tenant = catalog.lookup(key_id).tenant_id or ""
        return (tenant, version, str(key_id))

    return order
