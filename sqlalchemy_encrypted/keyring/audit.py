"""Audit records of key lifecycle events and KMS failures.

Records go to the ``sqlalchemy_encrypted.audit`` logger. They carry ids
only (tenant, key id, purpose, version, KEK id, error class), never key
bytes, wrapped keys or error text from a KMS. The event name and fields
are also attached to the record as ``audit_event`` and ``audit_fields``
for structured log handlers.
"""

from __future__ import annotations

import logging
from typing import Any

from .store import KeyRow

__all__ = ["audit_event", "audit_logger", "row_fields"]

audit_logger = logging.getLogger("sqlalchemy_encrypted.audit")


def row_fields(row: KeyRow) -> dict[str, Any]:
    return {
        "tenant": row.tenant_id,
        "key_id": str(row.key_id),
        "purpose": row.purpose.value,
        "version": row.version,
        "kek": row.kek_id,
    }


def audit_event(event: str, level: int = logging.INFO, **fields: object) -> None:
    if not audit_logger.isEnabledFor(level):
        return
    text = " ".join(f"{name}={value}" for name, value in fields.items())
    audit_logger.log(
        level, "%s %s", event, text, extra={"audit_event": event, "audit_fields": fields}
    )
