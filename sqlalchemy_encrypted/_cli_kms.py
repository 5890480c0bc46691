"""A stand-in KMS for the commands that never unwrap a DEK.

``keys list``, ``keys promote``, ``keys retire``, ``keys reinstate``,
``keys shred`` and ``status`` read or change key metadata only. They must keep working when
the KMS configuration is missing or unusable, for example while a key file
is lost during a KEK incident. They get a keyring whose provider is this
stand-in: every KMS operation raises the configuration error that made the
real provider unusable.
"""

from __future__ import annotations

from typing import NoReturn

from .errors import ConfigurationError
from .kms.base import GeneratedDataKey, KekInfo, KmsProvider, WrapContext

__all__ = ["UnusableKms"]


class UnusableKms(KmsProvider):
    """A KMS provider that raises :class:`ConfigurationError` on every use."""

    provider_name = "unusable"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<UnusableKms reason={self.reason!r}>"

    def _fail(self) -> NoReturn:
        raise ConfigurationError(f"this operation needs a usable KMS: {self.reason}")

    @property
    def kek_id(self) -> str:
        self._fail()

    def can_unwrap(self, provider_name: str, kek_id: str) -> bool:
        return False

    def generate_data_key(self, size: int, context: WrapContext) -> GeneratedDataKey:
        self._fail()

    def wrap(self, dek: bytes, context: WrapContext) -> bytes:
        self._fail()

    def unwrap(self, wrapped: bytes, context: WrapContext, kek_id: str) -> bytes:
        self._fail()

    def describe_kek(self, kek_id: str | None = None) -> KekInfo:
        self._fail()
