"""Key lifecycle operations of :class:`~sqlalchemy_encrypted.keyring.Keyring`.

Every state change is a compare-and-set on the row's ``row_version``, so
two processes running the same operation at once cannot both apply it, and
each change is recorded on the ``sqlalchemy_encrypted.audit`` logger.
"""

from __future__ import annotations

import datetime
import math
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa

from ..errors import (
    ConfigurationError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyPendingError,
    KeyRecentlyActiveError,
    KeyStateError,
    KmsError,
)
from ..keys import KeyPurpose
from ..kms.base import KmsProvider, WrapContext
from .audit import audit_event, row_fields
from .schema import KeyState
from .store import KeyInfo, KeyRow

if TYPE_CHECKING:
    from .keyring import Keyring

__all__ = [
    "RETIRE_MARGIN_SECONDS",
    "check_retire_wait",
    "promote_due",
    "promote_pending",
    "retire",
    "rewrap",
    "rotate",
    "shred",
]

# Attempts to apply one row change when another process keeps changing the row.
_CAS_ATTEMPTS = 3
# Seconds added to active_key_ttl before a version that stopped being active
# may be retired. They cover a transaction that sealed a value under the
# version just before the writer's lease ended and commits later, and clock
# differences between the hosts that write the keyring timestamps.
RETIRE_MARGIN_SECONDS = 60.0


def _purposes(purpose: KeyPurpose | None) -> list[KeyPurpose]:
    return list(KeyPurpose) if purpose is None else [KeyPurpose(purpose)]


# -- rotation -----------------------------------------------------------------


def rotate(
    keyring: Keyring,
    tenant: str,
    purpose: KeyPurpose | None,
    activate_now: bool,
    *,
    replacing: uuid.UUID | None = None,
) -> list[KeyInfo]:
    """Rotate the tenant's keys; see :meth:`Keyring.rotate`.

    With ``replacing``, rotate only while that key is the active one, and
    raise :class:`KeyStateError` if another process has already replaced it.
    """
    created = []
    try:
        for each in _purposes_to_rotate(keyring, tenant, purpose):
            created.append(_rotate_one(keyring, tenant, each, activate_now, replacing=replacing))
    finally:
        keyring._invalidate_tenant(tenant)
    return created


def _purposes_to_rotate(
    keyring: Keyring, tenant: str, purpose: KeyPurpose | None
) -> list[KeyPurpose]:
    """Return ``purpose``, or else the purposes the tenant has keys for.

    Rotating a purpose the tenant never used would create its first key,
    version 1, which is active at once, so a later retire of version 1
    would reject it. A tenant with no keys at all
    gets the first keys of both purposes.
    """
    if purpose is not None:
        return [KeyPurpose(purpose)]
    used = {row.purpose for row in keyring._store.tenant_rows(tenant)}
    return [each for each in KeyPurpose if each in used] or list(KeyPurpose)


def _rotate_one(
    keyring: Keyring,
    tenant: str,
    purpose: KeyPurpose,
    activate_now: bool,
    *,
    replacing: uuid.UUID | None = None,
) -> KeyInfo:
    rows = keyring._store.tenant_rows(tenant)
    keyring._refuse_destroyed(tenant, rows)
    mine = [row for row in rows if row.purpose is purpose]
    if replacing is not None and not any(
        row.key_id == replacing and row.state is KeyState.ACTIVE for row in mine
    ):
        raise KeyStateError(_concurrent(tenant, purpose))
    if not mine:
        return keyring._create_first_key(tenant, purpose).info()
    _refuse_foreign_keks(keyring, tenant, purpose, mine)
    pending = [row for row in mine if row.state is KeyState.PENDING]
    if pending:
        if activate_now:
            promoted = _promote(keyring, pending[-1])
            if promoted is not None:
                return promoted.info()
        raise KeyPendingError(
            f"tenant {tenant!r} already has pending {purpose.value} key version "
            f"{pending[-1].version}: it becomes active after active_key_ttl "
            "(promote_pending), or rotate with activate_now=True to activate it now",
            tenant_id=tenant,
            purpose=purpose.value,
            version=pending[-1].version,
        )
    context = WrapContext(uuid.uuid4(), tenant, purpose, max(row.version for row in mine) + 1)
    generated = keyring._generate(context)
    state = KeyState.ACTIVE if activate_now else KeyState.PENDING
    row = keyring._new_row(context, generated, state)
    active = next((r for r in mine if r.state is KeyState.ACTIVE), None)
    try:
        with keyring._store.begin() as conn:
            if activate_now and active is not None:
                demoted = keyring._store.compare_and_set(conn, active, state=KeyState.DECRYPT_ONLY)
                if demoted is None:
                    raise KeyStateError(_concurrent(tenant, purpose))
            keyring._store.insert(conn, row)
    except sa.exc.IntegrityError:
        raise KeyStateError(_concurrent(tenant, purpose)) from None
    keyring._cache_new_key(row, generated)
    audit_event("key.rotated", **row_fields(row), state=state.value)
    if activate_now and active is not None:
        audit_event("key.demoted", **row_fields(active), state=KeyState.DECRYPT_ONLY.value)
    return row.info()


