"""The ``decrypt`` command: decrypt one stored value without the application's models.

The value comes from a row, read with SQL from the reflected table, or from
the command line as hex or base64. Its header names the algorithm and the
value type, and its key id names the keyring row, which gives the tenant.
The column type that the header calls for (:func:`type_for_header`) then
decrypts it exactly as the application would.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import getpass
import json
import logging
import math
import sys
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from . import _storage
from ._cli_context import ExitCode, print_json, settings_of
from .codecs import ValueTag
from .envelope import EnvelopeHeader, parse_header
from .errors import ConfigurationError, StorageFormatError
from .keyring.audit import audit_event
from .rotation.columns import declared_encrypted_type
from .tenancy import tenant_scope
from .types import type_for_header

__all__ = ["decrypt"]


@dataclass(frozen=True)
class _StoredValue:
    """A stored value and where it came from: a row's primary key, or the command line.

    ``column_type`` is the database type of the column a row was read from.
    """

    raw: Any
    source: str
    row: dict[str, Any] | None = None
    column_type: str | None = None


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    click.get_current_context().exit(int(ExitCode.ERROR))


# -- reading the row ------------------------------------------------------------------


def _reflect(engine: sa.Engine, name: str, schema: str | None) -> sa.Table:
    try:
        return sa.Table(name, sa.MetaData(), autoload_with=engine, schema=schema)
    except sa.exc.NoSuchTableError:
        where = f"schema {schema!r}" if schema else "the database's search path"
        _fail(f"table {name!r} not found in {where}")


def _parse_key(column: sa.Column[Any], text: str) -> Any:
    """Convert a ``--pk`` value to the Python type of its reflected column.

    Drivers such as psycopg send a str as text, which PostgreSQL does not
    compare with an integer or UUID column.
    """
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return text
    parsers: dict[type, Any] = {
        int: int,
        decimal.Decimal: decimal.Decimal,
        uuid.UUID: uuid.UUID,
        dt.datetime: dt.datetime.fromisoformat,
        dt.date: dt.date.fromisoformat,
    }
    parser = parsers.get(python_type)
    if parser is None:
        return text
    try:
        return parser(text)
    except (ValueError, decimal.InvalidOperation):
        raise click.BadParameter(
            f"{text!r} is not a valid {python_type.__name__} for column {column.name}",
            param_hint="'--pk'",
        ) from None


def _key_columns(table: sa.Table, names: Sequence[str], count: int) -> list[sa.Column[Any]]:
    if names:
        missing = [name for name in names if name not in table.c]
        if missing:
            _fail(f"table {table.name} has no column {missing[0]!r}")
        columns = [table.c[name] for name in names]
    else:
        columns = list(table.primary_key.columns)
        if not columns:
            raise click.UsageError(
                f"table {table.name} has no primary key: name the columns that identify "
                "the row with --pk-column"
            )
    if len(columns) != count:
        listed = ", ".join(column.name for column in columns)
        raise click.UsageError(
            f"the row of {table.name} is found by {len(columns)} column(s) ({listed}), but "
            f"{count} --pk value(s) were given: pass one --pk per column, in that order"
        )
    return columns


def _read_row(
    engine: sa.Engine,
    table_name: str,
    schema: str | None,
    column_name: str,
    key_names: Sequence[str],
    key_texts: Sequence[str],
) -> _StoredValue:
    """Read the stored value of one row with plain SQL, past any column type."""
    table = _reflect(engine, table_name, schema)
    if column_name not in table.c:
        _fail(f"table {table.name} has no column {column_name!r}")
    key_columns = _key_columns(table, key_names, len(key_texts))
    row_key = {
        column.name: _parse_key(column, text)
        for column, text in zip(key_columns, key_texts, strict=True)
    }
    statement = (
        sa.select(table.c[column_name])
        .where(*(table.c[name] == value for name, value in row_key.items()))
        .limit(2)
    )
    with engine.connect() as conn:
        found = conn.execute(statement).all()
    described = ", ".join(f"{name} = {value}" for name, value in row_key.items())
    if not found:
        _fail(f"no row of table {table.name} has {described}")
    if len(found) > 1:
        _fail(
            f"more than one row of table {table.name} has {described}: name columns that "
            "identify one row with --pk-column"
        )
    return _StoredValue(found[0][0], "row", row_key, _type_name(table.c[column_name], engine))


def _type_name(column: sa.Column[Any], engine: sa.Engine) -> str:
    try:
        return str(column.type.compile(dialect=engine.dialect))
    except sa.exc.CompileError:
        return type(column.type).__name__


# -- checking that the column is encrypted -------------------------------------------


def _check_declared_encrypted(
    tables: Sequence[sa.Table], name: str, column_name: str, schema: str | None
) -> None:
    """Raise :class:`ConfigurationError` if the models declare the column
    as a plain one. A table or column the models lack is not checked."""
    for table in tables:
        if table.name != name or (schema is not None and table.schema not in (None, schema)):
            continue
        column = table.c.get(column_name)
        if column is not None and declared_encrypted_type(column) is None:
            raise ConfigurationError(
                f"column {name}.{column_name} is not an encrypted column: --models declares "
                f"it as {column.type!r}; name a column declared with Encrypted or "
                "DeterministicEncrypted, or registered with info['encrypted_type']"
            )


def _not_an_envelope(raw: Any) -> str | None:
    """Describe a row value that cannot be an envelope, or return None if
    it may be one. The description never contains the value."""
    if isinstance(raw, str):
        data = _storage.from_base64(raw)
        if data is None:
            return "text that is not base64"
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        if not _storage.is_envelope_start(data):
            # A base64 column created with a binary database type.
            data = _storage.from_base64(data) or data
    else:
        return f"of type {type(raw).__name__}, not bytes or text"
    if not _storage.is_envelope_start(data):
        return "not an envelope of this library"
    return None


def _check_row_value(stored: _StoredValue, table: str, column: str) -> None:
    """Raise :class:`StorageFormatError` naming the column and its database
    type if the row's value cannot be an envelope."""
    found = _not_an_envelope(stored.raw)
    if found is None:
        return
    raise StorageFormatError(
        f"column {table}.{column} ({stored.column_type}) does not contain an encrypted value "
        f"in this row: the stored value is {found}. The column is not an encrypted "
        "column, or this row holds plaintext written outside this library; check the "
        "column name, or the migration state of the column"
    )


