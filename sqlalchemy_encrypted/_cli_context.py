"""Settings, resources, errors and output formatting of the command line."""

from __future__ import annotations

import enum
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import click
import sqlalchemy as sa

from ._cli_kms import UnusableKms
from .errors import (
    ConfigurationError,
    EncryptionError,
    KeyInUseError,
    KeyRecentlyActiveError,
    KmsError,
    ReencryptionError,
    UnknownKeysError,
)
from .keyring import Keyring
from .keys import DEFAULT_KEY_USAGE_LIMIT
from .kms import KmsProvider, LocalKms, kms_from_uri

__all__ = [
    "CliContext",
    "ErrorHandlingGroup",
    "ExitCode",
    "exit_code_for",
    "load_tables",
    "one_line",
    "print_json",
    "render_table",
    "settings_of",
]

logger = logging.getLogger("sqlalchemy_encrypted.cli")


class ExitCode(enum.IntEnum):
    """Exit statuses of ``sqlalchemy-encrypted``; documented in ``--help``."""

    OK = 0
    ERROR = 1  # any other failure: database unreachable, key not found, ...
    USAGE = 2  # invalid command line (click's own status)
    CONFIGURATION = 3  # missing or invalid --url, --keyring-url, --kms or --models
    KMS = 4  # the KMS failed or refused
    KEY_IN_USE = 5  # keys retire: stored values still use the key version
    INCOMPLETE = 6  # reencrypt: rows failed or values remain under an old version
    ABORTED = 7  # a confirmation was not given
    UNKNOWN_KEYS = 8  # stored values name key ids that are not in the keyring table
    TENANT_MISMATCH = 9  # stored values are sealed under another tenant's key than their row's
    RECENTLY_ACTIVE = 10  # keys retire: the version stopped being active too recently
    BROKEN_PIPE = 141  # stdout was closed early (128 + SIGPIPE, as a shell reports it)


EXIT_CODES_HELP = """\b
Exit status:
  0  success
  1  error (database unreachable, key not found, ...)
  2  invalid command line
  3  configuration error (--url, --keyring-url, --kms, --models)
  4  KMS error
  5  key version still in use (keys retire)
  6  re-encryption incomplete: rows failed or stale values remain
  7  confirmation not given (keys shred)
  8  values name key ids missing from the keyring table (keys rotate,
     reencrypt, status --fail-on-stale): restore the matching keyring
     table or data
  9  values are sealed under another tenant's key than their row's tenant
     column names (status, reencrypt): see reencrypt --move-to-row-tenant
 10  key version stopped being active too recently (keys retire): run
     the command again after the wait it prints
141 stdout was closed before the output was written (for example by head)
"""


def exit_code_for(exc: BaseException) -> ExitCode:
    if isinstance(exc, ConfigurationError):
        return ExitCode.CONFIGURATION
    if isinstance(exc, KmsError):
        return ExitCode.KMS
    if isinstance(exc, KeyInUseError):
        return ExitCode.KEY_IN_USE
    if isinstance(exc, KeyRecentlyActiveError):
        return ExitCode.RECENTLY_ACTIVE
    if isinstance(exc, ReencryptionError):
        return ExitCode.INCOMPLETE
    if isinstance(exc, UnknownKeysError):
        return ExitCode.UNKNOWN_KEYS
    return ExitCode.ERROR


def one_line(exc: BaseException) -> str:
    """Return an error as one line, without SQL statements or parameters."""
    if isinstance(exc, EncryptionError):
        text = str(exc)
    elif isinstance(exc, sa.exc.DBAPIError):
        original = exc.orig if exc.orig is not None else exc
        text = f"database error: {type(original).__name__}: {original}"
    elif isinstance(exc, sa.exc.ArgumentError):
        text = f"invalid database URL or argument: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first


