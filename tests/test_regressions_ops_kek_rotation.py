"""A local KEK rotation seen by a process that is already running.

``LocalKms`` read its key file once, so after ``LocalKms.add_kek()`` and a
rewrap by the operator, every running application process failed with
``KmsKeyNotFoundError`` as soon as its cached DEKs expired, until it was
restarted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import KeyPurpose, KmsKeyNotFoundError
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms


def test_running_process_reads_added_kek(
    engine: sa.Engine, local_kms: LocalKms, tmp_path: Path
) -> None:
    key_path = tmp_path / "master.key"
    application = Keyring(engine, LocalKms(key_path), cache_ttl=0)
    application.create_table()
    application.provision("t-acme")
    old_kek = local_kms.kek_id

    rotated = LocalKms.add_kek(key_path, "kek-b")
    operator = Keyring(engine, rotated, set_default=False)
    assert operator.rewrap() == 2
    LocalKms.remove_kek(key_path, "kek-a")

    assert {info.kek_id for info in operator.list_keys("t-acme")} == {rotated.kek_id}
    for purpose in KeyPurpose:
        assert application.active_key("t-acme", purpose).version == 1
    assert application.kms.kek_id == old_kek


def test_missing_kek_after_reload_is_reported(
    engine: sa.Engine, local_kms: LocalKms, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_path = tmp_path / "master.key"
    application = Keyring(engine, LocalKms(key_path), cache_ttl=0)
    application.create_table()
    other = LocalKms.create(tmp_path / "other.key", kek="kek-z")
    Keyring(engine, other, set_default=False).provision("t-globex")
    key_path.chmod(0o640)

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted.kms"):
        with pytest.raises(KmsKeyNotFoundError) as missing:
            application.active_key("t-globex", KeyPurpose.RANDOMIZED)

    assert "has no KEK named 'kek-z'" in str(missing.value)
    assert "could not read the local KMS key file again" in caplog.text
    assert "mode 0640" in caplog.text
