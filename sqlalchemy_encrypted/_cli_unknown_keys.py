"""The check that stops ``keys rotate`` while stored values name key ids that
are not in the keyring table.

Such values mean that the keyring table and the data come from different
points in time, as after restoring one of them from a backup. A key created
then, for any tenant, may be missing from the keyring table that the
operator restores next, so no tenant is rotated while such values exist.
"""

from __future__ import annotations

import uuid

import click

from ._cli_context import CliContext
from .errors import UnknownKeysError
from .keyring import Keyring
from .rotation import census

__all__ = ["IGNORE_UNKNOWN_KEYS", "check_no_unknown_keys"]

# The option of 'keys rotate' that skips the check.
IGNORE_UNKNOWN_KEYS = "--ignore-unknown-keys"

# Tenants the error names before it only counts the others.
_MAX_TENANTS_LISTED = 5

# {table.column: {key id: count}} of one tenant's values under unknown key ids.
_ColumnKeys = dict[str, dict[uuid.UUID, int]]


def check_no_unknown_keys(settings: CliContext, keyring: Keyring) -> None:
    """Raise :class:`UnknownKeysError` when any stored value names a key id
    that is not in the keyring table.

    It takes one census of every encrypted column of --models, the scan that
    ``status`` makes, and attributes each such value to the tenant in its
    row's tenant column, for the message. Any such value stops the rotation
    of every tenant, whichever tenant it belongs to. The keyring table is
    then not the one that matches the data, so a key created in it now would
    be lost when the matching table is restored. Without --models nothing can
    be checked, so it prints a note on stderr instead.
    """
    if not settings.models:
        click.echo(
            "note: stored values were not checked for key ids missing from the keyring "
            "table, because no --models was given (SQLALCHEMY_ENCRYPTED_MODELS)",
            err=True,
        )
        return
    result = census(settings.engine(), settings.tables(), keys=keyring)
    by_tenant = result.unknown_keys_by_tenant()
    stopped = {tenant: columns for tenant, columns in by_tenant.items() if tenant is not None}
    without_tenant = by_tenant.get(None, {})
    if stopped or without_tenant:
        raise UnknownKeysError(_message(stopped, without_tenant, keyring.table.fullname))


def _message(stopped: dict[str, _ColumnKeys], without_tenant: _ColumnKeys, table: str) -> str:
    groups = [
        f"tenant {tenant!r}: {_describe(columns)}"
        for tenant, columns in sorted(stopped.items())[:_MAX_TENANTS_LISTED]
    ]
    if len(stopped) > _MAX_TENANTS_LISTED:
        groups.append(f"and {len(stopped) - _MAX_TENANTS_LISTED} more tenant(s)")
    if without_tenant:
        groups.append(f"rows that name no tenant, so of any tenant: {_describe(without_tenant)}")
    return (
        f"stored values name key ids that are not in keyring table {table} "
        f"({'; '.join(groups)}). The keyring table and the data come from different points "
        "in time, as after restoring one of them from a backup. Restore the keyring table "
        "that matches the data, or the data backup that matches this keyring table (see "
        "'Restoring from backups' in the key rotation guide), or pass "
        f"{IGNORE_UNKNOWN_KEYS} to rotate anyway; no key was created"
    )


def _describe(columns: _ColumnKeys) -> str:
    return ", ".join(
        f"{label}: {count} value(s) under key id {key_id}"
        for label in sorted(columns)
        for key_id, count in sorted(columns[label].items(), key=lambda item: str(item[0]))
    )
