"""Autogenerate rendering: encrypted types and the operations of this package as Python.

Alembic writes a custom type as ``<module>.<repr>`` with no import line,
which fails when the migration runs. :func:`render_item` writes
``sqlalchemy_encrypted.Encrypted(sa.String(length=100))`` instead and adds
``import sqlalchemy_encrypted`` to the file. Only the type's non-secret
settings are rendered (the inner type, ``context=``, ``storage=``,
``allow_plaintext_reads=``): a ``keyring=`` passed to the type is dropped,
because keys are looked up when the migration runs, never written into it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.render import _repr_type
from sqlalchemy.types import TypeEngine

import sqlalchemy_encrypted
from sqlalchemy_encrypted.types import EncryptedType

from .ops import (
    CreateKeyringTableOp,
    DecryptColumnOp,
    DropKeyringTableOp,
    EncryptColumnOp,
    ReencryptColumnOp,
)

__all__ = ["render_item", "render_type"]

logger = logging.getLogger("sqlalchemy_encrypted.alembic")

# The import line a migration needs for the operations of this package.
_OPS_IMPORT = "import alembic_ext"


def _type_prefix(type_: EncryptedType[Any], autogen_context: AutogenContext) -> str:
    cls = type(type_)
    if getattr(sqlalchemy_encrypted, cls.__name__, None) is cls:
        autogen_context.imports.add("import sqlalchemy_encrypted")
        return "sqlalchemy_encrypted."
    autogen_context.imports.add(f"import {cls.__module__}")
    return f"{cls.__module__}."


def _render_encrypted(type_: EncryptedType[Any], autogen_context: AutogenContext) -> str:
    arguments = [render_type(type_.inner, autogen_context)]
    # The options the type itself copies, minus the key provider, and only
    # where they differ from the defaults.
    defaults = type(type_)(type_.inner)._copy_options()
    for name, value in type_._copy_options().items():
        if name != "keyring" and value != defaults.get(name):
            arguments.append(f"{name}={value!r}")
    prefix = _type_prefix(type_, autogen_context)
    return f"{prefix}{type(type_).__qualname__}({', '.join(arguments)})"


def render_type(type_: TypeEngine[Any], autogen_context: AutogenContext) -> str:
    """Render any type as Alembic would, and encrypted types as importable expressions."""
    if isinstance(type_, EncryptedType):
        return _render_encrypted(type_, autogen_context)
    # Alembic's own renderer: it adds "from sqlalchemy.dialects import ..."
    # lines and applies the sqlalchemy_module_prefix option ("sa.").
    return _repr_type(type_, autogen_context)


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """The ``render_item`` hook for ``context.configure()`` in ``env.py``.

    Renders encrypted types and leaves everything else to Alembic (by
    returning False). Importing ``alembic_ext`` in ``env.py`` already
    installs it for ``alembic revision --autogenerate``, after any hook of
    your own. Pass it explicitly to ``render_python_code()`` and other direct
    uses of the autogenerate API.
    """
    if type_ == "type" and isinstance(obj, EncryptedType):
        return _render_encrypted(obj, autogen_context)
    return False


def _op_prefix(autogen_context: AutogenContext) -> str:
    autogen_context.imports.add(_OPS_IMPORT)
    prefix = autogen_context.opts.get("alembic_module_prefix") or "op."
    return str(prefix)


def _conversion_arguments(
    autogen_context: AutogenContext, operation: EncryptColumnOp | DecryptColumnOp
) -> list[str]:
    # Only the arguments autogenerate can know are rendered: a fixed tenant
    # id, batch sizes and strictness are the author's decisions.
    arguments = []
    if operation.tenant_column is not None:
        arguments.append(f"tenant_column={operation.tenant_column!r}")
    if operation.schema is not None:
        arguments.append(f"schema={operation.schema!r}")
    return arguments


@renderers.dispatch_for(EncryptColumnOp)
def _render_encrypt_column(autogen_context: AutogenContext, operation: EncryptColumnOp) -> str:
    arguments = [
        repr(operation.table_name),
        repr(operation.column_name),
        f"type_={render_type(operation.type_, autogen_context)}",
    ]
    if operation.existing_type is not None:
        arguments.append(f"existing_type={render_type(operation.existing_type, autogen_context)}")
    arguments += _conversion_arguments(autogen_context, operation)
    return f"{_op_prefix(autogen_context)}encrypt_column({', '.join(arguments)})"


@renderers.dispatch_for(DecryptColumnOp)
def _render_decrypt_column(autogen_context: AutogenContext, operation: DecryptColumnOp) -> str:
    arguments = [
        repr(operation.table_name),
        repr(operation.column_name),
        f"type_={render_type(operation.type_, autogen_context)}",
        f"from_type={render_type(operation.from_type, autogen_context)}",
    ]
    arguments += _conversion_arguments(autogen_context, operation)
    return f"{_op_prefix(autogen_context)}decrypt_column({', '.join(arguments)})"


@renderers.dispatch_for(ReencryptColumnOp)
def _render_reencrypt_column(autogen_context: AutogenContext, operation: ReencryptColumnOp) -> str:
    arguments = [
        repr(operation.table_name),
        repr(operation.column_name),
        f"type_={render_type(operation.type_, autogen_context)}",
    ]
    if operation.tenant_column is not None:
        arguments.append(f"tenant_column={operation.tenant_column!r}")
    if operation.schema is not None:
        arguments.append(f"schema={operation.schema!r}")
    return f"{_op_prefix(autogen_context)}reencrypt_column({', '.join(arguments)})"


def _render_keyring_table(
    autogen_context: AutogenContext, name: str, operation: CreateKeyringTableOp | DropKeyringTableOp
) -> str:
    arguments = []
    if operation.table_name != "encryption_keys":
        arguments.append(repr(operation.table_name))
    if operation.schema is not None:
        arguments.append(f"schema={operation.schema!r}")
    return f"{_op_prefix(autogen_context)}{name}({', '.join(arguments)})"


@renderers.dispatch_for(CreateKeyringTableOp)
def _render_create_keyring_table(
    autogen_context: AutogenContext, operation: CreateKeyringTableOp
) -> str:
    return _render_keyring_table(autogen_context, "create_keyring_table", operation)


@renderers.dispatch_for(DropKeyringTableOp)
def _render_drop_keyring_table(
    autogen_context: AutogenContext, operation: DropKeyringTableOp
) -> str:
    return _render_keyring_table(autogen_context, "drop_keyring_table", operation)
