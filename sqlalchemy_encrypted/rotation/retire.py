"""Retire a key version only once no stored value uses it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

from sqlalchemy.engine import Connection, Engine

from ..errors import (
    KeyDestroyedError,
    KeyInUseError,
    KeyNotFoundError,
    KeyRecentlyActiveError,
    KeyStateError,
)
from ..keys import KeyPurpose
from .catalog import KeyStateName
from .census import Census, census
from .columns import EncryptedColumn, Target

__all__ = ["check_key_unused", "retire_key_version"]

audit = logging.getLogger("sqlalchemy_encrypted.audit")


class _Retiring(Protocol):
    def retire(self, tenant_id: str, version: int, purpose: KeyPurpose | None = None) -> Any: ...


class _WaitingRetiring(_Retiring, Protocol):
    """A keyring whose writers cache the active version, so that a version
    can be retired only some time after it stopped being active."""

    def retire(
        self,
        tenant_id: str,
        version: int,
        purpose: KeyPurpose | None = None,
        *,
        min_inactive_seconds: float | None = None,
    ) -> Any: ...

    def check_retire_wait(
        self,
        tenant_id: str,
        version: int,
        purpose: KeyPurpose | None = None,
        *,
        min_inactive_seconds: float | None = None,
    ) -> None: ...


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
    purposes = list(KeyPurpose) if purpose is None else [purpose]
    _raise_if_referenced(result, tenant_id, version, purposes)
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
    min_inactive_seconds: float | None = None,
) -> Any:
    """Retire key ``version`` of a tenant after a census shows no value uses it.

    Without ``purpose``, the version is retired for each purpose where it is
    decrypt-only. A purpose where it is still the active or pending version
    is skipped, even if values use it there, and so is a purpose without that
    version. Raises :class:`KeyStateError` if no purpose is left to retire,
    or if the version is active or pending for ``purpose``.

    With a :class:`~sqlalchemy_encrypted.keyring.Keyring`, the census is
    taken only once the version stopped being active at least
    ``min_inactive_seconds`` ago (default: the keyring's ``active_key_ttl``
    plus a margin; see ``Keyring.check_retire_wait``). Until then, processes
    that cached it as the active version may still write values under it,
    so :class:`KeyRecentlyActiveError` is raised without a census. Key
    providers without ``check_retire_wait``, such as ``InMemoryKeyring``,
    whose leases end at each rotation, ignore ``min_inactive_seconds``.

    Returns what ``keyring.retire`` returns. Raises :class:`KeyInUseError`
    with the counts per ``table.column`` if values still use a version that
    would be retired, and retires nothing.
    """
    waiting = _waiting(keyring)
    if waiting is not None:
        waiting.check_retire_wait(
            tenant_id, version, purpose, min_inactive_seconds=min_inactive_seconds
        )
    result = census(bind, target, tables=tables, tenants=[tenant_id])
    current = _current_purposes(result, tenant_id, version)
    wanted = list(KeyPurpose) if purpose is None else [purpose]
    others = [each for each in wanted if each not in current]
    if not others:
        raise KeyStateError(
            _all_current_message(tenant_id, version, {each: current[each] for each in wanted})
        )
    _raise_if_referenced(result, tenant_id, version, others)
    if purpose is None and current:
        # Retire the other purpose by name, so that a version which
        # becomes decrypt-only after the census, with values still under
        # it, is not retired.
        retired = _retire_other_purpose(
            keyring, tenant_id, version, others[0], current, min_inactive_seconds
        )
    else:
        retired = _retire(keyring, tenant_id, version, purpose, min_inactive_seconds)
    audit.info(
        "key version %d of tenant %r retired after a census found no value using it",
        version,
        tenant_id,
    )
    return retired


def _waiting(keyring: _Retiring) -> _WaitingRetiring | None:
    """Return ``keyring`` if it has ``check_retire_wait``, else None."""
    if callable(getattr(keyring, "check_retire_wait", None)):
        return cast(_WaitingRetiring, keyring)
    return None


def _retire(
    keyring: _Retiring,
    tenant_id: str,
    version: int,
    purpose: KeyPurpose | None,
    min_inactive_seconds: float | None,
) -> Any:
    waiting = _waiting(keyring)
    if waiting is None:
        return keyring.retire(tenant_id, version, purpose)
    # The keyring checks the wait again, with the rows it retires.
    return waiting.retire(tenant_id, version, purpose, min_inactive_seconds=min_inactive_seconds)


def _current_purposes(result: Census, tenant_id: str, version: int) -> dict[KeyPurpose, str]:
    """Return the purposes whose values under ``version`` use an active or
    pending key, with that key's state."""
    current: dict[KeyPurpose, str] = {}
    for column in result.columns:
        for entry in column.entries:
            if (
                entry.tenant_id == tenant_id
                and entry.key_version == version
                and entry.key_state in (KeyStateName.ACTIVE, KeyStateName.PENDING)
            ):
                current[column.column.purpose] = entry.key_state
    return current


def _describe_current(version: int, current: dict[KeyPurpose, str]) -> str:
    return " and ".join(
        f"{purpose.value} version {version} is {state}" for purpose, state in current.items()
    )


def _all_current_message(tenant_id: str, version: int, current: dict[KeyPurpose, str]) -> str:
    names = " and ".join(purpose.value for purpose in current)
    return (
        f"cannot retire key version {version} of tenant {tenant_id!r}: "
        f"{_describe_current(version, current)}, and stored values use it. Only a "
        f"decrypt-only version can be retired: rotate the {names} keys, re-encrypt the "
        f"tenant's values, then retire version {version}"
    )


def _raise_if_referenced(
    result: Census, tenant_id: str, version: int, purposes: Sequence[KeyPurpose]
) -> None:
    references: dict[str, int] = {}
    for purpose in purposes:
        references.update(result.references(tenant_id, version, purpose))
    if references and _sealed_under_destroyed_key(result, tenant_id, version):
        raise KeyDestroyedError(
            f"cannot retire key version {version} of tenant {tenant_id!r}: its keys were "
            "destroyed (crypto-shredded), so nothing is left to retire and its "
            f"{sum(references.values())} stored value(s) can no longer be decrypted"
        )
    if references:
        listed = ", ".join(f"{label}: {count}" for label, count in sorted(references.items()))
        purpose_text = f"{purposes[0].value} " if len(purposes) == 1 else ""
        raise KeyInUseError(
            f"cannot retire {purpose_text}key version {version} of tenant {tenant_id!r}: "
            f"{sum(references.values())} value(s) still use it ({listed}); re-encrypt them "
            "first",
            references=references,
        )


def _retire_other_purpose(
    keyring: _Retiring,
    tenant_id: str,
    version: int,
    purpose: KeyPurpose,
    current: dict[KeyPurpose, str],
    min_inactive_seconds: float | None,
) -> Any:
    """Retire ``version`` of ``purpose`` only, while the other purposes
    (``current``) still encrypt with it."""
    try:
        return _retire(keyring, tenant_id, version, purpose, min_inactive_seconds)
    except (KeyStateError, KeyNotFoundError) as exc:
        if isinstance(exc, KeyDestroyedError | KeyRecentlyActiveError):
            raise
        raise KeyStateError(
            f"cannot retire key version {version} of tenant {tenant_id!r}: "
            f"{_describe_current(version, current)} and stored values use it. For the "
            f"{purpose.value} purpose: {exc}"
        ) from None
