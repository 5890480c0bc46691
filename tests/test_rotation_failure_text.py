"""What a re-encryption slot stopped by a database error stores and shows.

The full text of a database error lists the SQL statement, its parameters
(ciphertexts and primary keys), and PostgreSQL's DETAIL line, which can
quote the values of a row. The slot's ``error`` column, which ``status``
prints, keeps only the exception class, the database's primary message and
the SQLSTATE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from sqlalchemy_encrypted.cli import cli
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

from .rotation_support import Base, fill_persons, raw_values

MODELS = "tests.rotation_support:Base"
# Text that the trigger puts into PostgreSQL's DETAIL and HINT lines.
DETAIL_MARKER = "Failing row contains"
HINT_MARKER = "private hint"

REJECT_UPDATES = f"""
CREATE FUNCTION reject_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'updates of persons are blocked'
        USING DETAIL = '{DETAIL_MARKER} (' || NEW.id || ', ' || NEW.tenant_id || ')',
              HINT = '{HINT_MARKER}';
END $$;
CREATE TRIGGER reject_update BEFORE UPDATE ON persons
    FOR EACH ROW EXECUTE FUNCTION reject_update();
"""


def _url_with_schema(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    url = engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def _run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def _slots(env: dict[str, str]) -> list[dict[str, Any]]:
    result = _run(env, "status", "--json")
    assert result.exit_code == 0, result.output
    slots: list[dict[str, Any]] = json.loads(result.stdout)["jobs"]
    return slots


def test_failed_slot_error_omits_statement(
    pg_engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_path = tmp_path / "master.key"
    keyring = Keyring(pg_engine, LocalKms.create(key_path), active_key_ttl=0)
    keyring.create_table()
    Base.metadata.create_all(pg_engine)
    fill_persons(pg_engine, 10)
    keyring.rotate("t-acme", activate_now=True)
    keyring.rotate("t-globex", activate_now=True)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(REJECT_UPDATES)
    stored = raw_values(pg_engine, "persons", "name")
    env = {
        "SQLALCHEMY_ENCRYPTED_URL": _url_with_schema(pg_engine),
        "SQLALCHEMY_ENCRYPTED_KMS": f"local://{key_path}",
        "SQLALCHEMY_ENCRYPTED_MODELS": MODELS,
    }

    with caplog.at_level(logging.ERROR, logger="sqlalchemy_encrypted.rotation"):
        failed = _run(env, "reencrypt", "--table", "persons")

    assert failed.exit_code != 0, failed.output
    (slot,) = [slot for slot in _slots(env) if slot["status"] == "failed"]
    expected = "ProgrammingError: updates of persons are blocked (SQLSTATE P0001)"
    assert slot["error"] == expected
    text = _run(env, "status").output
    assert expected in text
    logged = [record.getMessage() for record in caplog.records]
    assert any(expected in message for message in logged)
    for output in (json.dumps(slot), text, *logged):
        assert "UPDATE persons" not in output
        assert "RETURNING" not in output
        assert "[SQL" not in output
        assert "parameters" not in output
        assert "DETAIL" not in output
        assert DETAIL_MARKER not in output
        assert HINT_MARKER not in output
        for value in stored.values():
            assert value is not None
            assert value.hex() not in output
            assert repr(value)[2:40] not in output
    assert raw_values(pg_engine, "persons", "name") == stored
