"""Fixtures and helpers for the keyring and KMS tests."""

from __future__ import annotations

import base64
import collections
import logging

from sqlalchemy_encrypted.kms import GeneratedDataKey, KekInfo, KmsProvider, WrapContext

__all__ = [
    "CountingKms",
    "FakeClock",
    "assert_no_secret",
    "secret_forms",
]


class CountingKms(KmsProvider):
    """A provider wrapper that counts calls per operation and raises `fail_with` when set."""

    def __init__(self, inner: KmsProvider) -> None:
        self.inner = inner
        self.provider_name = inner.provider_name
        self.calls: collections.Counter[str] = collections.Counter()
        self.unwrapped: collections.Counter[str] = collections.Counter()
        self.fail_with: Exception | None = None

    def _call(self, operation: str) -> None:
        self.calls[operation] += 1
        if self.fail_with is not None:
            raise self.fail_with

    @property
    def kek_id(self) -> str:
        return self.inner.kek_id

    def can_unwrap(self, provider_name: str, kek_id: str) -> bool:
        return self.inner.can_unwrap(provider_name, kek_id)

    def generate_data_key(self, size: int, context: WrapContext) -> GeneratedDataKey:
        self._call("generate_data_key")
        return self.inner.generate_data_key(size, context)

    def wrap(self, dek: bytes, context: WrapContext) -> bytes:
        self._call("wrap")
        return self.inner.wrap(dek, context)

    def unwrap(self, wrapped: bytes, context: WrapContext, kek_id: str) -> bytes:
        self._call("unwrap")
        self.unwrapped[context.tenant_id] += 1
        return self.inner.unwrap(wrapped, context, kek_id)

    def reencrypt(self, wrapped: bytes, context: WrapContext, source_kek_id: str) -> bytes:
        self._call("reencrypt")
        return self.inner.reencrypt(wrapped, context, source_kek_id)

    def describe_kek(self, kek_id: str | None = None) -> KekInfo:
        return self.inner.describe_kek(kek_id)

    def __repr__(self) -> str:
        return f"<CountingKms {self.inner!r}>"


class FakeClock:
    """A monotonic clock that moves only when `advance` is called."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def secret_forms(secret: bytes) -> list[str]:
    """Return the raw, hex and base64 spellings of a secret, for leak checks."""
    return [
        secret.hex(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
    ]


def assert_no_secret(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in text, "a key appears in the text"


def log_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(record.getMessage() + repr(record.__dict__) for record in records)
