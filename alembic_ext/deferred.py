"""Run the final steps of a migration's column conversions together, at its end.

A conversion commits its batches as it goes, and Alembic's
``autocommit_block()`` commits the migration's transaction before the
batches start. So if each conversion swapped its column at once, the next
conversion in the same migration would commit that swap before Alembic
writes the version row. A failure after that commit would leave one column
converted under the old revision.

During ``alembic upgrade`` or ``downgrade``, each conversion therefore only
fills its temporary column and queues its final step here. The queue runs
from an ``on_version_apply`` callback, which Alembic calls after it has
written the version row and before it commits the migration's
transaction: every queued column is checked first, then every column is
swapped. The swaps and the version row commit together, or a failure rolls
all of them back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from sqlalchemy_encrypted.errors import MigrationError

__all__ = ["FinalStep", "defer_final_step", "runs_in_migration"]


@dataclass
class FinalStep:
    """The queued final step of one conversion.

    ``check`` runs under the write lock and returns the ``swap`` to run
    once every column of the migration has been checked.
    ``shadow_committed`` is True when the temporary column was committed
    before the migration's transaction, False when it was added in that
    transaction, and None when that is not known or there is none.
    """

    label: str
    check: Callable[[Connection], Callable[[Connection], None]]
    shadow_committed: bool | None = None


@dataclass
class _Queue:
    steps: list[FinalStep] = field(default_factory=list)
    callbacks: tuple[Any, ...] = ()


_queues: weakref.WeakKeyDictionary[MigrationContext, _Queue] = weakref.WeakKeyDictionary()


def runs_in_migration(context: MigrationContext) -> bool:
    """Return True if ``context`` runs revision scripts through ``run_migrations()``.

    Alembic's commands pass the revision steps as the ``fn`` option. A
    context from ``MigrationContext.configure(connection)`` has none, and
    then nothing would run the queue.
    """
    return context.opts.get("fn") is not None


def defer_final_step(context: MigrationContext, step: FinalStep) -> None:
    """Queue ``step`` to run after the current migration writes its version row."""
    queue = _queues.get(context)
    if queue is None:
        queue = _Queue(callbacks=tuple(context.on_version_apply_callbacks))
        _queues[context] = queue

        def run_queue(*, ctx: MigrationContext, **_: Any) -> None:
            _run(ctx)

        # Alembic reads this attribute after the revision's upgrade() or
        # downgrade() returns, so the callback runs for this migration.
        # It runs first, so that the caller's callbacks see a finished one.
        context.on_version_apply_callbacks = (run_queue, *queue.callbacks)
    if any(queued.label == step.label for queued in queue.steps):
        raise MigrationError(
            f"{step.label} is converted twice in one migration: put the second "
            "conversion in a later revision"
        )
    queue.steps.append(step)


def _run(context: MigrationContext) -> None:
    queue = _queues.pop(context)
    context.on_version_apply_callbacks = queue.callbacks
    conn = context.connection
    if conn is None:
        raise MigrationError("the migration has no database connection for its column swaps")
    labels = ", ".join(step.label for step in queue.steps)
    try:
        swaps = [step.check(conn) for step in queue.steps]
        for swap in swaps:
            swap(conn)
    except Exception as exc:
        exc.add_note(_failure_note(labels, queue.steps))
        raise


def _failure_note(labels: str, steps: list[FinalStep]) -> str:
    """Return the note stating what a failed final step leaves of each column."""
    note = (
        f"The final steps of this migration's conversions ({labels}) run in one "
        "transaction with the Alembic version row, so none of these columns is "
        "swapped and the version is unchanged."
    )
    kept = [step.label for step in steps if step.shadow_committed is True]
    rolled_back = [step.label for step in steps if step.shadow_committed is False]
    if kept:
        note += f" The converted values of {', '.join(kept)} stay in temporary columns."
    if rolled_back:
        note += (
            f" The temporary columns of {', '.join(rolled_back)} were added in the "
            "migration's transaction, so rolling it back removes them with their "
            "converted values."
        )
    return note + " Fix the cause and run the migration again."