def _refuse_foreign_keks(
    keyring: Keyring, tenant: str, purpose: KeyPurpose, rows: Sequence[KeyRow]
) -> None:
    """Raise if no provider of the keyring has a KEK that wrapped these rows.

    Such a keyring is configured for another environment, for example with
    another key file. A version it created would be wrapped by a KEK that
    the processes reading the tenant's values do not have.

    NOTE: ``AwsKms.can_unwrap`` accepts every key ARN, so an AWS KMS key of
    another account or environment passes this check.
    """
    wrapped = [row for row in rows if row.wrapped_dek is not None]
    providers = keyring.providers
    if not wrapped or any(
        provider.can_unwrap(row.kms_provider, row.kek_id)
        for row in wrapped
        for provider in providers
    ):
        return
    keks = ", ".join(sorted({row.kek_id for row in wrapped}))
    raise ConfigurationError(
        f"cannot rotate the {purpose.value} keys of tenant {tenant!r}: they are wrapped by "
        f"KEK {keks}, which none of this keyring's KMS providers has, so the KMS "
        "configuration may belong to another environment; configure the KMS the application "
        "uses (previous_kms=, or --previous-kms on the command line, adds a KEK that only "
        "unwraps)"
    )


def _concurrent(tenant: str, purpose: KeyPurpose) -> str:
    return (
        f"the {purpose.value} keys of tenant {tenant!r} were changed by another process during "
        "the rotation; list the keys and retry"
    )


def _due(keyring: Keyring, row: KeyRow, now: datetime.datetime) -> bool:
    return row.created_at <= now - datetime.timedelta(seconds=keyring.active_key_ttl)


def promote_due(keyring: Keyring, rows: Sequence[KeyRow]) -> bool:
    """Promote the newest pending row of one tenant and purpose if it is due.

    A pending row is due once it is older than ``active_key_ttl``, or at
    once when there is no active row at all. Returns True if a row changed.
    """
    pending = [row for row in rows if row.state is KeyState.PENDING]
    if not pending:
        return False
    newest = max(pending, key=lambda row: row.version)
    has_active = any(row.state is KeyState.ACTIVE for row in rows)
    if has_active and not _due(keyring, newest, keyring._now()):
        return False
    return _promote(keyring, newest) is not None


def promote_pending(keyring: Keyring, tenant_id: str | None) -> list[KeyInfo]:
    now = keyring._now()
    promoted = []
    for row in keyring._store.rows(tenant_id, states=[KeyState.PENDING]):
        if _due(keyring, row, now):
            result = _promote(keyring, row)
            if result is not None:
                promoted.append(result.info())
    return promoted


class _Conflict(Exception):
    """Another process changed a row first; the transaction is rolled back."""


def _promote(keyring: Keyring, pending: KeyRow) -> KeyRow | None:
    """Make ``pending`` active and the current active row decrypt-only, atomically."""
    store = keyring._store
    try:
        with keyring._store.begin() as conn:
            rows = store.tenant_rows(pending.tenant_id, conn, for_update=True)
            current = next((row for row in rows if row.key_id == pending.key_id), None)
            if current is None or current.state is not KeyState.PENDING:
                return None
            active = next(
                (r for r in rows if r.purpose is pending.purpose and r.state is KeyState.ACTIVE),
                None,
            )
            if active is not None:
                if store.compare_and_set(conn, active, state=KeyState.DECRYPT_ONLY) is None:
                    raise _Conflict
            promoted = store.compare_and_set(
                conn, current, state=KeyState.ACTIVE, activated_at=keyring._now()
            )
            if promoted is None:
                raise _Conflict
    except _Conflict:
        return None
    keyring._invalidate_tenant(pending.tenant_id)
    audit_event("key.activated", **row_fields(promoted))
    if active is not None:
        audit_event("key.demoted", **row_fields(active), state=KeyState.DECRYPT_ONLY.value)
    return promoted


