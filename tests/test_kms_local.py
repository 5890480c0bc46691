"""LocalKms: key files, environment and passphrase KEKs, wrapping with context."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
import uuid
from pathlib import Path

import pytest

from sqlalchemy_encrypted import (
    ConfigurationError,
    KeyPurpose,
    KmsContextMismatchError,
    KmsKeyNotFoundError,
)
from sqlalchemy_encrypted.kms import LocalKms, WrapContext

from .keyring_helpers import assert_no_secret

ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _context(tenant: str = "t-acme", version: int = 1) -> WrapContext:
    return WrapContext(uuid.UUID(int=7), tenant, KeyPurpose.RANDOMIZED, version)


def _file_keks(path: Path) -> dict[str, bytes]:
    document = json.loads(path.read_text())
    return {name: base64.b64decode(value) for name, value in document["keks"].items()}


def test_create_writes_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    kms = LocalKms.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keks = _file_keks(path)
    assert list(keks) == ["default"]
    assert len(keks["default"]) == 32
    assert kms.kek_id.startswith("local:default:")
    assert LocalKms(path).kek_id == kms.kek_id


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    LocalKms.create(path)
    with pytest.raises(ConfigurationError, match="already exists"):
        LocalKms.create(path)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_rejects_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    LocalKms.create(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigurationError, match="chmod 600") as caught:
        LocalKms(path)
    assert f"{mode:04o}" in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        LocalKms(tmp_path / "nope.key")


def test_wrap_round_trip_and_context(tmp_path: Path) -> None:
    kms = LocalKms.create(tmp_path / "master.key")
    generated = kms.generate_data_key(32, _context())
    assert len(generated.plaintext) == 32
    assert kms.unwrap(generated.wrapped, _context(), kms.kek_id) == generated.plaintext
    assert generated.plaintext not in generated.wrapped
    for other in (
        _context(tenant="t-globex"),
        _context(version=2),
        WrapContext(uuid.UUID(int=8), "t-acme", KeyPurpose.RANDOMIZED, 1),
        WrapContext(uuid.UUID(int=7), "t-acme", KeyPurpose.DETERMINISTIC, 1),
    ):
        with pytest.raises(KmsContextMismatchError) as caught:
            kms.unwrap(generated.wrapped, other, kms.kek_id)
        assert kms.kek_id in str(caught.value)
        assert_no_secret(str(caught.value), [generated.plaintext])


def test_several_keks_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    old = LocalKms.create(path, kek="kek-2024")
    wrapped = old.wrap(bytes(range(32)), _context())
    new = LocalKms.add_kek(path, "kek-2025")
    assert new.kek_id.startswith("local:kek-2025:")
    assert new.can_unwrap("local", old.kek_id)
    assert new.unwrap(wrapped, _context(), old.kek_id) == bytes(range(32))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LocalKms(path, kek="kek-2024").kek_id == old.kek_id

    with pytest.raises(ConfigurationError, match="primary"):
        LocalKms.remove_kek(path, "kek-2025")
    after = LocalKms.remove_kek(path, "kek-2024")
    assert not after.can_unwrap("local", old.kek_id)
    with pytest.raises(KmsKeyNotFoundError) as caught:
        after.unwrap(wrapped, _context(), old.kek_id)
    assert "kek-2024" in str(caught.value)
    assert "t-acme" in str(caught.value)


def test_same_name_other_key(tmp_path: Path) -> None:
    one = LocalKms.create(tmp_path / "one.key", kek="kek-a")
    two = LocalKms.create(tmp_path / "two.key", kek="kek-a")
    assert one.kek_id != two.kek_id
    wrapped = one.wrap(bytes(32), _context())
    with pytest.raises(KmsKeyNotFoundError, match="another fingerprint"):
        two.unwrap(wrapped, _context(), one.kek_id)


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("TEST_MASTER_KEY", base64.b64encode(key).decode())
    kms = LocalKms.from_env("TEST_MASTER_KEY")
    assert kms.kek_id == LocalKms.from_key_material(key).kek_id
    assert_no_secret(repr(kms), [key])

    monkeypatch.delenv("TEST_MASTER_KEY")
    with pytest.raises(ConfigurationError, match="TEST_MASTER_KEY is not set"):
        LocalKms.from_env("TEST_MASTER_KEY")
    monkeypatch.setenv("TEST_MASTER_KEY", base64.b64encode(os.urandom(16)).decode())
    with pytest.raises(ConfigurationError, match="16 bytes"):
        LocalKms.from_env("TEST_MASTER_KEY")


@pytest.mark.parametrize("reference", [ARN, "alias/app-key", "arn:aws:kms:eu-west-1:1:alias/x"])
def test_aws_reference_rejected(
    reference: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="AwsKms"):
        LocalKms(reference)
    with pytest.raises(ConfigurationError, match="AwsKms"):
        LocalKms.from_key_material(reference)
    with pytest.raises(ConfigurationError, match="AwsKms"):
        LocalKms.from_key_material(reference.encode())
    monkeypatch.setenv("TEST_MASTER_KEY", reference)
    with pytest.raises(ConfigurationError, match="AwsKms"):
        LocalKms.from_env("TEST_MASTER_KEY")


def test_passphrase_kek() -> None:
    salt = b"0123456789abcdef"
    one = LocalKms.from_passphrase("correct horse battery staple", salt=salt, n=2**14)
    two = LocalKms.from_passphrase("correct horse battery staple", salt=salt, n=2**14)
    other = LocalKms.from_passphrase("another passphrase", salt=salt, n=2**14)
    assert one.kek_id == two.kek_id
    assert one.kek_id != other.kek_id
    wrapped = one.wrap(bytes(32), _context())
    assert two.unwrap(wrapped, _context(), one.kek_id) == bytes(32)
    assert "correct horse" not in repr(one)
    with pytest.raises(ConfigurationError, match="salt"):
        LocalKms.from_passphrase("pass", salt=b"short")


def test_passphrase_default_cost() -> None:
    kms = LocalKms.from_passphrase("correct horse battery staple", salt=b"s" * 16)
    assert kms.kek_id.startswith("local:passphrase:")


def test_local_kms_repr_and_pickle(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    kms = LocalKms.create(path)
    key = _file_keks(path)["default"]
    assert_no_secret(repr(kms) + str(vars(kms).keys()), [key])
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(kms)
    info = kms.describe_kek()
    assert info.kek_id == kms.kek_id
    assert info.enabled