class ErrorHandlingGroup(click.Group):
    """A click group that turns errors into one line and a documented exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # The reader of stdout went away, as "| head" does: exit quietly,
            # with the status a shell reports for a process killed by SIGPIPE.
            _discard_stdout()
            ctx.exit(int(ExitCode.BROKEN_PIPE))
        except Exception as exc:
            settings = ctx.find_object(CliContext)
            if settings is not None and settings.verbose:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"error: {one_line(exc)}", err=True)
            ctx.exit(int(exit_code_for(exc)))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit
    does not fail again and print a traceback (the approach of the "Note on
    SIGPIPE" in the documentation of Python's signal module)."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file, as under click's CliRunner
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def settings_of(ctx: click.Context) -> CliContext:
    return ctx.ensure_object(CliContext)


# -- models -------------------------------------------------------------------


def _tables_of(obj: Any, spec: str) -> list[sa.Table]:
    if isinstance(obj, sa.MetaData):
        return list(obj.sorted_tables)
    if isinstance(obj, sa.Table):
        return [obj]
    metadata = getattr(obj, "metadata", None)
    if isinstance(metadata, sa.MetaData):
        return list(metadata.sorted_tables)
    raise ConfigurationError(
        f"--models {spec}: expected a declarative base, a MetaData or a Table, "
        f"got {type(obj).__name__}"
    )


def load_tables(specs: Sequence[str]) -> list[sa.Table]:
    """Import each ``module:attribute`` and return the tables it declares.

    ``attribute`` may be a declarative base, a MetaData or a Table. Without
    it, the module's ``Base`` or ``metadata`` is used. The current directory
    is importable, as with ``python -m``.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    tables: list[sa.Table] = []
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(
                f"--models {spec}: cannot import module {module_name!r} ({exc})"
            ) from None
        obj: Any = module
        if attribute:
            for part in attribute.split("."):
                if not hasattr(obj, part):
                    raise ConfigurationError(f"--models {spec}: {module_name} has no {attribute}")
                obj = getattr(obj, part)
        else:
            obj = getattr(module, "Base", None) or getattr(module, "metadata", None)
            if obj is None:
                raise ConfigurationError(
                    f"--models {spec}: module has no Base or metadata; name one as "
                    f"{module_name}:Base"
                )
        for table in _tables_of(obj, spec):
            if table not in tables:
                tables.append(table)
    return tables


# -- the context --------------------------------------------------------------


def local_key_path(uri: str) -> tuple[str, str | None] | None:
    """Return the key file path and KEK name of a ``local://`` URI, else None."""
    if not uri.startswith("local://"):
        return None
    body, _, query = uri[len("local://") :].partition("?")
    options = parse_qs(query)
    kek = options["kek"][-1] if "kek" in options else None
    return unquote(body), kek


