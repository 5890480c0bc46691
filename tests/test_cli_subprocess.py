"""The command line as a real process: the console script and ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .rotation_support import Base, fill_persons

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "sqlalchemy-encrypted"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_console_script_round_trip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/app.db"
    env = {
        "SQLALCHEMY_ENCRYPTED_URL": url,
        "SQLALCHEMY_ENCRYPTED_KMS": f"local://{tmp_path}/master.key",
        "SQLALCHEMY_ENCRYPTED_MODELS": "tests.rotation_support:Base",
    }
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sqlalchemy_encrypted"]

    init = _run([*command, "init"], env)
    assert init.returncode == 0, init.stderr
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    Keyring(engine, LocalKms(tmp_path / "master.key")).provision("t-acme")
    fill_persons(engine, 8)
    engine.dispose()

    rotate = _run([*command, "keys", "rotate", "t-acme", "t-globex", "--activate-now"], env)
    reencrypt = _run([*command, "reencrypt", "--json"], env)
    status = _run([sys.executable, "-m", "sqlalchemy_encrypted", "status", "--json"], env)

    assert rotate.returncode == 0, rotate.stderr
    assert reencrypt.returncode == 0, reencrypt.stderr
    assert json.loads(reencrypt.stdout)["values_reencrypted"] == 16
    assert json.loads(status.stdout)["stale"] == {}


def test_error_exit_status_and_one_line(tmp_path: Path) -> None:
    env = {
        "SQLALCHEMY_ENCRYPTED_URL": f"sqlite:///{tmp_path}/app.db",
        "SQLALCHEMY_ENCRYPTED_KMS": "vault://nowhere",
    }

    result = _run([sys.executable, "-m", "sqlalchemy_encrypted", "keys", "rewrap"], env)

    assert result.returncode == 3
    assert result.stderr.startswith("error: unsupported KMS URI scheme 'vault'")
    assert len(result.stderr.strip().splitlines()) == 1
    usage = _run([sys.executable, "-m", "sqlalchemy_encrypted", "reencrypt", "--workers", "0"], env)
    assert usage.returncode == 2
