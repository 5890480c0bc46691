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
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import StatementError

__all__: list[str] = []


@event.listens_for(Engine, "handle_error")
def _hide_unprocessed_parameters(context: ExceptionContext) -> None:
    error = context.sqlalchemy_exception
    # Without an execution context the statement never reached the driver,
    # so its parameters were not processed (encrypted) yet.
    if isinstance(error, StatementError) and context.execution_context is None:
        error.hide_parameters = True
