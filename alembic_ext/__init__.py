"""Alembic operations for encrypted columns (encrypt, decrypt, re-encrypt, keyring table)."""

from __future__ import annotations

__all__: list[str] = []