# -- rewrapping ---------------------------------------------------------------


def rewrap(keyring: Keyring, new_kms: KmsProvider | None, tenant_id: str | None) -> int:
    target = new_kms if new_kms is not None else keyring.kms
    if new_kms is not None:
        keyring._use_provider(new_kms, for_new_keys=False)
    count = 0
    try:
        rows = keyring._store.rows(
            tenant_id, states=[state for state in KeyState if state is not KeyState.DESTROYED]
        )
        for row in rows:
            if _rewrap_row(keyring, row, target):
                count += 1
    finally:
        # Cached rows still hold the old wrapped DEKs; the DEKs themselves are unchanged.
        keyring._invalidate_lookups()
    if new_kms is not None and tenant_id is None:
        keyring._use_provider(new_kms, for_new_keys=True)
    audit_event(
        "keyring.rewrapped",
        keys=count,
        tenant=tenant_id if tenant_id is not None else "*",
        kek=target.kek_id,
    )
    return count


def _rewrap_row(keyring: Keyring, row: KeyRow, target: KmsProvider) -> bool:
    for _ in range(_CAS_ATTEMPTS):
        if row.wrapped_dek is None:
            return False
        wrapped = _new_wrapping(keyring, row, target)
        # Verify before the row changes: the new wrapped DEK must unwrap,
        # under the target KEK, to the DEK the row's key check value names.
        check = row.evolve(kms_provider=target.provider_name, kek_id=target.kek_id)
        keyring._verified_cipher(check, keyring._unwrap_with(target, check, wrapped, target.kek_id))
        with keyring._store.begin() as conn:
            updated = keyring._store.compare_and_set(
                conn,
                row,
                wrapped_dek=wrapped,
                kms_provider=target.provider_name,
                kek_id=target.kek_id,
                rewrapped_at=keyring._now(),
            )
        if updated is not None:
            audit_event(
                "key.rewrapped", **row_fields(row), from_kek=row.kek_id, to_kek=target.kek_id
            )
            return True
        fresh = keyring._store.get(row.key_id)
        if fresh is None:
            return False
        row = fresh
    raise KeyStateError(
        f"the keyring row of {row.describe()} kept changing during the rewrap; run it again"
    )


def _new_wrapping(keyring: Keyring, row: KeyRow, target: KmsProvider) -> bytes:
    assert row.wrapped_dek is not None
    source = keyring._provider_for(row)
    if type(source) is type(target) and target.can_unwrap(row.kms_provider, row.kek_id):
        # The same KMS can move the wrapped DEK without returning its plaintext.
        keyring.cache.record_kms_call()
        try:
            return target.reencrypt(row.wrapped_dek, row.context, row.kek_id)
        except KmsError as exc:
            keyring._kms_failed("reencrypt", exc, **row_fields(row), to_kek=target.kek_id)
            raise
    dek = keyring._unwrap_with(source, row, row.wrapped_dek, row.kek_id)
    keyring._verified_cipher(row, dek)
    keyring.cache.record_kms_call()
    try:
        return target.wrap(dek, row.context)
    except KmsError as exc:
        keyring._kms_failed("wrap", exc, **row_fields(row), to_kek=target.kek_id)
        raise


# -- retiring and shredding ---------------------------------------------------


def _version_rows(
    keyring: Keyring,
    tenant: str,
    version: int,
    purpose: KeyPurpose | None,
    action: str,
    tenant_rows: Sequence[KeyRow] | None = None,
) -> list[KeyRow]:
    """Return the tenant's rows of ``version`` (of ``purpose`` only, if given),
    or raise :class:`KeyNotFoundError` naming ``action`` if there are none.

    The rows come from ``tenant_rows`` when given, else from the table."""
    purposes = set(_purposes(purpose))
    if tenant_rows is None:
        tenant_rows = keyring._store.tenant_rows(tenant)
    rows = [row for row in tenant_rows if row.version == version and row.purpose in purposes]
    if not rows:
        purpose_text = f"{purpose.value} " if purpose is not None else ""
        raise KeyNotFoundError(
            f"tenant {tenant!r} has no {purpose_text}key version {version} to {action}"
        )
    return rows


