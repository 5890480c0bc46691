"""The quickstart example runs and keeps only ciphertext in its database."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "found by email: Mara Quint <mara@example.test>" in result.stdout
    assert result.stdout.count("stored name: 0101") == 3
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    with sqlite3.connect(tmp_path / "app.db") as connection:
        rows = connection.execute("SELECT name, email FROM customers").fetchall()
    assert len(rows) == 3
    stored = b"".join(bytes(name) + bytes(email) for name, email in rows)
    for plaintext in [b"Mara", b"Tomas", b"Ines", b"example.test"]:
        assert plaintext not in stored


def test_quickstart_cleans_temporary_folder() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "found by email: Mara Quint" in result.stdout
