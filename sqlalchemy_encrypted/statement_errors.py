"""Keep plaintext out of the text of SQLAlchemy's ``StatementError``.

SQLAlchemy writes a statement's parameters into the message of the
``StatementError`` it raises. Errors of this package are never wrapped that
way (they mix in ``DontWrapMixin``), and parameters of a statement that
reached the database were already encrypted. That leaves errors raised
while SQLAlchemy prepares a statement for some other reason, such as a
missing bound value or another column type rejecting its value: their
parameters are the raw Python values, plaintext included.

A ``handle_error`` listener on every engine marks such errors with
``hide_parameters``, so their message omits the parameters. The
``params`` attribute still holds them for code that inspects the error. Set
``create_engine(..., hide_parameters=True)`` to hide the parameters of every
error, including the plaintext columns of failed statements.

A second listener keeps the ``__cause__`` chain of this package's errors
finite; see :func:`_copy_self_caused_error`. :func:`database_message`
returns the part of a database error that is safe to show or store.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import StatementError

from .errors import EncryptionError

__all__ = ["database_message"]


@event.listens_for(Engine, "handle_error")
def _hide_unprocessed_parameters(context: ExceptionContext) -> None:
    error = context.sqlalchemy_exception
    # Without an execution context the statement never reached the driver,
    # so its parameters were not processed (encrypted) yet.
    if isinstance(error, StatementError) and context.execution_context is None:
        error.hide_parameters = True


@event.listens_for(Engine, "handle_error")
def _copy_self_caused_error(context: ExceptionContext) -> BaseException | None:
    """Return a copy of this library's error when SQLAlchemy would raise it
    as its own cause.

    SQLAlchemy does not wrap an error with ``DontWrapMixin`` that a column
    type raises while it binds parameters, but it raises the error with
    ``raise error from error`` (seen with SQLAlchemy 2.1.9), so that
    ``error.__cause__ is error`` and code that follows ``__cause__`` never
    ends. The hook runs before that ``raise``, so it cannot change the
    error's ``__cause__``. SQLAlchemy raises a returned exception instead,
    with the original as its ``__cause__``, and that chain ends.
    """
    original = context.original_exception
    # Typed as a StatementError, but SQLAlchemy puts the DontWrapMixin error
    # itself here in place of a wrapper.
    wrapped: object = context.sqlalchemy_exception
    if (
        isinstance(original, EncryptionError)
        and wrapped is original
        and getattr(context, "chained_exception", None) is None
    ):
        return _copy_error(original)
    return None


def _copy_error(error: EncryptionError) -> EncryptionError:
    """Return an exception of the same type, message and attributes.

    ``__new__`` sets ``args`` without calling ``__init__``, whose
    signature differs between the error types.
    """
    copy = type(error).__new__(type(error), *error.args)
    copy.__dict__.update(error.__dict__)
    return copy


def database_message(error: sa.exc.DBAPIError) -> str:
    """Return the database's own error message, without details that may quote values.

    Also hides the statement's bound parameters in the text of ``error``,
    because a conversion binds the plaintext values it writes. PostgreSQL's
    DETAIL line can quote a row ("Key (email)=(...) already exists"), so
    only the primary message and the SQLSTATE are returned. For the same
    reason, callers raise their own error without chaining ``error``.
    """
    error.hide_parameters = True
    sqlstate = getattr(error.orig, "sqlstate", None)
    code = f" (SQLSTATE {sqlstate})" if isinstance(sqlstate, str) and sqlstate else ""
    diagnostics = getattr(error.orig, "diag", None)
    primary = getattr(diagnostics, "message_primary", None)
    if isinstance(primary, str) and primary:
        return primary + code
    lines = str(error.orig).strip().splitlines()
    return (lines[0] if lines else type(error.orig).__name__) + code
