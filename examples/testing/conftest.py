"""Fixtures of an application's test suite that uses sqlalchemy-encrypted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from app_models import Base

# Adds the fixtures encryption_keyring and encryption_local_kms.
pytest_plugins = ["sqlalchemy_encrypted.pytest_plugin"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()
