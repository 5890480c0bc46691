"""An embedded KMS: KEKs in a local key file, the environment or a passphrase.

Each KEK is a 256-bit key with a name. Its canonical id is
``local:<name>:<fingerprint>``, where the fingerprint is the first 8 bytes of
HMAC-SHA256(KEK, "sqlalchemy-encrypted local KEK fingerprint") in hex, so a
different key under a reused name never passes for the original.

A DEK is wrapped with AES-256-GCM under a fresh random 96-bit nonce, with
the KEK id, key id, tenant, purpose and key version as associated data. The
wrapped form is ``0x01 | nonce (12) | ciphertext | tag (16)``.

The key file is JSON written by :meth:`LocalKms.create` with mode 0600::

    {"format": "sqlalchemy-encrypted local KMS key file", "version": 1,
     "primary": "default", "keks": {"default": "<base64 of 32 bytes>"}}
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigurationError, KmsContextMismatchError, KmsKeyNotFoundError
from .base import GeneratedDataKey, KekInfo, KmsProvider, WrapContext, looks_like_aws_key_reference

__all__ = ["DEFAULT_ENV_VARIABLE", "LocalKms"]

DEFAULT_ENV_VARIABLE = "SQLALCHEMY_ENCRYPTED_MASTER_KEY"

logger = logging.getLogger("sqlalchemy_encrypted.kms")

_FILE_FORMAT = "sqlalchemy-encrypted local KMS key file"
_FILE_VERSION = 1
_KEK_SIZE = 32
_NONCE_SIZE = 12
_BLOB_VERSION = b"\x01"
_KEK_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MIN_SALT_SIZE = 16

# scrypt cost for passphrase-derived KEKs: N=2**17, r=8, p=1 needs 128 MiB
# and is the OWASP Password Storage Cheat Sheet's scrypt setting.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1


def _fingerprint(kek: bytes) -> str:
    return hmac.digest(kek, b"sqlalchemy-encrypted local KEK fingerprint", "sha256")[:8].hex()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _KEK_NAME.match(name):
        raise ConfigurationError(
            f"invalid local KEK name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )
    return name


def _decode_key(encoded: str, source: str) -> bytes:
    if looks_like_aws_key_reference(encoded):
        raise ConfigurationError(
            f"{source} contains an AWS KMS key ARN or alias, not key material: "
            "use AwsKms for keys held in AWS KMS"
        )
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(
            f"{source} is not valid base64: a local KEK is 32 random bytes, base64-encoded"
        ) from None
    if len(key) != _KEK_SIZE:
        raise ConfigurationError(
            f"{source} decodes to {len(key)} bytes: a local KEK is exactly {_KEK_SIZE} bytes"
        )
    return key


def _check_permissions(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"key file {path} has mode {mode:04o}: it must be readable by its owner only; "
            f"run 'chmod 600 {path}'"
        )


def _read_key_file(path: Path) -> tuple[dict[str, bytes], str]:
    try:
        if path.is_dir():
            raise ConfigurationError(f"key file {path} is a directory, not a local KMS key file")
        _check_permissions(path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"key file {path} does not exist: create one with LocalKms.create() or "
            "'sqlalchemy-encrypted init'"
        ) from None
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"key file {path} is not a local KMS key file (not UTF-8 text)"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"could not read key file {path}: {exc.strerror}") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise ConfigurationError(
            f"key file {path} is not a local KMS key file (not JSON)"
        ) from None
    if not isinstance(document, dict) or document.get("format") != _FILE_FORMAT:
        raise ConfigurationError(f"key file {path} is not a local KMS key file")
    if document.get("version") != _FILE_VERSION:
        raise ConfigurationError(
            f"key file {path} has version {document.get('version')!r}; this library reads "
            f"version {_FILE_VERSION}"
        )
    entries = document.get("keks")
    primary = document.get("primary")
    if not isinstance(entries, dict) or not entries or not isinstance(primary, str):
        raise ConfigurationError(f"key file {path} has no KEKs or no primary KEK")
    keks = {
        _check_name(name): _decode_key(str(value), f"KEK {name!r} in key file {path}")
        for name, value in entries.items()
    }
    if primary not in keks:
        raise ConfigurationError(f"key file {path} names primary KEK {primary!r}, which it lacks")
    return keks, primary


def _write_key_file(path: Path, keks: dict[str, bytes], primary: str, *, replace: bool) -> None:
    document: dict[str, Any] = {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "primary": primary,
        "keks": {name: base64.b64encode(key).decode("ascii") for name, key in keks.items()},
    }
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    target = path.with_name(path.name + ".tmp") if replace else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(
            f"key file {target} already exists; refusing to overwrite a key file"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"could not create key file {target}: {exc.strerror}") from None
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    os.close(fd)
    if replace:
        os.replace(target, path)


class LocalKms(KmsProvider):
    """KEKs held by this process, for development and single-machine use.

    ``LocalKms(path)`` reads a key file written by :meth:`create`; ``kek=``
    picks the KEK that wraps new DEKs (default: the file's primary KEK).
    Every KEK in the file can unwrap, which is how a KEK rotation works
    locally: add a KEK with :meth:`add_kek`, rewrap the keyring, then remove
    the old KEK with :meth:`remove_kek`.
    """

    provider_name = "local"

    def __init__(self, path: str | os.PathLike[str], *, kek: str | None = None) -> None:
        if isinstance(path, str) and looks_like_aws_key_reference(path):
            raise ConfigurationError(
                "LocalKms takes the path of a local key file, but got an AWS KMS key ARN or "
                "alias: use AwsKms for keys held in AWS KMS"
            )
        self._path: Path | None = Path(path)
        keks, primary = _read_key_file(self._path)
        self._setup(keks, kek if kek is not None else primary, f"key file {self._path}")

    def _setup(self, keks: dict[str, bytes], primary: str, source: str) -> None:
        if primary not in keks:
            raise ConfigurationError(
                f"{source} has no KEK named {primary!r}; it has {', '.join(sorted(keks))}"
            )
        self._source = source
        self._by_id: dict[str, AESGCM] = {}
        self._by_name: dict[str, str] = {}
        for name, key in keks.items():
            kek_id = f"local:{name}:{_fingerprint(key)}"
            self._by_id[kek_id] = AESGCM(key)
            self._by_name[name] = kek_id
        self._primary = self._by_name[primary]

    @classmethod
    def _from_keks(cls, keks: dict[str, bytes], primary: str, source: str) -> LocalKms:
        kms = cls.__new__(cls)
        kms._path = None
        kms._setup(keks, primary, source)
        return kms

    # -- constructors ---------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, kek: str = "default") -> LocalKms:
        """Write a new key file holding one random 256-bit KEK, with mode 0600.

        Raises :class:`ConfigurationError` if the file already exists.
        """
        _write_key_file(Path(path), {_check_name(kek): os.urandom(_KEK_SIZE)}, kek, replace=False)
        return cls(path)

    @classmethod
    def add_kek(
        cls, path: str | os.PathLike[str], kek: str, *, make_primary: bool = True
    ) -> LocalKms:
        """Add a new random KEK named ``kek`` to a key file, by default as its primary."""
        file_path = Path(path)
        keks, primary = _read_key_file(file_path)
        if _check_name(kek) in keks:
            raise ConfigurationError(f"key file {file_path} already has a KEK named {kek!r}")
        keks[kek] = os.urandom(_KEK_SIZE)
        _write_key_file(file_path, keks, kek if make_primary else primary, replace=True)
        return cls(path)

    @classmethod
    def remove_kek(cls, path: str | os.PathLike[str], kek: str) -> LocalKms:
        """Delete the KEK named ``kek`` from a key file.

        DEKs still wrapped by it become unreadable, so rewrap the keyring
        first. The primary KEK cannot be removed.
        """
        file_path = Path(path)
        keks, primary = _read_key_file(file_path)
        if kek not in keks:
            raise ConfigurationError(f"key file {file_path} has no KEK named {kek!r}")
        if kek == primary:
            raise ConfigurationError(
                f"KEK {kek!r} is the primary KEK of key file {file_path}: add another KEK "
                "as primary before removing it"
            )
        del keks[kek]
        _write_key_file(file_path, keks, primary, replace=True)
        return cls(path)

    @classmethod
    def from_key_material(cls, key: bytes | str, *, kek: str = "default") -> LocalKms:
        """Use one KEK given as 32 raw bytes or as base64 text."""
        source = f"key material for local KEK {kek!r}"
        if isinstance(key, str):
            material = _decode_key(key, source)
        elif isinstance(key, (bytes, bytearray)):
            if looks_like_aws_key_reference(bytes(key).decode("latin-1")):
                raise ConfigurationError(
                    f"{source} is an AWS KMS key ARN or alias: use AwsKms for keys held in AWS KMS"
                )
            if len(key) != _KEK_SIZE:
                raise ConfigurationError(
                    f"{source} has {len(key)} bytes: a local KEK is exactly {_KEK_SIZE} bytes"
                )
            material = bytes(key)
        else:
            raise ConfigurationError(f"{source} must be bytes or base64 str")
        return cls._from_keks({_check_name(kek): material}, kek, source)

    @classmethod
    def from_env(cls, variable: str = DEFAULT_ENV_VARIABLE, *, kek: str = "default") -> LocalKms:
        """Use one KEK from an environment variable holding 32 bytes in base64."""
        value = os.environ.get(variable)
        if not value:
            raise ConfigurationError(
                f"environment variable {variable} is not set: it must hold a 32-byte KEK in "
                "base64, for example from 'openssl rand -base64 32'"
            )
        source = f"environment variable {variable}"
        return cls._from_keks({_check_name(kek): _decode_key(value, source)}, kek, source)

    @classmethod
    def from_passphrase(
        cls,
        passphrase: str,
        *,
        salt: bytes,
        kek: str = "passphrase",
        n: int = SCRYPT_N,
        r: int = SCRYPT_R,
        p: int = SCRYPT_P,
    ) -> LocalKms:
        """Derive one KEK from a passphrase with scrypt.

        ``salt`` is at least 16 random bytes, stored with the configuration
        (it is not secret) and never changed. Another salt or cost setting
        derives another KEK with another id, so the keyring reports the old
        KEK as missing instead of unwrapping garbage.
        """
        if not isinstance(passphrase, str) or not passphrase:
            raise ConfigurationError("the passphrase for a local KEK must be a non-empty str")
        if not isinstance(salt, bytes) or len(salt) < _MIN_SALT_SIZE:
            raise ConfigurationError(
                f"the scrypt salt must be at least {_MIN_SALT_SIZE} random bytes"
            )
        key = Scrypt(salt=salt, length=_KEK_SIZE, n=n, r=r, p=p).derive(passphrase.encode())
        return cls._from_keks({_check_name(kek): key}, kek, f"passphrase KEK {kek!r}")

    # -- provider interface ---------------------------------------------------

    @property
    def kek_id(self) -> str:
        return self._primary

    @property
    def kek_ids(self) -> list[str]:
        """Canonical ids of every KEK this provider holds."""
        return sorted(self._by_id)

    def can_unwrap(self, provider_name: str, kek_id: str) -> bool:
        return provider_name == self.provider_name and kek_id in self._by_id

    def generate_data_key(self, size: int, context: WrapContext) -> GeneratedDataKey:
        dek = os.urandom(size)
        return GeneratedDataKey(dek, self.wrap(dek, context))

    def wrap(self, dek: bytes, context: WrapContext) -> bytes:
        nonce = os.urandom(_NONCE_SIZE)
        aead = self._by_id[self._primary]
        return (
            _BLOB_VERSION
            + nonce
            + aead.encrypt(nonce, dek, context.as_associated_data(self._primary))
        )

    def unwrap(self, wrapped: bytes, context: WrapContext, kek_id: str) -> bytes:
        aead = self._by_id.get(kek_id)
        if aead is None and self._path is not None:
            # Another process may have added the KEK to the file with add_kek()
            # and rewrapped the keyring since this provider read it.
            self._load_added_keks(self._path)
            aead = self._by_id.get(kek_id)
        if aead is None:
            raise KmsKeyNotFoundError(self._missing_kek_message(kek_id, context))
        if len(wrapped) < 1 + _NONCE_SIZE + 16 or wrapped[:1] != _BLOB_VERSION:
            raise KmsContextMismatchError(
                f"could not unwrap the DEK of {context.describe()} with local KEK {kek_id}: "
                "the wrapped DEK is not in the local KMS format"
            )
        nonce = wrapped[1 : 1 + _NONCE_SIZE]
        try:
            associated_data = context.as_associated_data(kek_id)
            return aead.decrypt(nonce, wrapped[1 + _NONCE_SIZE :], associated_data)
        except InvalidTag:
            raise KmsContextMismatchError(
                f"could not unwrap the DEK of {context.describe()} with local KEK {kek_id}: "
                "the wrapped DEK does not match this KEK and context"
            ) from None

    def _load_added_keks(self, path: Path) -> None:
        """Read the key file again and keep the KEKs it gained; the primary KEK
        and the KEKs already loaded stay as they are."""
        try:
            keks, _ = _read_key_file(path)
        except ConfigurationError as exc:
            # The caller then raises KmsKeyNotFoundError for the KEK it needed.
            logger.warning("could not read the local KMS key file again: %s", exc)
            return
        by_id = dict(self._by_id)
        by_name = dict(self._by_name)
        for name, key in keks.items():
            kek_id = f"local:{name}:{_fingerprint(key)}"
            if kek_id not in by_id:
                by_id[kek_id] = AESGCM(key)
                by_name.setdefault(name, kek_id)
        self._by_id = by_id
        self._by_name = by_name

    def _missing_kek_message(self, kek_id: str, context: WrapContext) -> str:
        name = kek_id.split(":")[1] if kek_id.count(":") == 2 else kek_id
        held = self._by_name.get(name)
        detail = (
            f"{self._source} has a KEK named {name!r} with another fingerprint ({held})"
            if held is not None
            else f"{self._source} has no KEK named {name!r}"
        )
        return (
            f"local KEK {kek_id} that wrapped the DEK of {context.describe()} is missing: "
            f"{detail}; pass the KMS that holds it as previous_kms= (--previous-kms on the "
            "command line)"
        )

    def describe_kek(self, kek_id: str | None = None) -> KekInfo:
        wanted = kek_id if kek_id is not None else self._primary
        if wanted not in self._by_id:
            raise KmsKeyNotFoundError(f"local KEK {wanted} is not in {self._source}")
        return KekInfo(provider=self.provider_name, kek_id=wanted, enabled=True, state="Enabled")

    def __repr__(self) -> str:
        return f"<LocalKms kek={self._primary} keks={len(self._by_id)} from {self._source}>"
