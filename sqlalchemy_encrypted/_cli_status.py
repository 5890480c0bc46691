"""The ``status`` command: the census and the checkpoints of re-encryption jobs."""

from __future__ import annotations

from typing import Any

import click

from ._cli_context import (
    ExitCode,
    print_json,
    render_table,
    settings_of,
)
from ._cli_jobs import job_slots, print_job_slots
from ._cli_tenants import check_tenants_known
from .rotation import Census, census
from .rotation.catalog import KeyStateName

__all__ = ["status", "tenant_mismatch_message", "unknown_keys_message"]


def _census_rows(result: Census) -> list[tuple[Any, ...]]:
    rows = []
    for column in result.columns:
        for entry in column.entries:
            rows.append(
                (
                    column.label,
                    entry.tenant_id or "?",
                    entry.key_version,
                    entry.key_state,
                    entry.count,
                    "yes" if entry.stale else "",
                )
            )
    return rows


def _totals(result: Census) -> dict[str, int]:
    return {
        "columns": len(result.columns),
        "encrypted": sum(column.encrypted for column in result.columns),
        "nulls": sum(column.nulls for column in result.columns),
        "not_encrypted": sum(column.not_encrypted for column in result.columns),
        "tenant_mismatches": sum(column.tenant_mismatches for column in result.columns),
        "stale": result.stale_total,
        "unknown_keys": sum(result.unknown_keys.values()),
    }


def _print_census(result: Census, keyring_table: str) -> None:
    rows = _census_rows(result)
    if rows:
        headers = ("COLUMN", "TENANT", "VERSION", "KEY STATE", "VALUES", "STALE")
        click.echo(render_table(headers, rows))
    else:
        click.echo("no encrypted values")
    for column in result.columns:
        extra = []
        if column.nulls:
            extra.append(f"{column.nulls} NULL")
        if column.not_encrypted:
            extra.append(f"{column.not_encrypted} not encrypted")
        if column.tenant_mismatches:
            extra.append(f"{column.tenant_mismatches} under another tenant's key")
        if extra:
            click.echo(f"{column.label}: {', '.join(extra)}")
    totals = _totals(result)
    summary = f"total: {totals['encrypted']} encrypted value(s) in {totals['columns']} column(s)"
    if totals["nulls"]:
        summary += f", {totals['nulls']} NULL"
    if totals["not_encrypted"]:
        summary += f", {totals['not_encrypted']} not encrypted"
    click.echo(summary)

    stale = result.stale()
    if stale:
        total = sum(stale.values())
        click.echo(
            f"{total} value(s) under an old key version: run 'sqlalchemy-encrypted reencrypt'"
        )
    retired = _retired_versions(result)
    if retired:
        versions = ", ".join(f"{tenant!r} version {version}" for tenant, version in retired)
        click.echo(
            f"values are under retired key versions ({versions}), which no longer decrypt: "
            "run 'sqlalchemy-encrypted keys reinstate TENANT VERSION' for each before "
            "re-encrypting, then retire the version again"
        )
    elif not stale and not result.unknown_keys:
        click.echo("no value is under an old key version")
    if result.unknown_keys:
        click.echo(unknown_keys_message(result.unknown_keys, keyring_table))
    mismatched = result.mismatched()
    if mismatched:
        click.echo(tenant_mismatch_message(mismatched))


def _retired_versions(result: Census) -> list[tuple[str, int]]:
    """Return the (tenant, version) pairs of retired keys that values still use."""
    found: set[tuple[str, int]] = set()
    for entry in result:
        if entry.key_state == KeyStateName.RETIRED and entry.tenant_id is not None:
            found.add((entry.tenant_id, entry.key_version))
    return sorted(found)


def unknown_keys_message(unknown: dict[str, int], keyring_table: str) -> str:
    """Explain values whose key ids are missing from the keyring table, and
    what to do about them."""
    total = sum(unknown.values())
    columns = ", ".join(f"{label}: {count}" for label, count in sorted(unknown.items()))
    return (
        f"{total} value(s) name key ids that are not in keyring table {keyring_table} "
        f"({columns}), so nothing can decrypt them. The keyring table and the data come "
        "from different points in time, as after restoring one of them from a backup: "
        "restore the keyring table that matches the data, or the data backup that matches "
        "this keyring table, before you rotate, retire or shred keys or re-encrypt "
        "(see 'Restoring from backups' in the key rotation guide)"
    )


def tenant_mismatch_message(mismatched: dict[str, int]) -> str:
    """Explain values sealed under another tenant's key than their row's
    tenant column names, and how to repair them."""
    total = sum(mismatched.values())
    columns = ", ".join(f"{label}: {count}" for label, count in sorted(mismatched.items()))
    return (
        f"{total} value(s) are sealed under another tenant's key than their row's tenant "
        f"column names ({columns}), so the key's tenant can read them and the row's tenant "
        "cannot. Check that those tenant columns are right, then run 'sqlalchemy-encrypted "
        "reencrypt --move-to-row-tenant' to seal each value under its row's tenant"
    )


def _selected_columns(result: Census) -> Census:
    """Return the census without the columns that contain no value of the selected tenants."""
    return Census([column for column in result.columns if column.total or column.tenant_mismatches])


@click.command()
@click.option("--tenant", "tenants", multiple=True, help="Only this tenant; repeatable.")
@click.option("--table", "tables", multiple=True, help="Only this table; repeatable.")
@click.option("--column", "columns", multiple=True, help="Only this table.column; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--fail-on-stale",
    is_flag=True,
    help="Exit with status 6 when values remain under an old key version, and with "
    "status 8 when values name key ids that are not in the keyring table.",
)
@click.pass_context
def status(
    ctx: click.Context,
    tenants: tuple[str, ...],
    tables: tuple[str, ...],
    columns: tuple[str, ...],
    as_json: bool,
    fail_on_stale: bool,
) -> None:
    """Show the census: values per column, tenant and key version.

    Reads stored headers only: nothing is decrypted, no KMS is contacted,
    and a missing or unusable --kms is ignored. With --tenant, only the
    columns holding values of the selected tenants are shown, and a tenant
    that has no keys and no rows is an error. A checkpoint slot whose
    process is gone shows as interrupted. Exits with status 9, also without
    --fail-on-stale, when values are sealed under another tenant's key than
    their row's tenant column names.
    """
    settings = settings_of(ctx)
    engine = settings.engine()
    source = settings.key_metadata()
    result = census(
        engine,
        settings.tables(),
        tables=tables or None,
        columns=columns or None,
        tenants=tenants or None,
        keys=source,
    )
    if tenants:
        tenants = tuple(dict.fromkeys(tenants))
        check_tenants_known(source, settings.keyring_table, tenants, lambda: result)
        result = _selected_columns(result)
    jobs = job_slots(settings)
    if as_json:
        data = result.to_dict()
        data["tenants"] = list(tenants) or None
        data["totals"] = _totals(result)
        data["stale"] = result.stale()
        data["unknown_keys"] = result.unknown_keys
        data["tenant_mismatches"] = result.mismatched()
        data["jobs"] = [slot.to_dict() for slot in jobs]
        print_json(data)
    else:
        _print_census(result, source.table.fullname)
        if jobs:
            click.echo("")
            print_job_slots(jobs)
    if fail_on_stale and result.unknown_keys:
        ctx.exit(int(ExitCode.UNKNOWN_KEYS))
    if result.mismatched():
        ctx.exit(int(ExitCode.TENANT_MISMATCH))
    if fail_on_stale and result.stale():
        ctx.exit(int(ExitCode.INCOMPLETE))
