"""AWS KMS through boto3 (install the ``aws`` extra).

DEKs are made with ``GenerateDataKey``, unwrapped with ``Decrypt`` pinned to
the KEK's key ARN, wrapped with ``Encrypt`` and moved between KMS keys with
``ReEncrypt``, which never returns the plaintext DEK. Every call carries the
encryption context ``{key_id, tenant, purpose, key_version}``; AWS KMS
refuses to decrypt under any other context, and logs the context (ids
only) in CloudTrail.

boto3 is imported when an ``AwsKms`` is created, not when this module is.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from ..errors import (
    ConfigurationError,
    KmsAccessDeniedError,
    KmsContextMismatchError,
    KmsError,
    KmsKeyDisabledError,
    KmsKeyNotFoundError,
    KmsThrottlingError,
    KmsUnavailableError,
)
from .base import GeneratedDataKey, KekInfo, KmsProvider, WrapContext, looks_like_aws_key_reference

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = ["AwsKms"]

_KEY_ID = re.compile(
    r"^(mrk-[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/\S+$")

# AWS KMS error codes and the library errors they become.
_ERRORS: dict[str, type[KmsError]] = {
    "ThrottlingException": KmsThrottlingError,
    "LimitExceededException": KmsThrottlingError,
    "DisabledException": KmsKeyDisabledError,
    "KMSInvalidStateException": KmsKeyDisabledError,
    "AccessDeniedException": KmsAccessDeniedError,
    "UnrecognizedClientException": KmsAccessDeniedError,
    "InvalidSignatureException": KmsAccessDeniedError,
    "ExpiredTokenException": KmsAccessDeniedError,
    "InvalidCiphertextException": KmsContextMismatchError,
    "IncorrectKeyException": KmsContextMismatchError,
    "NotFoundException": KmsKeyNotFoundError,
    "KeyUnavailableException": KmsUnavailableError,
    "DependencyTimeoutException": KmsUnavailableError,
    "KMSInternalException": KmsUnavailableError,
}

_HINTS: dict[type[KmsError], str] = {
    KmsThrottlingError: "the request rate exceeded the KMS quota after boto3's retries",
    KmsKeyDisabledError: "the KMS key is disabled or pending deletion",
    KmsAccessDeniedError: "the caller's credentials may not use this KMS key",
    KmsContextMismatchError: (
        "the wrapped DEK does not belong to this KMS key and encryption context; the "
        "keyring row may have been copied or edited"
    ),
    KmsKeyNotFoundError: "the KMS key does not exist in this account and region",
    KmsUnavailableError: "AWS KMS could not complete the request",
}


def _arn_region(reference: str) -> str | None:
    """Return the region of an ARN (``arn:aws:kms:REGION:...``), or None."""
    parts = reference.split(":")
    if len(parts) > 4 and parts[0] == "arn" and parts[2] == "kms" and parts[3]:
        return parts[3]
    return None


def _check_reference(key: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigurationError("AwsKms needs a KMS key ARN, alias or key id")
    key = key.strip()
    if looks_like_aws_key_reference(key) or _KEY_ID.match(key):
        return key
    raise ConfigurationError(
        f"AwsKms got {len(key)} characters that are not a KMS key ARN, alias ('alias/name') or "
        "key id: pass the reference of a KMS key, never key material (use LocalKms for that)"
    )


class AwsKms(KmsProvider):
    """KEKs held in AWS KMS.

    :param key: key ARN, alias ARN, alias name (``alias/app``) or key id of
        the KMS key that wraps new DEKs. The keyring stores the key's
        canonical ARN, resolved once with ``DescribeKey``, never the alias.
    :param client: a boto3 KMS client to use as is. Without one, the
        provider builds a client with boto3's ``standard`` retry mode,
        ``max_attempts`` attempts and the given timeouts.
    """

    provider_name = "aws-kms"

    def __init__(
        self,
        key: str,
        *,
        client: KMSClient | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
    ) -> None:
        self._reference = _check_reference(key)
        if client is None:
            client = self._build_client(
                region_name, endpoint_url, max_attempts, connect_timeout, read_timeout
            )
        self.client: KMSClient = client
        self._arn: str | None = self._reference if _KEY_ARN.match(self._reference) else None
        self._arn_lock = threading.Lock()

    @staticmethod
    def _build_client(
        region_name: str | None,
        endpoint_url: str | None,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> KMSClient:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ConfigurationError(
                "AwsKms needs boto3: install sqlalchemy-encrypted[aws]"
            ) from None
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        from botocore.exceptions import NoRegionError

        try:
            return boto3.client(
                "kms", region_name=region_name, endpoint_url=endpoint_url, config=config
            )
        except NoRegionError:
            raise ConfigurationError(
                "AwsKms found no AWS region: pass region_name= (or ?region= in an aws-kms:// "
                "URI), or set AWS_DEFAULT_REGION"
            ) from None

    def __repr__(self) -> str:
        return f"<AwsKms key={self._arn or self._reference}>"

    # -- calls ----------------------------------------------------------------

    def _call(
        self, operation: str, kek: str, context: WrapContext | None, **params: Any
    ) -> dict[str, Any]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"KEK {kek}" + (f" ({context.describe()})" if context is not None else "")
        method = getattr(self.client, re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower())
        try:
            response: dict[str, Any] = method(**params)
            return response
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            error_class = _ERRORS.get(code, KmsError)
            attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            hint = _HINTS.get(error_class, "AWS KMS returned an error")
            key_region = _arn_region(kek)
            client_region = self.client.meta.region_name
            if key_region is not None and client_region and key_region != client_region:
                hint += (
                    f"; the key is in region {key_region}, but the client calls region "
                    f"{client_region}: pass region_name={key_region!r} (?region= in a KMS URI)"
                )
            raise error_class(
                f"AWS KMS {operation} failed for {where}: {code} after {attempts} "
                f"attempt(s); {hint}"
            ) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise KmsAccessDeniedError(
                f"AWS KMS {operation} failed for {where}: no AWS credentials were found"
            ) from None
        except BotoCoreError as exc:
            raise KmsUnavailableError(
                f"AWS KMS {operation} failed for {where}: {type(exc).__name__}; check the "
                "network path and endpoint of AWS KMS"
            ) from None

    @property
    def kek_id(self) -> str:
        """The canonical key ARN, resolved with ``DescribeKey`` on first use."""
        with self._arn_lock:
            if self._arn is None:
                self._arn = self.describe_kek(self._reference).kek_id
            return self._arn

    def can_unwrap(self, provider_name: str, kek_id: str) -> bool:
        # Any key ARN: AWS KMS decides whether these credentials may use it.
        return provider_name == self.provider_name and bool(_KEY_ARN.match(kek_id))

    def describe_kek(self, kek_id: str | None = None) -> KekInfo:
        reference = kek_id if kek_id is not None else self.kek_id
        response = self._call("DescribeKey", reference, None, KeyId=reference)
        metadata = response["KeyMetadata"]
        return KekInfo(
            provider=self.provider_name,
            kek_id=str(metadata["Arn"]),
            enabled=bool(metadata.get("Enabled", False)),
            state=str(metadata.get("KeyState", "Unknown")),
        )

    def generate_data_key(self, size: int, context: WrapContext) -> GeneratedDataKey:
        kek = self.kek_id
        response = self._call(
            "GenerateDataKey",
            kek,
            context,
            KeyId=kek,
            NumberOfBytes=size,
            EncryptionContext=context.as_encryption_context(),
        )
        return GeneratedDataKey(bytes(response["Plaintext"]), bytes(response["CiphertextBlob"]))

    def wrap(self, dek: bytes, context: WrapContext) -> bytes:
        kek = self.kek_id
        response = self._call(
            "Encrypt",
            kek,
            context,
            KeyId=kek,
            Plaintext=dek,
            EncryptionContext=context.as_encryption_context(),
        )
        return bytes(response["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, context: WrapContext, kek_id: str) -> bytes:
        response = self._call(
            "Decrypt",
            kek_id,
            context,
            CiphertextBlob=wrapped,
            KeyId=kek_id,
            EncryptionContext=context.as_encryption_context(),
        )
        if response.get("KeyId") not in (None, kek_id):
            raise KmsContextMismatchError(
                f"AWS KMS Decrypt for KEK {kek_id} ({context.describe()}) used another KMS key"
            )
        return bytes(response["Plaintext"])

    def reencrypt(self, wrapped: bytes, context: WrapContext, source_kek_id: str) -> bytes:
        kek = self.kek_id
        encryption_context = context.as_encryption_context()
        response = self._call(
            "ReEncrypt",
            f"{source_kek_id} -> {kek}",
            context,
            CiphertextBlob=wrapped,
            SourceKeyId=source_kek_id,
            SourceEncryptionContext=encryption_context,
            DestinationKeyId=kek,
            DestinationEncryptionContext=encryption_context,
        )
        return bytes(response["CiphertextBlob"])
