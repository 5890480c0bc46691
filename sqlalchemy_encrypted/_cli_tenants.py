"""Checks that the tenant ids given to a command exist.

A mistyped tenant id matches no key and no row, so without these checks a
command would do nothing and exit 0, and the operator would believe the
real tenant was handled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import KeyNotFoundError
from .rotation import Census
from .rotation.catalog import KeyLister

__all__ = ["check_tenants_known", "no_keys_error", "require_keys"]


def no_keys_error(table_name: str, tenant: str) -> KeyNotFoundError:
    """Return the error for a tenant that has no row in the keyring table."""
    return KeyNotFoundError(
        f"tenant {tenant!r} has no keys in keyring table {table_name}: check the "
        "tenant id ('sqlalchemy-encrypted keys list' shows every tenant); a tenant's first "
        "keys are created by its first write"
    )


def require_keys(keys: KeyLister, table_name: str, tenant: str) -> None:
    """Raise :class:`KeyNotFoundError` unless ``tenant`` has a key in any state."""
    if not list(keys.list_keys(tenant)):
        raise no_keys_error(table_name, tenant)


def check_tenants_known(
    keys: KeyLister,
    table_name: str,
    tenants: Sequence[str],
    census_of_tenants: Callable[[], Census],
    outcome: str | None = None,
) -> None:
    """Raise :class:`KeyNotFoundError` naming the tenants that have no key and
    appear in no row of the census.

    A tenant without keys can still have rows, with NULL or not yet encrypted
    values, so it is known when the census finds it in a tenant column.
    ``census_of_tenants`` is called only when some tenant has no key.
    ``outcome``, if given, ends the message, saying what the command did not do.
    """
    without_keys = [tenant for tenant in tenants if not list(keys.list_keys(tenant))]
    if not without_keys:
        return
    found = census_of_tenants().tenants()
    unknown = [tenant for tenant in without_keys if tenant not in found]
    if not unknown:
        return
    listed = ", ".join(repr(tenant) for tenant in unknown)
    noun = "tenant" if len(unknown) == 1 else "tenants"
    message = (
        f"unknown {noun} {listed}: no keys in keyring table {table_name} and no rows in the "
        "selected tables; check the tenant id ('sqlalchemy-encrypted keys list' shows every "
        "tenant that has keys)"
    )
    raise KeyNotFoundError(f"{message}; {outcome}" if outcome else message)