def retire(
    keyring: Keyring,
    tenant: str,
    version: int,
    purpose: KeyPurpose | None,
    min_inactive_seconds: float | None = None,
) -> list[KeyInfo]:
    tenant_rows = keyring._store.tenant_rows(tenant)
    rows = _version_rows(keyring, tenant, version, purpose, "retire", tenant_rows)
    in_use = [row for row in rows if row.state in (KeyState.ACTIVE, KeyState.PENDING)]
    if purpose is not None and in_use:
        raise KeyStateError(_in_use_message(tenant, version, in_use))
    # Without a purpose, a version that is active or pending for one purpose
    # is skipped there and retired where it is decrypt-only.
    if in_use and not any(row.state in (KeyState.DECRYPT_ONLY, KeyState.RETIRED) for row in rows):
        raise KeyStateError(_in_use_message(tenant, version, in_use))
    _raise_if_recently_active(keyring, tenant_rows, rows, min_inactive_seconds)
    retired = []
    with keyring._store.begin() as conn:
        for row in rows:
            if row.state is not KeyState.DECRYPT_ONLY:
                continue
            updated = keyring._store.compare_and_set(
                conn, row, state=KeyState.RETIRED, retired_at=keyring._now()
            )
            if updated is None:
                raise KeyStateError(
                    f"the keyring row of {row.describe()} changed during retire; retry"
                )
            retired.append(updated)
    for row in retired:
        keyring.cache.invalidate(row.key_id)
        audit_event("key.retired", **row_fields(row))
    keyring._invalidate_tenant(tenant)
    return [row.info() for row in retired]


def check_retire_wait(
    keyring: Keyring,
    tenant: str,
    version: int,
    purpose: KeyPurpose | None,
    min_inactive_seconds: float | None = None,
) -> None:
    """Raise :class:`KeyRecentlyActiveError` if a decrypt-only row of
    ``version`` stopped being active less than ``min_inactive_seconds`` ago;
    see :meth:`Keyring.check_retire_wait`."""
    tenant_rows = keyring._store.tenant_rows(tenant)
    rows = _version_rows(keyring, tenant, version, purpose, "retire", tenant_rows)
    _raise_if_recently_active(keyring, tenant_rows, rows, min_inactive_seconds)


def _raise_if_recently_active(
    keyring: Keyring,
    tenant_rows: Sequence[KeyRow],
    rows: Sequence[KeyRow],
    min_inactive_seconds: float | None,
) -> None:
    """Raise unless each decrypt-only row of ``rows`` stopped being active at
    least ``min_inactive_seconds`` ago (default: ``active_key_ttl`` plus
    :data:`RETIRE_MARGIN_SECONDS`).

    ``tenant_rows`` are all rows of the tenant, read with ``rows``. Active
    and pending rows are not retired, so they are not checked.
    """
    if min_inactive_seconds is None:
        wait_seconds = keyring.active_key_ttl + RETIRE_MARGIN_SECONDS
        reason = (
            f"this keyring's active_key_ttl ({keyring.active_key_ttl:g} s) plus "
            f"{RETIRE_MARGIN_SECONDS:g} s"
        )
    else:
        wait_seconds = min_inactive_seconds
        reason = "min_inactive_seconds (--min-inactive on the command line)"
    if wait_seconds < 0:
        raise ConfigurationError(
            f"min_inactive_seconds must be 0 or more seconds, not {wait_seconds}"
        )
    if wait_seconds == 0:
        return
    now = keyring._now()
    for row in rows:
        if row.state is not KeyState.DECRYPT_ONLY:
            continue
        since = _inactive_since(tenant_rows, row)
        if since is None:
            raise KeyStateError(
                f"cannot tell when {_version_text(row)} stopped being the active version: "
                f"no newer {row.purpose.value} version has an activation time in the keyring "
                "table. Retire it once no process uses it as the active version any more, "
                "passing min_inactive_seconds=0 (--min-inactive 0 on the command line)"
            )
        not_before = since + datetime.timedelta(seconds=wait_seconds)
        if now < not_before:
            raise KeyRecentlyActiveError(
                _recently_active_message(row, since, now, not_before, wait_seconds, reason),
                tenant_id=row.tenant_id,
                version=row.version,
                not_before=not_before,
                retry_after=(not_before - now).total_seconds(),
            )