# -- decoding and decrypting -----------------------------------------------------------


def _read_argument(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _from_hex(text: str) -> _StoredValue:
    value = "".join(_read_argument(text).split())
    if value.lower().startswith(("\\x", "0x")):
        value = value[2:]
    try:
        return _StoredValue(bytes.fromhex(value), "hex")
    except ValueError:
        raise StorageFormatError("the --hex value is not valid hex") from None


def _from_base64(text: str) -> _StoredValue:
    value = "".join(_read_argument(text).split())
    try:
        return _StoredValue(base64.b64decode(value, validate=True), "base64")
    except (binascii.Error, ValueError):
        raise StorageFormatError("the --base64 value is not valid base64") from None


def _envelope_bytes(raw: Any, identity: str) -> bytes:
    """Return the envelope of a stored value: text is base64 storage."""
    storage: _storage.StorageMode = "base64" if isinstance(raw, str) else "binary"
    return _storage.coerce_stored(raw, storage, identity)


def _header(data: bytes, identity: str) -> EnvelopeHeader:
    failure: StorageFormatError | None = None
    try:
        return parse_header(data, f"encrypted column {identity}")
    except StorageFormatError as exc:
        failure = _storage.explain_format_error(data, exc, identity)
    raise failure


# -- output -----------------------------------------------------------------------------


def _seconds(value: dt.timedelta) -> str:
    """Return a timedelta as exact seconds with six decimals."""
    microseconds = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    return str(decimal.Decimal(microseconds).scaleb(-6))


def _json_safe(value: Any) -> Any:
    """Replace NaN and the infinities, which JSON cannot carry, by strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _json_value(value: Any, tag: ValueTag) -> Any:
    """Return a decrypted value as JSON: numbers, booleans and JSON values
    as they are, everything else as a string (see ``docs/cli.md``)."""
    if tag is ValueTag.JSON:
        return _json_safe(value)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _json_safe(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _seconds(value)
    return str(value)


def _text_value(value: Any, tag: ValueTag) -> str:
    if tag is ValueTag.JSON:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    converted = _json_value(value, tag)
    return converted if isinstance(converted, str) else str(converted)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


# -- the command ----------------------------------------------------------------------


def _check_options(
    table: str | None,
    column: str | None,
    context: str | None,
    pk: tuple[str, ...],
    pk_columns: tuple[str, ...],
    hex_value: str | None,
    base64_value: str | None,
) -> None:
    sources = [bool(pk), hex_value is not None, base64_value is not None]
    if sum(sources) != 1:
        raise click.UsageError("pass exactly one of --pk, --hex and --base64")
    if pk and not (table and column):
        raise click.UsageError("--pk needs --table and --column")
    if pk_columns and not pk:
        raise click.UsageError("--pk-column needs --pk")
    if not pk and context is None and not (table and column):
        raise click.UsageError(
            "a value given with --hex or --base64 needs --table and --column, or --context, "
            "to name the column identity it was sealed for"
        )
    if context is not None and not context:
        raise click.UsageError("--context must not be empty")


@click.command()
@click.option("--table", help="Table to read the row from; also names the column identity.")
@click.option("--column", help="Encrypted column to decrypt.")
@click.option("--schema", help="Schema of --table; not part of the column identity.")
@click.option(
    "--pk",
    multiple=True,
    help="Primary key value of the row; repeat for a composite key, in primary key column order.",
)
@click.option(
    "--pk-column",
    "pk_columns",
    multiple=True,
    help="Column that --pk matches, when it is not the primary key; repeatable, in --pk order.",
)
@click.option(
    "--context",
    help="Column identity the value is bound to, when the column type sets context= "
    "(default: TABLE.COLUMN).",
)
@click.option("--hex", "hex_value", help="Decrypt this stored value given as hex; - reads stdin.")
@click.option(
    "--base64", "base64_value", help="Decrypt this stored value given as base64; - reads stdin."
)
@click.option(
    "--tenant",
    help="Decrypt only a value of this tenant, as tenant_scope does; other tenants' values fail.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with the key ids and value type.")
@click.pass_context
def decrypt(
    ctx: click.Context,
    table: str | None,
    column: str | None,
    schema: str | None,
    pk: tuple[str, ...],
    pk_columns: tuple[str, ...],
    context: str | None,
    hex_value: str | None,
    base64_value: str | None,
    tenant: str | None,
    as_json: bool,
) -> None:
    """Decrypt one stored value and print the plaintext.

    This prints sensitive data on purpose: it is an operator tool for
    support and incident work. Each decrypted value is logged as a
    value.decrypted audit event (ids only; see --audit-log).

    The value is read from the row of --table whose primary key is --pk, or
    given with --hex or --base64. It needs --url and --kms, but not --models.
    """
    _check_options(table, column, context, pk, pk_columns, hex_value, base64_value)
    settings = settings_of(ctx)
    identity = context if context is not None else f"{table}.{column}"
    if settings.models and table and column:
        _check_declared_encrypted(settings.tables(), table, column, schema)
    if pk:
        assert table is not None and column is not None
        stored = _read_row(settings.engine(), table, schema, column, pk_columns, pk)
    elif hex_value is not None:
        stored = _from_hex(hex_value)
    else:
        assert base64_value is not None
        stored = _from_base64(base64_value)
    if stored.raw is None:
        if as_json:
            print_json(_describe(table, column, identity, stored, None, None, None))
        else:
            click.echo(
                f"{table}.{column} is NULL in this row; there is nothing to decrypt", err=True
            )
        return
    if stored.source == "row":
        assert table is not None and column is not None
        _check_row_value(stored, table, column)
    keyring = settings.keyring()
    data = _envelope_bytes(stored.raw, identity)
    header = _header(data, identity)
    reader = type_for_header(header, identity, keyring=keyring)
    with tenant_scope(tenant) if tenant is not None else nullcontext():
        value = reader.decrypt(data)
    owner = keyring.key_by_id(header.key_id).tenant_id
    _audit(table, column, identity, stored, owner, header)
    if as_json:
        print_json(_describe(table, column, identity, stored, header, owner, value))
    else:
        click.echo(_text_value(value, ValueTag(header.value_tag)))


def _audit(
    table: str | None,
    column: str | None,
    identity: str,
    stored: _StoredValue,
    tenant: str,
    header: EnvelopeHeader,
) -> None:
    fields: dict[str, object] = {"table": table, "column": column, "context": identity}
    if stored.row is not None:
        fields["row"] = ",".join(f"{name}={value}" for name, value in stored.row.items())
    fields.update(
        source=stored.source,
        tenant=tenant,
        key_id=str(header.key_id),
        version=header.key_version,
        user=_operator(),
    )
    audit_event(
        "value.decrypted",
        logging.WARNING,
        **{name: value for name, value in fields.items() if value is not None},
    )


def _describe(
    table: str | None,
    column: str | None,
    identity: str,
    stored: _StoredValue,
    header: EnvelopeHeader | None,
    tenant: str | None,
    value: Any,
) -> dict[str, Any]:
    tag = ValueTag(header.value_tag) if header is not None else None
    return {
        "table": table,
        "column": column,
        "context": identity,
        "primary_key": stored.row,
        "tenant": tenant,
        "key_id": str(header.key_id) if header is not None else None,
        "key_version": header.key_version if header is not None else None,
        "algorithm": header.algorithm.name if header is not None else None,
        "value_type": tag.name if tag is not None else None,
        "value": _json_value(value, tag) if tag is not None and value is not None else None,
    }
