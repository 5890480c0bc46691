"""The counts an encrypt or decrypt column operation returns and logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ConversionReport", "Direction"]

Direction = Literal["encrypt", "decrypt"]

_WORDS: dict[Direction, tuple[str, str]] = {
    "encrypt": ("encrypted", "already encrypted"),
    "decrypt": ("decrypted", "already plaintext"),
}


@dataclass
class ConversionReport:
    """Result of converting one column, counted over every row of the table.

    ``converted`` rows held the source form and now hold the target form,
    ``already_converted`` rows held the target form before the operation
    ran (a mixed table), and ``null`` rows are NULL and stay NULL.
    ``resumed`` of the converted rows had been converted by an earlier,
    interrupted run, and ``rewritten`` rows were converted again in the final
    check because the application changed them during the operation.

    During ``alembic upgrade`` or ``downgrade`` the column is swapped at the
    end of the migration. The operation then returns the counts of its
    batches with ``column_swapped`` False, and the swap updates the same
    object with the final counts.
    """

    table: str
    column: str
    direction: Direction
    converted: int
    already_converted: int
    null: int
    resumed: int = 0
    rewritten: int = 0
    column_swapped: bool = True

    @property
    def total(self) -> int:
        return self.converted + self.already_converted + self.null

    def __str__(self) -> str:
        done, already = _WORDS[self.direction]
        text = (
            f"{self.table}.{self.column}: {done} {self.converted}, "
            f"{already} {self.already_converted}, NULL {self.null}"
        )
        if self.resumed:
            text += f" ({self.resumed} {done} by an earlier interrupted run)"
        if self.rewritten:
            text += f", {self.rewritten} changed during the operation and {done} again"
        return text
