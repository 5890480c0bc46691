"""The checkpoint slots of re-encryption jobs, as ``status`` shows them.

A slot's stored status stays ``running`` when its process dies (``kill -9``,
a lost machine), because nothing is left to update it. The job's own lock
distinguishes a live slot from an abandoned one: on PostgreSQL each worker holds a
session advisory lock on its slot, which the server releases when the
session ends. Other databases have no such lock and run one worker per job,
so there the slot's owner process is looked up when it runs on this host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from ._cli_context import CliContext, render_table
from .rotation import CheckpointStore
from .rotation.checkpoint import (
    Checkpoint,
    CheckpointStatus,
    SlotLease,
    held_slot_locks,
    owner_is_running,
)

__all__ = ["INTERRUPTED", "JobSlot", "job_slots", "print_job_slots"]

# Shown instead of "running" for a slot whose process is gone.
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class JobSlot:
    """A checkpoint with whether its owner still runs (None: cannot tell)."""

    checkpoint: Checkpoint
    live: bool | None

    @property
    def status(self) -> str:
        if self.checkpoint.status == CheckpointStatus.RUNNING and self.live is False:
            return INTERRUPTED
        return self.checkpoint.status

    def to_dict(self) -> dict[str, Any]:
        data = self.checkpoint.to_dict()
        data["status"] = self.status
        data["live"] = self.live
        return data


def job_slots(settings: CliContext) -> list[JobSlot]:
    """Read the checkpoints of every job, and whether each running slot is live."""
    store = CheckpointStore()
    with settings.engine().connect() as conn:
        if not store.exists(conn):
            return []
        # The locks are read before and after the checkpoints, and a slot is
        # live if either read finds its lock: a worker that starts or ends
        # between the reads then never shows as interrupted.
        before = held_slot_locks(conn)
        checkpoints = store.list(conn)
        after = held_slot_locks(conn)
    slots = []
    for checkpoint in checkpoints:
        live: bool | None = None
        if checkpoint.status == CheckpointStatus.RUNNING:
            if before is not None and after is not None:
                lock = SlotLease(checkpoint.job_name, checkpoint.table_name).lock_key(
                    checkpoint.slot
                )
                live = lock in before or lock in after
            else:
                live = owner_is_running(checkpoint.owner)
        slots.append(JobSlot(checkpoint, live))
    return slots


def print_job_slots(slots: Sequence[JobSlot]) -> None:
    rows = [
        (
            slot.checkpoint.job_name,
            slot.checkpoint.table_name,
            slot.checkpoint.slot,
            slot.status,
            slot.checkpoint.values_reencrypted,
            slot.checkpoint.rows_failed,
            slot.checkpoint.owner,
            slot.checkpoint.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for slot in slots
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
    for slot in slots:
        # A failed slot's error, or the note that an earlier run failed. Only
        # the first line, because a database error continues with its SQL.
        lines = (slot.checkpoint.error or "").strip().splitlines()
        if lines:
            click.echo(
                f"job {slot.checkpoint.job_name!r}, table {slot.checkpoint.table_name}, "
                f"slot {slot.checkpoint.slot}: {lines[0]}"
            )
    interrupted = sorted({slot.checkpoint.job_name for slot in slots if slot.status == INTERRUPTED})
    for job in interrupted:
        click.echo(
            f"job {job!r}: interrupted slots have no running process (killed, or its "
            "database connection was lost); run 'sqlalchemy-encrypted reencrypt --job-name "
            f"{job}' with the same options to resume from the checkpoint"
        )
