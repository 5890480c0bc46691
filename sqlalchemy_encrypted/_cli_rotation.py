"""The ``status`` and ``reencrypt`` commands: the census and the re-encryption job."""

from __future__ import annotations

import sys
from typing import Any

import click

from ._cli_context import (
    CliContext,
    ExitCode,
    print_json,
    render_table,
    settings_of,
)
from ._cli_tenants import check_tenants_known
from .keyring import Keyring, KeyState
from .rotation import (
    Census,
    CheckpointStore,
    ReencryptionJob,
    ReencryptionProgress,
    ReencryptionResult,
    census,
)
from .rotation.catalog import KeyringMetadata

__all__ = ["reencrypt", "status"]


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
    }


def _print_census(result: Census) -> None:
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
    else:
        click.echo("no value is under an old key version")


def _checkpoints(settings: CliContext) -> list[Any]:
    store = CheckpointStore()
    with settings.engine().connect() as conn:
        if not store.exists(conn):
            return []
        return store.list(conn)


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
    help="Exit with status 6 when values remain under an old key version.",
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

    Reads stored headers only; nothing is decrypted and, without --kms, no
    KMS is contacted. With --tenant, only the columns holding values of the
    selected tenants are shown, and a tenant that has no keys and no rows
    is an error.
    """
    settings = settings_of(ctx)
    engine = settings.engine()
    source: Any = (
        settings.keyring()
        if settings.kms_uri
        else KeyringMetadata(settings.keyring_engine(), settings.keyring_table)
    )
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
    jobs = _checkpoints(settings)
    if as_json:
        data = result.to_dict()
        data["tenants"] = list(tenants) or None
        data["totals"] = _totals(result)
        data["stale"] = result.stale()
        data["jobs"] = [checkpoint.to_dict() for checkpoint in jobs]
        print_json(data)
    else:
        _print_census(result)
        if jobs:
            click.echo("")
            rows = [
                (
                    c.job_name,
                    c.table_name,
                    c.slot,
                    c.status,
                    c.values_reencrypted,
                    c.rows_failed,
                    c.owner,
                    c.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
                )
                for c in jobs
            ]
            headers = (
                "JOB",
                "TABLE",
                "SLOT",
                "STATUS",
                "RE-ENCRYPTED",
                "FAILED",
                "OWNER",
                "UPDATED (UTC)",
            )
            click.echo(render_table(headers, rows))
    if fail_on_stale and result.stale():
        ctx.exit(int(ExitCode.INCOMPLETE))


# -- reencrypt ----------------------------------------------------------------


def _print_plan(result: ReencryptionResult) -> None:
    rows = [
        (entry.label, entry.tenant_id, entry.key_version, entry.active_version, entry.count)
        for column in result.before.columns
        for entry in column.entries
        if entry.label in result.planned and entry.stale
    ]
    if not rows:
        click.echo("nothing to re-encrypt: no value is under an old key version")
        return
    headers = ("COLUMN", "TENANT", "FROM VERSION", "TO VERSION", "VALUES")
    click.echo(render_table(headers, rows))
    click.echo(f"dry run: {sum(result.planned.values())} value(s) would be re-encrypted")


def _print_result(result: ReencryptionResult) -> None:
    click.echo(
        f"re-encrypted {result.values_reencrypted} value(s) in {result.elapsed:.1f} s "
        f"({result.passes} pass(es)); {result.rows_skipped} row(s) were changed by the "
        "application meanwhile and kept"
    )
    for failure in result.failures[:20]:
        click.echo(
            f"failed: {failure.table}.{failure.column} primary key "
            f"{', '.join(map(str, failure.primary_key))}: {failure.error_class}: "
            f"{failure.message}"
        )
    if result.failures_total > 20:
        click.echo(f"... and {result.failures_total - 20} more failed value(s)")
    if result.remaining:
        for label, count in sorted(result.remaining.items()):
            click.echo(f"still under an old key version: {label}: {count}")
    elif result.ok:
        click.echo("census: no value is left under an old key version")


def _print_pending_note(keyring: Keyring, tenants: tuple[str, ...]) -> None:
    """Print a note naming the tenants with pending versions, because their
    values count as stale, and move, only once those versions are active."""
    pending = sorted(
        {
            info.tenant_id
            for info in keyring.list_keys()
            if info.state is KeyState.PENDING and (not tenants or info.tenant_id in tenants)
        }
    )
    if not pending:
        return
    listed = ", ".join(repr(tenant) for tenant in pending[:5])
    if len(pending) > 5:
        listed += f" and {len(pending) - 5} more"
    click.echo(
        f"note: tenant(s) {listed} have pending key versions; their values move only once "
        "those versions are active ('sqlalchemy-encrypted keys promote'), so run this "
        "command again after that"
    )


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class _ProgressBar:
    """A click progress bar fed by the job's progress callback."""

    def __init__(self, total: int) -> None:
        self._bar = click.progressbar(
            length=max(total, 1), label="re-encrypting", file=sys.stderr, show_pos=True
        )
        self._bar.__enter__()
        self._done = 0

    def __call__(self, progress: ReencryptionProgress) -> None:
        step = progress.values_reencrypted - self._done
        if step > 0:
            self._bar.update(step)
            self._done = progress.values_reencrypted

    def close(self) -> None:
        self._bar.__exit__(None, None, None)


