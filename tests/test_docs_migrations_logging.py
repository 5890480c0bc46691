"""The logger section that docs/migrations.md adds to the alembic.ini of `alembic init`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "migrations.md"
INIT_LOGGERS = "[loggers]\nkeys = root,sqlalchemy,alembic\n"

# What env.py does: import alembic_ext, then fileConfig(). Each library
# logger then writes one record.
LOG_LINES = """
import logging
import sys
from logging.config import fileConfig

import alembic_ext  # noqa: F401

fileConfig(sys.argv[1])
logging.getLogger("sqlalchemy_encrypted.alembic").info("progress line")
logging.getLogger("sqlalchemy_encrypted.audit").info("conversion report")
logging.getLogger("sqlalchemy_encrypted").warning("library warning")
"""


def _init_ini(tmp_path: Path) -> str:
    """Return the alembic.ini text that `alembic init` writes."""
    config = Config(str(tmp_path / "alembic.ini"))
    command.init(config, str(tmp_path / "migrations"))
    return (tmp_path / "alembic.ini").read_text(encoding="utf-8")


def _stderr_with(ini_text: str, tmp_path: Path) -> str:
    path = tmp_path / "logging.ini"
    path.write_text(ini_text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", LOG_LINES, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stderr


def test_init_ini_hides_library_lines(tmp_path: Path) -> None:
    init_ini = _init_ini(tmp_path)
    assert INIT_LOGGERS in init_ini

    stderr = _stderr_with(init_ini, tmp_path)

    assert "progress line" not in stderr
    assert "conversion report" not in stderr
    assert "library warning" not in stderr


def test_documented_section_shows_library_lines(tmp_path: Path) -> None:
    blocks = re.findall(r"^```ini\n(.*?)^```", PAGE.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) == 1
    ini_text = _init_ini(tmp_path).replace(INIT_LOGGERS, "") + "\n" + blocks[0]

    stderr = _stderr_with(ini_text, tmp_path)

    assert "INFO  [sqlalchemy_encrypted.alembic] progress line" in stderr
    assert "INFO  [sqlalchemy_encrypted.audit] conversion report" in stderr
    assert "WARNI [sqlalchemy_encrypted] library warning" in stderr
