"""The interface every KMS provider implements.

A provider holds one or more KEKs and does four things with them: generate
a new wrapped DEK, wrap a DEK, unwrap a wrapped DEK and describe a KEK.
Every call carries a :class:`WrapContext` (key id, tenant, purpose, key
version) that the provider binds to the wrapped DEK (as AES-GCM associated
data, or as an AWS KMS encryption context), so a wrapped DEK copied to
another keyring row does not unwrap.
"""

from __future__ import annotations

import abc
import re
import struct
import uuid
from dataclasses import dataclass

from ..keys import KeyPurpose

__all__ = [
    "GeneratedDataKey",
    "KekInfo",
    "KmsProvider",
    "WrapContext",
    "looks_like_aws_key_reference",
]

_AWS_REFERENCE = re.compile(r"^(arn:aws[a-z-]*:kms:|alias/)", re.IGNORECASE)


def looks_like_aws_key_reference(value: str) -> bool:
    """Return True for an AWS KMS key ARN, alias ARN or alias name."""
    return bool(_AWS_REFERENCE.match(value.strip()))


@dataclass(frozen=True)
class WrapContext:
    """The identity of a DEK, bound to its wrapped form by the provider."""

    key_id: uuid.UUID
    tenant_id: str
    purpose: KeyPurpose
    version: int

    def as_encryption_context(self) -> dict[str, str]:
        """Return the context as a string map, the form AWS KMS takes.

        AWS KMS writes encryption contexts to CloudTrail, so the map holds
        ids only.
        """
        return {
            "key_id": str(self.key_id),
            "tenant": self.tenant_id,
            "purpose": self.purpose.value,
            "key_version": str(self.version),
        }

    def as_associated_data(self, kek_id: str) -> bytes:
        """Return the context and KEK id as length-prefixed bytes for an AEAD."""
        fields = (
            b"sqlalchemy-encrypted wrapped DEK v1",
            kek_id.encode("utf-8"),
            self.key_id.bytes,
            self.tenant_id.encode("utf-8"),
            self.purpose.value.encode("ascii"),
            struct.pack(">I", self.version),
        )
        return b"".join(struct.pack(">I", len(field)) + field for field in fields)

    def describe(self) -> str:
        """Return the ids for an error message or log line."""
        return (
            f"tenant {self.tenant_id!r}, key id {self.key_id}, "
            f"{self.purpose.value} key version {self.version}"
        )


@dataclass(frozen=True)
class GeneratedDataKey:
    """A new DEK and its wrapped form. ``repr`` hides the plaintext."""

    plaintext: bytes
    wrapped: bytes

    def __repr__(self) -> str:
        return f"<GeneratedDataKey of {len(self.plaintext)} bytes>"

    def __reduce__(self) -> str:
        raise TypeError("GeneratedDataKey holds key material and cannot be pickled")


@dataclass(frozen=True)
class KekInfo:
    """Metadata of one KEK as its provider reports it."""

    provider: str
    kek_id: str
    enabled: bool
    state: str


class KmsProvider(abc.ABC):
    """Base class of KMS providers.

    Subclasses implement the abstract methods and may override
    :meth:`reencrypt` when their KMS can move a wrapped DEK to another KEK
    without returning the plaintext (AWS KMS ``ReEncrypt``). Errors are
    raised as :class:`~sqlalchemy_encrypted.errors.KmsError` subclasses whose
    messages name the KEK id and the context, never key bytes.
    """

    #: Name stored in the keyring's ``kms_provider`` column, such as "local".
    provider_name: str

    @property
    @abc.abstractmethod
    def kek_id(self) -> str:
        """Canonical id of the KEK that wraps new DEKs."""

    @abc.abstractmethod
    def can_unwrap(self, provider_name: str, kek_id: str) -> bool:
        """Return True if this provider can unwrap DEKs wrapped by ``kek_id``."""

    @abc.abstractmethod
    def generate_data_key(self, size: int, context: WrapContext) -> GeneratedDataKey:
        """Create a random DEK of ``size`` bytes, wrapped under :attr:`kek_id`."""

    @abc.abstractmethod
    def wrap(self, dek: bytes, context: WrapContext) -> bytes:
        """Wrap ``dek`` under :attr:`kek_id`."""

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, context: WrapContext, kek_id: str) -> bytes:
        """Unwrap a DEK that ``kek_id`` wrapped with the same ``context``."""

    @abc.abstractmethod
    def describe_kek(self, kek_id: str | None = None) -> KekInfo:
        """Return metadata of ``kek_id`` (default: :attr:`kek_id`)."""

    def reencrypt(self, wrapped: bytes, context: WrapContext, source_kek_id: str) -> bytes:
        """Move a wrapped DEK from ``source_kek_id`` (of this provider) to :attr:`kek_id`."""
        return self.wrap(self.unwrap(wrapped, context, source_kek_id), context)

    def __reduce__(self) -> str:
        raise TypeError(f"{type(self).__name__} holds key material and cannot be pickled")
