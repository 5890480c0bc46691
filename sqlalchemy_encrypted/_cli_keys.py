"""The ``keys`` commands: list, rotate, promote, rewrap, retire and shred DEKs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import click

from ._cli_context import (
    ErrorHandlingGroup,
    ExitCode,
    print_json,
    render_table,
    settings_of,
)
from ._cli_tenants import no_keys_error, require_keys
from ._cli_unknown_keys import IGNORE_UNKNOWN_KEYS, check_no_unknown_keys
from .errors import KeyDestroyedError, KeyPendingError, KeyRecentlyActiveError, KeyStateError
from .keyring import RETIRE_MARGIN_SECONDS, Keyring, KeyState
from .keys import KeyPurpose
from .kms import kms_from_uri
from .rotation import retire_key_version

__all__ = ["keys"]

_PURPOSES = click.Choice([purpose.value for purpose in KeyPurpose])


@click.group(cls=ErrorHandlingGroup)
def keys() -> None:
    """List, rotate, rewrap, retire, reinstate and shred data keys."""


def _key_dict(info: Any, sealed: dict[Any, int] | None) -> dict[str, Any]:
    return {
        "key_id": str(info.key_id),
        "tenant_id": info.tenant_id,
        "purpose": info.purpose.value,
        "version": info.version,
        "state": info.state.value,
        "kms_provider": info.kms_provider,
        "kek_id": info.kek_id,
        "created_at": info.created_at.isoformat(),
        "activated_at": info.activated_at.isoformat() if info.activated_at else None,
        "sealed_count": None if sealed is None else sealed.get(info.key_id),
    }


def _print_keys(infos: Sequence[Any], sealed: dict[Any, int] | None) -> None:
    rows = [
        (
            info.tenant_id,
            info.purpose.value,
            info.version,
            info.state.value,
            "-" if sealed is None else sealed.get(info.key_id, "-"),
            info.key_id,
            info.kek_id,
            info.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for info in infos
    ]
    headers = (
        "TENANT",
        "PURPOSE",
        "VERSION",
        "STATE",
        "SEALS RESERVED",
        "KEY ID",
        "KEK",
        "CREATED (UTC)",
    )
    click.echo(render_table(headers, rows))


@keys.command("list")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_list(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """List key metadata; no key is unwrapped and no KMS is needed.

    SEALS RESERVED is the usage count of a randomized key (seals reserved by
    processes, used or not), which the keyring compares with its
    key_usage_limit. A --tenant without keys is an error.
    """
    keyring = settings_of(ctx).key_metadata()
    if tenant is not None:
        require_keys(keyring, keyring.table.fullname, tenant)
    infos = sorted(
        keyring.list_keys(tenant),
        key=lambda info: (info.tenant_id, info.purpose.value, info.version),
    )
    sealed = keyring.sealed_counts(tenant)
    if as_json:
        print_json([_key_dict(info, sealed) for info in infos])
    elif infos:
        _print_keys(infos, sealed)
    else:
        click.echo("no keys")


def _keys_by_tenant(keyring: Keyring, tenants: Iterable[str]) -> dict[str, list[Any]]:
    requested = set(tenants)
    found: dict[str, list[Any]] = {tenant: [] for tenant in requested}
    for info in keyring.list_keys():
        if info.tenant_id in requested:
            found[info.tenant_id].append(info)
    return found


def _pending_error(tenant: str, purpose: str, version: int) -> KeyPendingError:
    """Return the error for a rotation that finds a pending version, naming
    the commands that resolve it."""
    return KeyPendingError(
        f"tenant {tenant!r} already has pending {purpose} key version {version}: run "
        "'sqlalchemy-encrypted keys promote' once it is older than --active-key-ttl, or "
        "rotate with --activate-now; no key was created",
        tenant_id=tenant,
        purpose=purpose,
        version=version,
    )


def _plan_rotation(
    keyring: Keyring,
    tenants: Sequence[str],
    purpose: str | None,
    activate_now: bool,
    skip_pending: bool,
) -> tuple[list[tuple[str, KeyPurpose]], list[Any]]:
    """Return the (tenant, purpose) pairs to rotate and the pending keys skipped.

    Raises before any key is created if one of the tenants cannot be
    rotated: a mistyped tenant id would otherwise get brand-new keys, and a
    failure halfway through a list would leave the earlier tenants rotated.
    A pending version is an error unless ``skip_pending`` is set, which
    lets ``--all-tenants`` finish a run that was interrupted.
    """
    by_tenant = _keys_by_tenant(keyring, tenants)
    planned: list[tuple[str, KeyPurpose]] = []
    skipped: list[Any] = []
    for tenant in tenants:
        infos = by_tenant[tenant]
        if not infos:
            raise no_keys_error(keyring.table.fullname, tenant)
        if any(info.state is KeyState.DESTROYED for info in infos):
            raise KeyDestroyedError(
                f"the keys of tenant {tenant!r} were destroyed (crypto-shredded): it cannot "
                "be rotated"
            )
        # Without --purpose, only the purposes the tenant has keys for: a
        # new first key of an unused purpose would be an active version 1.
        used = {info.purpose for info in infos}
        purposes = [KeyPurpose(purpose)] if purpose else [p for p in KeyPurpose if p in used]
        for key_purpose in purposes:
            pending = [
                info
                for info in infos
                if info.state is KeyState.PENDING and info.purpose is key_purpose
            ]
            if not pending or activate_now:
                planned.append((tenant, key_purpose))
            elif skip_pending:
                skipped.append(pending[-1])
            else:
                raise _pending_error(tenant, key_purpose.value, pending[-1].version)
    return planned, skipped


@keys.command("rotate")
@click.argument("tenants", nargs=-1)
@click.option(
    "--all-tenants",
    is_flag=True,
    help="Rotate every tenant that has keys, skipping versions already pending.",
)
@click.option(
    "--purpose",
    type=_PURPOSES,
    help="Rotate this purpose only (default: every purpose the tenant has keys for).",
)
@click.option(
    "--activate-now",
    is_flag=True,
    help="Activate at once instead of after --active-key-ttl; only safe when no other "
    "process is running.",
)
@click.option(
    IGNORE_UNKNOWN_KEYS,
    "ignore_unknown_keys",
    is_flag=True,
    help="Rotate even when stored values name key ids that are not in the keyring "
    "table, and skip the census that finds them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_rotate(
    ctx: click.Context,
    tenants: tuple[str, ...],
    all_tenants: bool,
    purpose: str | None,
    activate_now: bool,
    ignore_unknown_keys: bool,
    as_json: bool,
) -> None:
    """Create a new key version for each TENANT.

    Every TENANT must already have keys: this command never creates a
    tenant's first keys, which its first write creates, so a mistyped tenant
    id is an error. Without --purpose, only the purposes the tenant has keys
    for are rotated.

    With --models, a census of the encrypted columns runs first, and while
    values of a TENANT name key ids that are not in the keyring table, no
    key is created (status 8) unless --ignore-unknown-keys is given.
    Without --models, the command prints a note on stderr that the values
    were not checked.
    """
    settings = settings_of(ctx)
    keyring = settings.keyring()
    if all_tenants == bool(tenants):
        raise click.UsageError("name one or more tenants, or pass --all-tenants")
    if all_tenants:
        infos = keyring.list_keys()
        shredded = sorted({i.tenant_id for i in infos if i.state is KeyState.DESTROYED})
        tenants = tuple(sorted({i.tenant_id for i in infos} - set(shredded)))
        for tenant in shredded:
            click.echo(
                f"tenant {tenant!r}: crypto-shredded, so it has no keys to rotate; skipped",
                err=True,
            )
    tenants = tuple(dict.fromkeys(tenants))
    planned, skipped = _plan_rotation(
        keyring, tenants, purpose, activate_now, skip_pending=all_tenants
    )
    for info in skipped:
        click.echo(
            f"tenant {info.tenant_id!r}: {info.purpose.value} key version {info.version} is "
            "already pending; skipped",
            err=True,
        )
    if planned and not ignore_unknown_keys:
        check_no_unknown_keys(settings, keyring)
    created = []
    for tenant, key_purpose in planned:
        try:
            created.extend(keyring.rotate(tenant, key_purpose, activate_now=activate_now))
        except KeyPendingError as exc:
            # Another process rotated the tenant after the plan was checked. The
            # keyring's message names Python arguments; name the options instead.
            raise _pending_error(exc.tenant_id, exc.purpose, exc.version) from None
    if as_json:
        print_json([_key_dict(info, {}) for info in created])
        return
    for info in created:
        click.echo(
            f"tenant {info.tenant_id!r}: {info.purpose.value} key version {info.version} "
            f"is {info.state.value}"
        )
    if created and not activate_now:
        click.echo(
            f"new versions become active once they are {settings.active_key_ttl:g} s old, at "
            "the next write of the tenant or with 'sqlalchemy-encrypted keys promote'; run "
            f"'sqlalchemy-encrypted reencrypt' {settings.active_key_ttl:g} s after that"
        )


@keys.command("promote")
@click.option("--tenant", help="Only this tenant's keys.")
@click.pass_context
def keys_promote(ctx: click.Context, tenant: str | None) -> None:
    """Activate pending key versions older than --active-key-ttl.

    No KMS is needed. A --tenant without keys is an error.
    """
    keyring = settings_of(ctx).key_metadata()
    if tenant is not None:
        require_keys(keyring, keyring.table.fullname, tenant)
    promoted = keyring.promote_pending(tenant)
    for info in promoted:
        click.echo(
            f"tenant {info.tenant_id!r}: {info.purpose.value} key version {info.version} is active"
        )
    if not promoted:
        click.echo("no pending key version is due")


@keys.command("rewrap")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option(
    "--to-kms",
    help="KMS URI of the new KEK; the --kms provider still unwraps (default: rewrap "
    "under the --kms KEK).",
)
@click.pass_context
def keys_rewrap(ctx: click.Context, tenant: str | None, to_kms: str | None) -> None:
    """Wrap every DEK again under a KEK; no data row changes.

    A --tenant without keys is an error.
    """
    keyring = settings_of(ctx).keyring()
    if tenant is not None:
        require_keys(keyring, keyring.table.fullname, tenant)
        if _is_shredded(keyring, tenant):
            click.echo(
                f"tenant {tenant!r} was crypto-shredded: its keys are destroyed, so there is "
                "nothing to rewrap"
            )
            return
    target = kms_from_uri(to_kms) if to_kms else None
    count = keyring.rewrap(target, tenant_id=tenant)
    kek = target.kek_id if target is not None else keyring.kms.kek_id
    click.echo(f"rewrapped {count} key(s) under KEK {kek}")


@keys.command("retire")
@click.argument("tenant")
@click.argument("version", type=click.IntRange(min=1))
@click.option(
    "--purpose",
    type=_PURPOSES,
    help="Retire this purpose only (default: each purpose where VERSION is decrypt-only).",
)
@click.option(
    "--min-inactive",
    "min_inactive",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help=(
        "Seconds VERSION must have been inactive (since a newer version became active) "
        "before it is retired. It must cover the longest active_key_ttl of the "
        f"application's processes. Default: --active-key-ttl plus {RETIRE_MARGIN_SECONDS:g}."
    ),
)
@click.pass_context
def keys_retire(
    ctx: click.Context,
    tenant: str,
    version: int,
    purpose: str | None,
    min_inactive: float | None,
) -> None:
    """Retire key VERSION of TENANT once the census finds no value under it.

    Without --purpose, VERSION is retired for each purpose where it is
    decrypt-only, and purposes where it is active or pending are skipped.
    Needs --models: every table that may hold the tenant's values must be in
    the census. No KMS is needed. A TENANT without keys, or whose keys were
    destroyed by 'keys shred', is an error.

    Processes keep sealing new values under the version they cached as
    active for up to their active_key_ttl, so VERSION is retired only
    --min-inactive seconds after it stopped being active, and the census is
    taken after that. Earlier, the command exits with status 10 and prints
    how long to wait.
    """
    settings = settings_of(ctx)
    keyring = settings.key_metadata()
    _check_retirable(keyring, tenant)
    try:
        retired = retire_key_version(
            settings.engine(),
            settings.tables(),
            keyring,
            tenant,
            version,
            KeyPurpose(purpose) if purpose else None,
            min_inactive_seconds=min_inactive,
        )
    except KeyRecentlyActiveError:
        raise
    except KeyStateError as exc:
        hint = _rotation_hint(keyring, tenant, version)
        if not hint:
            raise
        raise KeyStateError(f"{exc}. {hint}") from None
    if not retired:
        _explain_nothing_retired(keyring, tenant, version, purpose)
        return
    for info in retired:
        click.echo(f"tenant {tenant!r}: {info.purpose.value} key version {info.version} retired")
    _report_skipped(keyring, tenant, version, {info.purpose for info in retired})


@keys.command("reinstate")
@click.argument("tenant")
@click.argument("version", type=click.IntRange(min=1))
@click.option(
    "--purpose",
    type=_PURPOSES,
    help="Reinstate this purpose only (default: each purpose where VERSION is retired).",
)
@click.pass_context
def keys_reinstate(ctx: click.Context, tenant: str, version: int, purpose: str | None) -> None:
    """Make retired key VERSION of TENANT decrypt-only again.

    For values that still need the version, such as data restored from a
    backup taken before the retirement: reinstate it, re-encrypt, then
    retire it again. Retiring keeps the wrapped DEK, so no KMS is needed.
    A version that is not retired, or a shredded TENANT, is an error.
    """
    keyring = settings_of(ctx).key_metadata()
    require_keys(keyring, keyring.table.fullname, tenant)
    reinstated = keyring.reinstate(tenant, version, KeyPurpose(purpose) if purpose else None)
    for info in reinstated:
        click.echo(
            f"tenant {tenant!r}: {info.purpose.value} key version {info.version} is "
            f"{info.state.value} again; run 'sqlalchemy-encrypted reencrypt --tenant {tenant}', "
            "then retire the version again"
        )


def _is_shredded(keyring: Keyring, tenant: str) -> bool:
    """Return True when 'keys shred' destroyed the tenant's keys."""
    return any(info.state is KeyState.DESTROYED for info in keyring.list_keys(tenant))


