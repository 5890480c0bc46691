"""The AWS KMS rotation walkthrough, run against moto's server and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from sqlalchemy_encrypted import parse_header

from .test_examples_alembic import subprocess_url

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "examples" / "aws_rotation" / "walkthrough.sh"
REGION = "us-east-1"
ROTATED, OTHER = "acme-payroll", "birch-dental"


@pytest.fixture
def key_arn(moto_server: str) -> str:
    client = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return str(client.create_key(Description="walkthrough KEK")["KeyMetadata"]["Arn"])


def run_walkthrough(engine: sa.Engine, moto_server: str, key_arn: str) -> str:
    environment = {
        **os.environ,
        "PYTHON": sys.executable,
        "SQLALCHEMY_ENCRYPTED_URL": subprocess_url(engine),
        "SQLALCHEMY_ENCRYPTED_KMS": (
            f"aws-kms://{key_arn}?region={REGION}&endpoint_url={moto_server}"
        ),
        "SQLALCHEMY_ENCRYPTED_ACTIVE_KEY_TTL": "0",
        "RETIRE_WAIT": "0",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    result = subprocess.run(
        ["bash", str(WALKTHROUGH)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def step(output: str, number: int) -> str:
    """Return the output of one numbered step of the walkthrough."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", output, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, f"step {number} missing"
    return match.group(0)


def test_aws_rotation_walkthrough(pg_engine: sa.Engine, moto_server: str, key_arn: str) -> None:
    # One test, because the walkthrough takes about a dozen processes to run.
    output = run_walkthrough(pg_engine, moto_server, key_arn)

    check_steps(output)
    check_keyring(pg_engine, key_arn)
    check_values(pg_engine)


def check_steps(walkthrough: str) -> None:
    assert "version 2 is pending" in step(walkthrough, 3)
    assert f"tenant '{ROTATED}': randomized key version 2 is active" in step(walkthrough, 4)
    assert "9 value(s) under an old key version" in step(walkthrough, 5)
    assert f"key version 1 of tenant '{ROTATED}'" in step(walkthrough, 6)
    assert "stopped being the active version" in step(walkthrough, 6)
    assert f"cannot retire key version 1 of tenant '{ROTATED}'" in step(walkthrough, 7)
    assert "still use it" in step(walkthrough, 7)
    assert "re-encrypted 9 value(s)" in step(walkthrough, 8)
    assert "no value is under an old key version" in step(walkthrough, 8)
    assert f"tenant '{ROTATED}': randomized key version 1 retired" in step(walkthrough, 9)
    assert f"{ROTATED}: 5 accounts read, each found by its email" in step(walkthrough, 10)
    assert f"{OTHER}: 5 accounts read, each found by its email" in step(walkthrough, 10)


def check_keyring(pg_engine: sa.Engine, key_arn: str) -> None:
    with pg_engine.connect() as connection:
        keys = connection.exec_driver_sql(
            "SELECT tenant_id, purpose, key_version, state, kms_provider, kek_id "
            "FROM encryption_keys ORDER BY tenant_id, purpose, key_version"
        ).all()

    assert {(row.kms_provider, row.kek_id) for row in keys} == {("aws-kms", key_arn)}
    assert [(row.tenant_id, row.key_version, row.state) for row in keys] == [
        (ROTATED, 1, "retired"),
        (ROTATED, 2, "active"),
        (ROTATED, 1, "retired"),
        (ROTATED, 2, "active"),
        (OTHER, 1, "active"),
        (OTHER, 1, "active"),
    ]


def check_values(pg_engine: sa.Engine) -> None:
    with pg_engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT tenant_id, holder, email, iban FROM accounts ORDER BY id"
        ).all()

    versions = {
        (tenant, parse_header(bytes(value)).key_version)
        for tenant, *values in rows
        for value in values
    }
    assert versions == {(ROTATED, 2), (OTHER, 1)}
    assert len(rows) == 10
