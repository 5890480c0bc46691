"""Setup mistakes that once surfaced as third-party errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import ConfigurationError, KeyPurpose
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import AwsKms, LocalKms, kms_from_uri

from .models import Base, Person


def test_missing_keyring_table_is_explained(engine: sa.Engine, local_kms: LocalKms) -> None:
    """A keyring whose table was never created names the table and how to
    create it, on the first write and on the first read."""
    keyring = Keyring(engine, local_kms)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Test Person"))
        with pytest.raises(ConfigurationError) as on_write:
            session.commit()
    message = str(on_write.value)
    assert "encryption_keys" in message
    assert "create_table()" in message
    assert "Test Person" not in message
    with pytest.raises(ConfigurationError, match="encryption_keys"):
        keyring.list_keys()

    keyring.create_table()
    assert keyring.active_key("t-acme", KeyPurpose.RANDOMIZED).version == 1


@pytest.fixture
def no_aws_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def test_aws_kms_without_region_is_configuration_error(no_aws_region: None) -> None:
    with pytest.raises(ConfigurationError, match="region") as direct:
        AwsKms("alias/app-kek")
    assert "region_name" in str(direct.value)
    with pytest.raises(ConfigurationError, match=r"\?region="):
        kms_from_uri("aws-kms://alias/app-kek")