def _inactive_since(rows: Sequence[KeyRow], row: KeyRow) -> datetime.datetime | None:
    """Return when ``row`` stopped being the active version of its purpose.

    That is when the next version of the same tenant and purpose became
    active: a promotion or an ``activate_now`` rotation activates the new
    row and demotes the old one in one transaction, and versions become
    active in version order. Deriving the time from ``activated_at``, which
    every keyring table has had from its first release, keeps tables created
    by earlier releases working without a migration.
    """
    later = [
        other.activated_at
        for other in rows
        if other.purpose is row.purpose
        and other.version > row.version
        and other.activated_at is not None
    ]
    return min(later) if later else None


def _version_text(row: KeyRow) -> str:
    return (
        f"{row.purpose.value} key version {row.version} of tenant {row.tenant_id!r} "
        f"(key id {row.key_id})"
    )


def _recently_active_message(
    row: KeyRow,
    since: datetime.datetime,
    now: datetime.datetime,
    not_before: datetime.datetime,
    wait_seconds: float,
    reason: str,
) -> str:
    ago = max(0.0, (now - since).total_seconds())
    retry_after = (not_before - now).total_seconds()
    return (
        f"cannot retire {_version_text(row)} yet: it stopped being the active version "
        f"{ago:.0f} s ago (at {since:%Y-%m-%d %H:%M:%S} UTC), and processes that cached it "
        "as active may still seal new values under it until their active_key_ttl has "
        f"passed. Retry in {math.ceil(retry_after)} s (at {not_before:%H:%M:%S} UTC), when "
        f"it has been inactive for {wait_seconds:g} s: {reason}. If the application's "
        "processes use a longer active_key_ttl, pass a longer min_inactive_seconds "
        "(--min-inactive on the command line)"
    )


def reinstate(
    keyring: Keyring, tenant: str, version: int, purpose: KeyPurpose | None
) -> list[KeyInfo]:
    """Make a retired version decrypt-only again; see :meth:`Keyring.reinstate`."""
    rows = _version_rows(keyring, tenant, version, purpose, "reinstate")
    destroyed = [row for row in rows if row.state is KeyState.DESTROYED]
    if destroyed:
        raise KeyDestroyedError(
            f"cannot reinstate key version {version} of tenant {tenant!r}: the tenant was "
            "crypto-shredded and its DEKs no longer exist"
        )
    retired = [row for row in rows if row.state is KeyState.RETIRED]
    if not retired:
        states = ", ".join(f"{row.purpose.value}: {row.state.value}" for row in rows)
        raise KeyStateError(
            f"key version {version} of tenant {tenant!r} is not retired ({states}), so it "
            "still decrypts; there is nothing to reinstate"
        )

    reinstated = []
    with keyring._store.begin() as conn:
        for row in retired:
            updated = keyring._store.compare_and_set(
                conn, row, state=KeyState.DECRYPT_ONLY, retired_at=None
            )
            if updated is None:
                raise KeyStateError(
                    f"the keyring row of {row.describe()} changed during reinstate; retry"
                )
            reinstated.append(updated)
    for row in reinstated:
        audit_event("key.reinstated", **row_fields(row))
    keyring._invalidate_tenant(tenant)
    return [row.info() for row in reinstated]


def _in_use_message(tenant: str, version: int, rows: Sequence[KeyRow]) -> str:
    """Explain why active or pending ``rows`` of one version cannot be retired."""
    states = ", ".join(f"{row.purpose.value}: {row.state.value}" for row in rows)
    purposes = " and ".join(row.purpose.value for row in rows)
    return (
        f"cannot retire key version {version} of tenant {tenant!r} ({states}): new values "
        "are encrypted with the active version, and a pending one becomes active, so only "
        f"a decrypt-only version can be retired. Version {version} becomes decrypt-only "
        f"once a newer {purposes} version is active: rotate that purpose, re-encrypt the "
        f"tenant's values, then retire version {version}"
    )


def shred(keyring: Keyring, tenant: str) -> int:
    table = keyring.table
    with keyring._store.begin() as conn:
        rows = [
            row
            for row in keyring._store.tenant_rows(tenant, conn, for_update=True)
            if row.state is not KeyState.DESTROYED
        ]
        conn.execute(
            table.update()
            .where(table.c.tenant_id == tenant)
            .where(table.c.state != KeyState.DESTROYED.value)
            .values(
                state=KeyState.DESTROYED.value,
                wrapped_dek=None,
                destroyed_at=keyring._now(),
                row_version=table.c.row_version + 1,
            )
        )
    keyring._invalidate_tenant(tenant, drop_deks=True)
    for row in rows:
        audit_event("key.destroyed", **row_fields(row))
    audit_event("tenant.shredded", tenant=tenant, keys=len(rows))
    return len(rows)