def _check_retirable(keyring: Keyring, tenant: str) -> None:
    """Raise for a tenant without keys or a shredded one.

    This runs before the census, because the census counts a shredded
    tenant's values as still using the version, and the resulting error would
    advise re-encrypting values that can no longer be decrypted.
    """
    infos = keyring.list_keys(tenant)
    if not infos:
        raise no_keys_error(keyring.table.fullname, tenant)
    if any(info.state is KeyState.DESTROYED for info in infos):
        raise KeyDestroyedError(
            f"the keys of tenant {tenant!r} were destroyed (crypto-shredded): no key version "
            "is left to retire, and its stored values can no longer be decrypted"
        )


def _explain_nothing_retired(
    keyring: Keyring, tenant: str, version: int, purpose: str | None
) -> None:
    """Report a retire that changed nothing.

    A version already retired for some purpose is success, so the command
    can be run again. Any other state raises :class:`KeyStateError`.
    """
    purposes = {KeyPurpose(purpose)} if purpose else set(KeyPurpose)
    infos = [
        info
        for info in keyring.list_keys(tenant)
        if info.version == version and info.purpose in purposes
    ]
    if any(info.state is KeyState.RETIRED for info in infos):
        click.echo(f"tenant {tenant!r}: key version {version} is already retired")
        _report_skipped(keyring, tenant, version, set())
        return
    states = ", ".join(f"{info.purpose.value}: {info.state.value}" for info in infos)
    raise KeyStateError(
        f"tenant {tenant!r} has no decrypt-only key version {version} to retire ({states})"
    )


