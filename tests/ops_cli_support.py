"""An application database driven through the command line, for the operator tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner, Result

from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .rotation_support import Base, fill_persons

MODELS = "tests.rotation_support:Base"


@dataclass
class CliApp:
    """A SQLite database with persons of two tenants and a local key file."""

    url: str
    key_path: Path
    engine: sa.Engine

    @property
    def env(self) -> dict[str, str]:
        return {
            "SQLALCHEMY_ENCRYPTED_URL": self.url,
            "SQLALCHEMY_ENCRYPTED_KMS": f"local://{self.key_path}",
            "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
        }

    def run(self, *args: str, input: str | None = None, **env: str) -> Result:
        """Run the command line with this application's settings, ``env`` overriding them."""
        return CliRunner().invoke(cli, list(args), env={**self.env, **env}, input=input)

    def keyring(self) -> Keyring:
        return Keyring(self.engine, LocalKms(self.key_path), active_key_ttl=0)

    def states(self, tenant: str) -> dict[tuple[str, int], str]:
        """Return ``{(purpose, version): state}`` of the tenant's keys."""
        return {
            (info.purpose.value, info.version): info.state.value
            for info in self.keyring().list_keys(tenant)
        }


def make_cli_app(tmp_path: Path) -> CliApp:
    """Create the database with ``init``, then 10 persons of tenants t-acme and t-globex."""
    url = f"sqlite:///{tmp_path}/app.db"
    app = CliApp(url, tmp_path / "master.key", sa.create_engine(url))
    result = app.run("init")
    assert result.exit_code == 0, result.output
    Base.metadata.create_all(app.engine)
    keyring = app.keyring()
    keyring.provision("t-acme")
    keyring.provision("t-globex")
    fill_persons(app.engine, 10)
    return app
