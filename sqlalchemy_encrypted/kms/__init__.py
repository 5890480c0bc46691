"""KMS providers: the services that hold the KEKs wrapping the keyring's DEKs.

``LocalKms`` keeps KEKs in a local key file, the environment or a
passphrase. ``AwsKms`` uses AWS KMS through boto3 (the ``aws`` extra),
which is imported only when an ``AwsKms`` is created.
"""

from __future__ import annotations

from .aws import AwsKms
from .base import GeneratedDataKey, KekInfo, KmsProvider, WrapContext
from .local import LocalKms
from .uri import kms_from_uri

__all__ = [
    "AwsKms",
    "GeneratedDataKey",
    "KekInfo",
    "KmsProvider",
    "LocalKms",
    "WrapContext",
    "kms_from_uri",
]
