"""Retire a key version only once no stored value uses it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

from ..errors import KeyDestroyedError, KeyInUseError
from ..keys import KeyPurpose
from .catalog import KeyStateName
from .census import Census, census
from .columns import EncryptedColumn, Target

__all__ = ["check_key_unused", "retire_key_version"]

audit = logging.getLogger("sqlalchemy_encrypted.audit")


class _Retiring(Protocol):
    def retire(self, tenant_id: str, version: int, purpose: KeyPurpose | None = None) -> Any: ...


def check_key_unused(
    bind: Engine | Connection,
    target: Target | Sequence[EncryptedColumn],
    tenant_id: str,
    version: int,
    purpose: KeyPurpose | None = None,
    *,
    tables: Iterable[str] | None = None,
) -> Census:
    """Take a census and raise :class:`KeyInUseError` if any value of
    ``target`` is still sealed under the tenant's key ``version``.

    The error names every ``table.column`` with its count, and carries them
    in ``references``. Raises :class:`KeyDestroyedError` instead when the
    values are under a destroyed key (a shredded tenant), because they can
    no longer be re-encrypted. Returns the census when no value uses the key.
    Columns outside ``target`` are not searched: pass the metadata of every
    table that may hold the tenant's values.
    """
    result = census(bind, target, tables=tables, tenants=[tenant_id])
    references = result.references(tenant_id, version, purpose)
    if references and _sealed_under_destroyed_key(result, tenant_id, version):
        raise KeyDestroyedError(
            f"cannot retire key version {version} of tenant {tenant_id!r}: its keys were "
            "destroyed (crypto-shredded), so nothing is left to retire and its "
            f"{sum(references.values())} stored value(s) can no longer be decrypted"
        )
    if references:
        listed = ", ".join(f"{label}: {count}" for label, count in sorted(references.items()))
        purpose_text = f"{purpose.value} " if purpose is not None else ""
        raise KeyInUseError(
            f"cannot retire {purpose_text}key version {version} of tenant {tenant_id!r}: "
            f"{sum(references.values())} value(s) still use it ({listed}); re-encrypt them "
            "first",
            references=references,
        )
    return result


def _sealed_under_destroyed_key(result: Census, tenant_id: str, version: int) -> bool:
    return any(
        entry.tenant_id == tenant_id
        and entry.key_version == version
        and entry.key_state == KeyStateName.DESTROYED
        for entry in result
    )


def retire_key_version(
    bind: Engine | Connection,
    target: Target | Sequence[EncryptedColumn],
    keyring: _Retiring,
    tenant_id: str,
    version: int,
    purpose: KeyPurpose | None = None,
    *,
    tables: Iterable[str] | None = None,
) -> Any:
    """Retire key ``version`` of a tenant after a census shows no value uses it.

    Returns what ``keyring.retire`` returns. Raises :class:`KeyInUseError`
    with the counts per ``table.column`` otherwise, and retires nothing.
    """
    check_key_unused(bind, target, tenant_id, version, purpose, tables=tables)
    retired = keyring.retire(tenant_id, version, purpose)
    audit.info(
        "key version %d of tenant %r retired after a census found no value using it",
        version,
        tenant_id,
    )
    return retired
