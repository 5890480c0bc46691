"""The ``sqlalchemy-encrypted`` command line (also ``python -m sqlalchemy_encrypted``).

Global options name the database (``--url``), the database of the keyring
table when it is another one (``--keyring-url``), the KMS (``--kms``) and
the application's models (``--models``); each also comes from an
environment variable. Errors print as one line unless ``--verbose`` is given, and the
exit status names the kind of failure (see ``sqlalchemy-encrypted --help``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from ._cli_context import (
    EXIT_CODES_HELP,
    CliContext,
    ErrorHandlingGroup,
    ExitCode,
    settings_of,
)
from ._cli_decrypt import decrypt
from ._cli_inspect import inspect
from ._cli_keys import keys
from ._cli_rotation import reencrypt
from ._cli_status import status
from .keys import DEFAULT_KEY_USAGE_LIMIT, MAX_KEY_USAGE_LIMIT
from .rotation import CheckpointStore

__all__ = ["cli", "main"]


def _configure_logging(ctx: click.Context, verbose: bool, audit_log: str | None) -> None:
    """Send the library's log records to stderr while the command runs (INFO
    and above with --verbose, else only CRITICAL ones), and audit records to
    the --audit-log file."""
    logger = logging.getLogger("sqlalchemy_encrypted")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous_level = logger.level
    # Without --verbose the command prints each error itself, as one line, so
    # a library record of the same error would only repeat it.
    handler.setLevel(logging.INFO if verbose else logging.CRITICAL)
    logger.addHandler(handler)
    if verbose:
        logger.setLevel(logging.INFO)

    audit_logger = logging.getLogger("sqlalchemy_encrypted.audit")
    previous_audit_level = audit_logger.level
    audit_handler: logging.Handler | None = None
    if audit_log:
        try:
            audit_handler = logging.FileHandler(audit_log, mode="a", encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(
                f"cannot open {audit_log}: {exc.strerror}", param_hint="'--audit-log'"
            ) from None
        audit_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        audit_logger.addHandler(audit_handler)
        audit_logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        if audit_handler is not None:
            audit_logger.removeHandler(audit_handler)
            audit_handler.close()
            audit_logger.setLevel(previous_audit_level)

    ctx.call_on_close(restore)


@click.group(cls=ErrorHandlingGroup, epilog=EXIT_CODES_HELP)
@click.option(
    "--url",
    envvar="SQLALCHEMY_ENCRYPTED_URL",
    show_envvar=True,
    help="SQLAlchemy URL of the application's database, which also contains the re-encryption "
    "checkpoint table and, unless --keyring-url is given, the keyring table.",
)
@click.option(
    "--keyring-url",
    envvar="SQLALCHEMY_ENCRYPTED_KEYRING_URL",
    show_envvar=True,
    help="SQLAlchemy URL of the database holding the keyring table, when it is not the "
    "--url database (default: --url).",
)
@click.option(
    "--kms",
    "kms_uri",
    envvar="SQLALCHEMY_ENCRYPTED_KMS",
    show_envvar=True,
    help="KMS URI of the KEK: local:///path/master.key, local-env://VARIABLE (?kek=NAME "
    "for either) or aws-kms://arn:aws:kms:... (?region=, connect_timeout=, read_timeout=, "
    "max_attempts=).",
)
@click.option(
    "--previous-kms",
    "previous_kms_uris",
    multiple=True,
    envvar="SQLALCHEMY_ENCRYPTED_PREVIOUS_KMS",
    show_envvar=True,
    help="KMS URI of a provider that only unwraps DEKs its KEK wrapped earlier, as the "
    "application's Keyring(previous_kms=...); repeatable, space-separated in the variable.",
)
@click.option(
    "--models",
    multiple=True,
    envvar="SQLALCHEMY_ENCRYPTED_MODELS",
    show_envvar=True,
    help="Import path of the application's declarative base, MetaData or Table, such as "
    "myapp.models:Base (without :attribute, the module's Base or metadata); repeatable, "
    "space-separated in the variable.",
)
@click.option(
    "--keyring-table",
    default="encryption_keys",
    show_default=True,
    envvar="SQLALCHEMY_ENCRYPTED_KEYRING_TABLE",
    show_envvar=True,
    help="Name of the keyring table.",
)
@click.option(
    "--active-key-ttl",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    envvar="SQLALCHEMY_ENCRYPTED_ACTIVE_KEY_TTL",
    show_envvar=True,
    help=(
        "Seconds a rotated key stays pending, and the base of the wait of 'keys retire' "
        "(see --min-inactive there); use the application's Keyring(active_key_ttl=...)."
    ),
)
@click.option(
    "--key-usage-limit",
    default=str(DEFAULT_KEY_USAGE_LIMIT),
    show_default=True,
    envvar="SQLALCHEMY_ENCRYPTED_KEY_USAGE_LIMIT",
    show_envvar=True,
    metavar="N|none",
    help="Values a randomized DEK may seal, as the application's "
    "Keyring(key_usage_limit=...); 'none' turns counting off.",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False),
    envvar="SQLALCHEMY_ENCRYPTED_AUDIT_LOG",
    show_envvar=True,
    help="Append audit records (key lifecycle events, KMS failures, decrypted values; ids "
    "only) to this file.",
)
@click.option("--verbose", "-v", is_flag=True, help="Log progress and print tracebacks.")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str | None,
    keyring_url: str | None,
    kms_uri: str | None,
    previous_kms_uris: tuple[str, ...],
    models: tuple[str, ...],
    keyring_table: str,
    active_key_ttl: float,
    key_usage_limit: str,
    audit_log: str | None,
    verbose: bool,
) -> None:
    """Manage the keys and encrypted columns of sqlalchemy-encrypted."""
    settings = CliContext(
        url=url,
        keyring_url=keyring_url or None,
        kms_uri=kms_uri,
        previous_kms_uris=tuple(uri for value in previous_kms_uris for uri in value.split()),
        models=tuple(spec for value in models for spec in value.split()),
        keyring_table=keyring_table,
        active_key_ttl=active_key_ttl,
        key_usage_limit=_usage_limit(key_usage_limit),
        verbose=verbose,
    )
    ctx.obj = settings
    ctx.call_on_close(settings.close)
    _configure_logging(ctx, verbose, audit_log)


def _usage_limit(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_KEY_USAGE_LIMIT:
        raise click.BadParameter(
            f"expected a whole number from 1 to {MAX_KEY_USAGE_LIMIT}, or 'none'; got {text!r}",
            param_hint="--key-usage-limit",
        )
    return limit


# -- init ---------------------------------------------------------------------


@cli.command()
@click.option(
    "--create-key/--no-create-key",
    default=True,
    show_default=True,
    help="Create the local:// master key file if it does not exist.",
)
@click.pass_context
def init(ctx: click.Context, create_key: bool) -> None:
    """Create the keyring table, the re-encryption checkpoint table and, for a
    local KMS, the master key file.

    The keyring table goes to the --keyring-url database when one is given,
    the checkpoint table always to the --url database.
    """
    settings = settings_of(ctx)
    if create_key:
        created = settings.create_local_key()
        if created:
            click.echo(
                f"created master key file {created} (mode 0600): back it up and keep it "
                "secret; without it no value can be decrypted"
            )
    keyring = settings.keyring()
    keyring.create_table()
    CheckpointStore().create(settings.engine())
    if settings.separate_keyring:
        click.echo(
            f"keyring table {keyring.table.fullname} is ready in {settings.keyring_database_name()}"
        )
        click.echo(f"the re-encryption checkpoint table is ready in {settings.database_name()}")
        return
    click.echo(
        f"keyring table {keyring.table.fullname} and the re-encryption checkpoint table are "
        f"ready in {settings.database_name()}"
    )


cli.add_command(keys)
cli.add_command(status)
cli.add_command(reencrypt)
cli.add_command(inspect)
cli.add_command(decrypt)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (the console script's entry point)."""
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="sqlalchemy-encrypted",
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        return int(ExitCode.ABORTED)
    # Without standalone mode, click returns the status of ctx.exit() calls.
    return result if isinstance(result, int) else int(ExitCode.OK)
