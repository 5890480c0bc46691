"""The ``reencrypt`` command: the re-encryption job."""

from __future__ import annotations

import sys

import click

from ._cli_context import ExitCode, print_json, render_table, settings_of
from ._cli_status import tenant_mismatch_message, unknown_keys_message
from ._cli_tenants import check_tenants_known
from .keyring import Keyring, KeyState
from .rotation import ReencryptionJob, ReencryptionProgress, ReencryptionResult

__all__ = ["reencrypt"]


# -- reencrypt ----------------------------------------------------------------


def _shredded_tenants(keyring: Keyring, tenants: tuple[str, ...]) -> tuple[str, ...]:
    """Return the tenants whose keys were destroyed by 'keys shred'."""
    return tuple(
        tenant
        for tenant in tenants
        if any(info.state is KeyState.DESTROYED for info in keyring.list_keys(tenant))
    )


def _print_shredded_note(shredded: tuple[str, ...]) -> None:
    for tenant in shredded:
        click.echo(
            f"tenant {tenant!r} was crypto-shredded: its keys are destroyed and its values "
            "can no longer be decrypted, so there is nothing to re-encrypt"
        )


def _print_plan(result: ReencryptionResult, unknown: dict[str, int], reencode: bool) -> None:
    rows = [
        (entry.label, entry.tenant_id, entry.key_version, entry.active_version, entry.count)
        for column in result.before.columns
        for entry in column.matching(include_current=reencode)
        if entry.label in result.planned
    ]
    if rows:
        headers = ("COLUMN", "TENANT", "FROM VERSION", "TO VERSION", "VALUES")
        click.echo(render_table(headers, rows))
        total = sum(result.planned.values())
        if reencode:
            click.echo(
                f"dry run: {total} value(s) would be decoded and encoded again; those already "
                "under the active version with the current encoding would not be written"
            )
        else:
            click.echo(f"dry run: {total} value(s) would be re-encrypted")
    elif not unknown and not result.moves_planned:
        click.echo("nothing to re-encrypt: no value is under an old key version")
    if result.moves_planned:
        _print_planned_moves(result)


def _print_planned_moves(result: ReencryptionResult) -> None:
    rows = [
        (column.label, key_tenant, "?" if row_tenant is None else row_tenant, count)
        for column in result.before.columns
        for (key_tenant, row_tenant), count in sorted(
            column.mismatches.items(), key=lambda item: (item[0][0], item[0][1] or "")
        )
    ]
    headers = ("COLUMN", "KEY TENANT", "ROW TENANT", "VALUES")
    click.echo(render_table(headers, rows))
    click.echo(
        f"dry run: {sum(result.moves_planned.values())} value(s) would move to the tenant "
        "in their row's tenant column"
    )


def _print_result(result: ReencryptionResult, unknown: dict[str, int]) -> None:
    click.echo(
        f"re-encrypted {result.values_reencrypted} value(s) in {result.elapsed:.1f} s "
        f"({result.passes} pass(es)); {result.rows_skipped} row(s) were changed by the "
        "application meanwhile and kept"
    )
    if result.moves_planned:
        click.echo(
            f"moved {result.values_moved} value(s) to the tenant in their row's tenant column"
        )
    for failure in result.failures[:20]:
        click.echo(
            f"failed: {failure.table}.{failure.column} primary key "
            f"{', '.join(map(str, failure.primary_key))}: {failure.error_class}: "
            f"{failure.message}"
        )
    if result.failures_total > 20:
        click.echo(f"... and {result.failures_total - 20} more failure(s)")
    if result.remaining:
        for label, count in sorted(result.remaining.items()):
            click.echo(f"still under an old key version: {label}: {count}")
    elif result.ok and not unknown:
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
@click.option(
    "--move-to-row-tenant",
    is_flag=True,
    help="Also seal values found under another tenant's key than their row's tenant "
    "column names under the row's tenant. The tenant column then decides who can read "
    "them: check it first with --dry-run.",
)
@click.option(
    "--reencode",
    is_flag=True,
    help="Also decode every value under the active key version and encode it again with "
    "the column's current codec rules, so values stored before a rule existed match "
    "lookups. Runs one worker.",
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
    move_to_row_tenant: bool,
    reencode: bool,
    as_json: bool,
) -> None:
    """Move values under old key versions to their tenant's active version.

    Resumes from its checkpoint after an interruption. Succeeds only when a
    census after the run finds no value left under an old version and no
    value naming a key id that is not in the keyring table (status 8). A
    --tenant that has no keys and no rows is an error, and nothing is
    re-encrypted. A crypto-shredded --tenant is reported and skipped, with
    status 0: its values cannot be decrypted, so nothing is left to do.

    Values sealed under another tenant's key than their row's tenant column
    names are left as they are, with status 9, unless --move-to-row-tenant
    is given. With --tenant, such a value moves when the tenant of its key
    or of its row is selected.

    With --reencode, every selected value is decoded and encoded again by
    the column's current codec rules before it is sealed, also under the
    active version. A value that no longer fits the column is reported as
    a failed row, with status 6.
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
        move_to_row_tenant=move_to_row_tenant,
        reencode=reencode,
    )
    shredded: tuple[str, ...] = ()
    if tenants:
        check_tenants_known(
            keyring, keyring.table.fullname, tenants, job.plan, "nothing was re-encrypted"
        )
        shredded = _shredded_tenants(keyring, tenants)
        if len(shredded) == len(tenants) and not as_json:
            _print_shredded_note(shredded)
            return
    bar = None
    if not dry_run and not as_json and _stderr_is_terminal():
        plan = job.plan()
        planned = sum(plan.stale(job.tenants, job.versions, include_current=reencode).values())
        if move_to_row_tenant:
            planned += sum(plan.mismatched().values())
        bar = _ProgressBar(planned)
        job.progress = bar
    try:
        result = job.run()
    finally:
        if bar is not None:
            bar.close()
    census_after = result.after if result.after is not None else result.before
    unknown = census_after.unknown_keys
    if as_json:
        data = result.to_dict()
        data["unknown_keys"] = unknown
        data["shredded_tenants"] = list(shredded)
        print_json(data)
    else:
        if dry_run:
            _print_plan(result, unknown, reencode)
        else:
            _print_result(result, unknown)
        _print_pending_note(keyring, tenants)
        _print_shredded_note(shredded)
        if unknown:
            click.echo(unknown_keys_message(unknown, keyring.table.fullname))
        if result.tenant_mismatches and not move_to_row_tenant:
            click.echo(tenant_mismatch_message(result.tenant_mismatches))
    if unknown:
        ctx.exit(int(ExitCode.UNKNOWN_KEYS))
    if not result.ok:
        ctx.exit(int(ExitCode.INCOMPLETE))
    if result.tenant_mismatches and not (dry_run and move_to_row_tenant):
        ctx.exit(int(ExitCode.TENANT_MISMATCH))