@dataclass
class CliContext:
    """Settings of the global options, and the resources they open on first use."""

    url: str | None
    kms_uri: str | None
    models: tuple[str, ...]
    keyring_table: str
    active_key_ttl: float
    verbose: bool
    previous_kms_uris: tuple[str, ...] = ()
    keyring_url: str | None = None
    key_usage_limit: int | None = DEFAULT_KEY_USAGE_LIMIT
    _engine: sa.Engine | None = field(default=None, repr=False)
    _keyring_engine: sa.Engine | None = field(default=None, repr=False)
    _kms: KmsProvider | None = field(default=None, repr=False)
    _keyring: Keyring | None = field(default=None, repr=False)
    _tables: list[sa.Table] | None = field(default=None, repr=False)

    def engine(self) -> sa.Engine:
        """Return the engine of the application's data (``--url``)."""
        if self._engine is None:
            if not self.url:
                raise ConfigurationError(
                    "no database URL: pass --url or set SQLALCHEMY_ENCRYPTED_URL"
                )
            self._engine = _create_engine(self.url, "--url")
        return self._engine

    @property
    def separate_keyring(self) -> bool:
        """True when ``--keyring-url`` names another database than ``--url``."""
        return bool(self.keyring_url) and self.keyring_url != self.url

    def keyring_engine(self) -> sa.Engine:
        """Return the engine of the keyring table: ``--keyring-url``, else ``--url``."""
        if not self.separate_keyring:
            return self.engine()
        if self._keyring_engine is None:
            assert self.keyring_url
            self._keyring_engine = _create_engine(self.keyring_url, "--keyring-url")
        return self._keyring_engine

    def database_name(self) -> str:
        return _display_url(self.engine())

    def keyring_database_name(self) -> str:
        return _display_url(self.keyring_engine())

    def kms(self) -> KmsProvider:
        if self._kms is None:
            if not self.kms_uri:
                raise ConfigurationError(
                    "no KMS: pass --kms (local:///path/master.key, local-env://VARIABLE or "
                    "aws-kms://arn:...) or set SQLALCHEMY_ENCRYPTED_KMS"
                )
            self._kms = kms_from_uri(self.kms_uri)
        return self._kms

    def create_local_key(self) -> str | None:
        """Create the key file of a ``local://`` KMS if it is missing; return its path."""
        if not self.kms_uri:
            return None
        found = local_key_path(self.kms_uri)
        if found is None:
            return None
        path, kek = found
        if os.path.exists(path):
            return None
        self._kms = LocalKms.create(path, kek=kek or "default")
        return path

    def keyring(self) -> Keyring:
        """Return the keyring with the --kms and --previous-kms providers."""
        if self._keyring is None:
            self._keyring = self._new_keyring(
                self.kms(), [kms_from_uri(uri) for uri in self.previous_kms_uris]
            )
        return self._keyring

    def key_metadata(self) -> Keyring:
        """Return a keyring for the commands that never unwrap a DEK.

        When --kms or a --previous-kms is missing or unusable (invalid URI,
        missing key file), its provider is an :class:`UnusableKms`, which
        raises only if something tries to use the KMS.
        """
        if self._keyring is not None:
            return self._keyring
        try:
            return self.keyring()
        except (ConfigurationError, KmsError) as exc:
            logger.info("the KMS is not usable (%s); this command does not need it", exc)
            self._keyring = self._new_keyring(UnusableKms(one_line(exc)), [])
        return self._keyring

    def _new_keyring(self, kms: KmsProvider, previous: list[KmsProvider]) -> Keyring:
        return Keyring(
            self.keyring_engine(),
            kms,
            previous_kms=previous,
            table_name=self.keyring_table,
            active_key_ttl=self.active_key_ttl,
            key_usage_limit=self.key_usage_limit,
            set_default=True,
        )

    def tables(self) -> list[sa.Table]:
        if self._tables is None:
            if not self.models:
                raise ConfigurationError(
                    "no models: pass --models myapp.models:Base (or set "
                    "SQLALCHEMY_ENCRYPTED_MODELS) so the census knows the encrypted columns"
                )
            self._tables = load_tables(self.models)
        return self._tables

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self._keyring_engine is not None:
            self._keyring_engine.dispose()


def _create_engine(url: str, option: str) -> sa.Engine:
    try:
        return sa.create_engine(url)
    except sa.exc.ArgumentError as exc:  # also an unknown dialect or driver name
        raise ConfigurationError(f"invalid {option}: {exc}") from None
    except ImportError as exc:
        raise ConfigurationError(
            f"{option} names a database driver that is not installed: {exc}"
        ) from None


def _display_url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


# -- output -------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as aligned text columns under a header line."""
    cells = [[_cell_text(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _cell_text(value: Any) -> str:
    """Return ``value`` as table text, quoted when it has surrounding
    whitespace or unprintable characters, so tenant ids "acme" and "acme "
    stay apart."""
    if isinstance(value, str) and value and (value != value.strip() or not value.isprintable()):
        return repr(value)
    return str(value)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=False))