def _rotation_hint(keyring: Keyring, tenant: str, version: int) -> str:
    """Return the commands that make VERSION decrypt-only where it is active."""
    current = sorted(
        info.purpose.value
        for info in keyring.list_keys(tenant)
        if info.version == version and info.state is KeyState.ACTIVE
    )
    if not current:
        return ""
    rotations = " and ".join(
        f"'sqlalchemy-encrypted keys rotate {tenant} --purpose {name}'" for name in current
    )
    return (
        f"From the command line: {rotations}, then 'sqlalchemy-encrypted reencrypt' once "
        "the new version is active"
    )


def _report_skipped(keyring: Keyring, tenant: str, version: int, retired: set[KeyPurpose]) -> None:
    """Print the purposes where VERSION is active or pending, so not retired."""
    for info in keyring.list_keys(tenant):
        if (
            info.version == version
            and info.purpose not in retired
            and info.state in (KeyState.ACTIVE, KeyState.PENDING)
        ):
            click.echo(
                f"tenant {tenant!r}: {info.purpose.value} key version {version} is "
                f"{info.state.value}, so it was not retired"
            )


@keys.command("shred")
@click.argument("tenant")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for automation).")
@click.pass_context
def keys_shred(ctx: click.Context, tenant: str, yes: bool) -> None:
    """Destroy every key of TENANT: its values can no longer be decrypted.

    No KMS is needed: the wrapped keys are deleted from the keyring table.
    """
    settings = settings_of(ctx)
    keyring = settings.key_metadata()
    infos = keyring.list_keys(tenant)
    if not infos:
        # Nothing would be destroyed: most likely a mistyped tenant id, whose
        # real tenant would stay readable while the command reported success.
        raise no_keys_error(keyring.table.fullname, tenant)
    if all(info.state is KeyState.DESTROYED for info in infos):
        click.echo(f"tenant {tenant!r}: every key was already destroyed")
        return
    if not yes:
        click.echo(
            f"This destroys every key of tenant {tenant!r}. Its encrypted values can no "
            "longer be decrypted, and backups of the data tables do not help. Backups of "
            "the keyring table still hold its wrapped keys until they expire.",
            err=True,
        )
        typed = click.prompt("Type the tenant id to confirm", default="", show_default=False)
        if typed != tenant:
            click.echo("error: the tenant id did not match; nothing was destroyed", err=True)
            ctx.exit(int(ExitCode.ABORTED))
    count = keyring.shred(tenant)
    click.echo(f"tenant {tenant!r}: destroyed {count} key(s)")
