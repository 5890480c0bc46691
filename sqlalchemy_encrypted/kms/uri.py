"""Build a KMS provider from a URI, the form the CLI and configuration files use.

* ``local:///abs/path/master.key`` (``?kek=name`` picks the KEK for new DEKs)
* ``local-env://VARIABLE`` (``?kek=name`` names the KEK)
* ``aws-kms://arn:aws:kms:...`` or ``aws-kms://alias/name``
  (``?region=...&endpoint_url=...`` are passed to boto3, and
  ``connect_timeout``, ``read_timeout`` (seconds) and ``max_attempts`` to
  :class:`AwsKms`)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote

from ..errors import ConfigurationError
from .aws import AwsKms
from .base import KmsProvider
from .local import LocalKms

__all__ = ["kms_from_uri"]


def _split(uri: str, prefix: str, allowed: set[str]) -> tuple[str, dict[str, str]]:
    body, _, query = uri[len(prefix) :].partition("?")
    options = {name: values[-1] for name, values in parse_qs(query, strict_parsing=False).items()}
    unknown = set(options) - allowed
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(sorted(unknown))} in KMS URI {prefix}...; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    return unquote(body), options


# AwsKms options a URI may set: how long one call may wait, and how often
# it is tried. The worst wait is connect_timeout + read_timeout per attempt.
_AWS_LIMITS = ("connect_timeout", "read_timeout", "max_attempts")


def _number(uri: str, name: str, text: str) -> float | int:
    scheme = uri.partition("://")[0]
    try:
        value: float | int = int(text) if name == "max_attempts" else float(text)
    except ValueError:
        value = -1
    if not value > 0 or value == float("inf"):
        kind = "a whole number of at least 1" if name == "max_attempts" else "seconds above 0"
        raise ConfigurationError(
            f"invalid {name} {text!r} in KMS URI {scheme}://...: it must be {kind}"
        )
    return value


def kms_from_uri(uri: str) -> KmsProvider:
    """Return the provider a KMS URI names; raise :class:`ConfigurationError` if invalid."""
    if uri.startswith("local://"):
        path, options = _split(uri, "local://", {"kek"})
        if not path.startswith("/"):
            raise ConfigurationError(
                "a local KMS URI needs an absolute path, for example local:///etc/app/master.key"
            )
        return LocalKms(path, kek=options.get("kek"))
    if uri.startswith("local-env://"):
        variable, options = _split(uri, "local-env://", {"kek"})
        return LocalKms.from_env(variable, kek=options.get("kek", "default"))
    if uri.startswith("aws-kms://"):
        key, options = _split(uri, "aws-kms://", {"region", "endpoint_url", *_AWS_LIMITS})
        limits: dict[str, Any] = {
            name: _number(uri, name, options[name]) for name in _AWS_LIMITS if name in options
        }
        return AwsKms(
            key,
            region_name=options.get("region"),
            endpoint_url=options.get("endpoint_url"),
            **limits,
        )
    scheme = uri.partition("://")[0] if "://" in uri else uri[:20]
    raise ConfigurationError(
        f"unsupported KMS URI scheme {scheme!r}: use local://, local-env:// or aws-kms://"
    )