@click.command()
@click.option("--tenant", "tenants", multiple=True, help="Only this tenant; repeatable.")
@click.option("--table", "tables", multiple=True, help="Only this table; repeatable.")
@click.option("--column", "columns", multiple=True, help="Only this table.column; repeatable.")
@click.option(
    "--version",
    "versions",
    multiple=True,
    type=click.IntRange(min=1),
    help="Only values under this key version; repeatable.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Rows per transaction.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Parallel workers (PostgreSQL only).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Maximum rows per second over all workers.",
)
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option(
    "--job-name",
    default="default",
    show_default=True,
    help="Checkpoint name; a run with the same name resumes it.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Passes over a table while values remain.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def reencrypt(
    ctx: click.Context,
    tenants: tuple[str, ...],
    tables: tuple[str, ...],
    columns: tuple[str, ...],
    versions: tuple[int, ...],
    batch_size: int,
    workers: int,
    rate: float | None,
    dry_run: bool,
    job_name: str,
    max_passes: int,
    as_json: bool,
) -> None:
    """Move values under old key versions to their tenant's active version.

    Resumes from its checkpoint after an interruption. Succeeds only when a
    census after the run finds no value left under an old version. A
    --tenant that has no keys and no rows is an error, and nothing is
    re-encrypted.
    """
    settings = settings_of(ctx)
    engine = settings.engine()
    keyring = settings.keyring()
    tenants = tuple(dict.fromkeys(tenants))
    job = ReencryptionJob(
        engine,
        settings.tables(),
        tables=tables or None,
        columns=columns or None,
        tenants=tenants or None,
        versions=versions or None,
        batch_size=batch_size,
        workers=workers,
        rate=rate,
        dry_run=dry_run,
        job_name=job_name,
        max_passes=max_passes,
    )
    if tenants:
        check_tenants_known(
            keyring, keyring.table.fullname, tenants, job.plan, "nothing was re-encrypted"
        )
    bar = None
    if not dry_run and not as_json and _stderr_is_terminal():
        planned = sum(job.plan().stale(job.tenants, job.versions).values())
        bar = _ProgressBar(planned)
        job.progress = bar
    try:
        result = job.run()
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        print_json(result.to_dict())
    elif dry_run:
        _print_plan(result)
    else:
        _print_result(result)
    if not as_json:
        _print_pending_note(keyring, tenants)
    if not result.ok:
        ctx.exit(int(ExitCode.INCOMPLETE))
