"""The demo runs without a terminal and its output and database back its claims."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from examples.demo import CLINICS, PATIENTS_PER_CLINIC, ROTATED, SHREDDED, Patient, Visit
from sqlalchemy_encrypted import StoredKeyDestroyedError, tenant_scope
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"
HEADINGS = [
    "Set up: a SQLite database and the local KMS",
    "Write encrypted rows",
    "What the database holds: ciphertext only",
    "Look a patient up by encrypted email",
    "Tenant isolation",
    "Census before rotation",
    f"Rotate the keys of clinic {ROTATED!r}",
    "Re-encrypt the stale values",
    "Census after re-encryption",
    f"Crypto-shred clinic {SHREDDED!r}",
    "Done",
]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    # stdin and stdout are pipes, so the demo runs as it does without a terminal.
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=300,
        check=False,
    )


def sections(output: str) -> dict[str, str]:
    """Split the output into {heading: body} at the underlined numbered headings."""
    parts = re.split(r"^\d+\. (.+)\n=+\n", output, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("demo")
    result = run_demo("--folder", str(folder))
    assert result.returncode == 0, result.stderr
    yield folder, sections(result.stdout)


def stale_total(body: str) -> int:
    match = re.search(r"(\d+) stale values in all", body)
    assert match is not None, body
    return int(match.group(1))


def test_demo_headings_in_order(demo: tuple[Path, dict[str, str]]) -> None:
    _, output = demo

    assert list(output) == HEADINGS


def test_demo_shows_only_ciphertext(demo: tuple[Path, dict[str, str]]) -> None:
    _, output = demo
    body = output["What the database holds: ciphertext only"]

    assert "Searching the database file for 20 patient names and 20 emails: 0 occurrences" in body
    assert re.search(r"^  1 +alderbank +010100", body, flags=re.MULTILINE)


def test_demo_database_holds_no_plaintext(demo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = demo
    with sqlite3.connect(folder / "clinics.db") as connection:
        stored = connection.execute("SELECT name, email, phone FROM patients").fetchall()
        diagnoses = connection.execute("SELECT diagnosis FROM visits").fetchall()

    blob = b"".join(bytes(value) for row in stored + diagnoses for value in row)
    for plaintext in [b"example.test", b"+1 202 555", b"Quint", b"rhinitis", b"ankle"]:
        assert plaintext not in blob


def test_demo_lookup_and_isolation(demo: tuple[Path, dict[str, str]]) -> None:
    _, output = demo

    assert re.search(r"found patient 1: \w+ \w+, born \d{4}-\d\d-\d\d", output[HEADINGS[3]])
    assert "TenantMismatchError" in output["Tenant isolation"]


def test_demo_lookup_sql_readable(demo: tuple[Path, dict[str, str]]) -> None:
    _, output = demo
    lookup = output[HEADINGS[3]]
    rotation = output[HEADINGS[6]]

    assert "POSTCOMPILE" not in "".join(output.values())
    assert "SQL: WHERE patients.email IN (:param_1_1)\n" in lookup
    assert "param_1_1 = <search token key_version=1>" in lookup
    assert "SQL: WHERE patients.email IN (:param_1_1, :param_1_2)\n" in rotation
    assert "param_1_1 = <search token key_version=2>" in rotation
    assert "param_1_2 = <search token key_version=1>" in rotation
    sql_lines = [line for line in (lookup + rotation).splitlines() if "param_1" in line]
    assert not any("@" in line for line in sql_lines)


def test_demo_census_and_reencryption(demo: tuple[Path, dict[str, str]]) -> None:
    _, output = demo
    reencrypt = output["Re-encrypt the stale values"]
    # 4 encrypted columns per patient, and 2 visits with 1 encrypted column each.
    stale_values = PATIENTS_PER_CLINIC * 6

    assert stale_total(output["Census before rotation"]) == 0
    assert stale_total(output[HEADINGS[6]]) == stale_values
    assert f"{stale_values}/{stale_values} values" in reencrypt
    assert f"succeeded: {stale_values} values re-encrypted" in reencrypt
    assert "\r" not in reencrypt
    assert stale_total(output["Census after re-encryption"]) == 0
    assert re.search(
        rf"^  {ROTATED} +2 +active +{stale_values}$",
        reencrypt + output["Census after re-encryption"],
        flags=re.MULTILINE,
    )
    assert "lookup by email after rotation: found patient 1" in output[HEADINGS[8]]


def test_demo_shred_table(demo: tuple[Path, dict[str, str]]) -> None:
    _, output = demo
    body = output[HEADINGS[9]]

    for clinic in CLINICS:
        readable, unreadable = (0, 40) if clinic == SHREDDED else (40, 0)
        assert re.search(rf"^  {clinic} +{readable} +{unreadable}$", body, flags=re.MULTILINE)
    assert "StoredKeyDestroyedError" in body


def test_demo_keyring_state(demo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = demo
    with sqlite3.connect(folder / "clinics.db") as connection:
        rows = connection.execute(
            "SELECT tenant_id, key_version, state, wrapped_dek IS NULL FROM encryption_keys"
        ).fetchall()

    states = sorted({(tenant, version, state, bool(gone)) for tenant, version, state, gone in rows})
    assert states == [
        (ROTATED, 1, "retired", False),
        (ROTATED, 2, "active", False),
        ("brightwater", 1, "active", False),
        (SHREDDED, 1, "destroyed", True),
    ]


def test_demo_database_reads_back(demo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = demo
    engine = sa.create_engine(f"sqlite:///{folder / 'clinics.db'}")
    Keyring(engine, LocalKms(folder / "master.key"))

    with Session(engine) as session:
        for clinic in CLINICS:
            query = sa.select(Patient).where(Patient.clinic_id == clinic)
            if clinic == SHREDDED:
                with pytest.raises(StoredKeyDestroyedError):
                    session.scalars(query).all()
                continue
            patients = session.scalars(query).all()
            visits = session.scalars(sa.select(Visit).where(Visit.clinic_id == clinic)).all()
            assert len(patients) == PATIENTS_PER_CLINIC
            assert all(p.email.endswith("@example.test") for p in patients)
            assert len(visits) == 2 * PATIENTS_PER_CLINIC
        first = session.scalars(sa.select(Patient).where(Patient.clinic_id == ROTATED)).first()
        assert first is not None
        with tenant_scope(ROTATED):
            found = session.scalars(sa.select(Patient.id).where(Patient.email == first.email))
            assert found.all() == [first.id]
    engine.dispose()


def test_demo_default_folder() -> None:
    result = run_demo()

    assert result.returncode == 0, result.stderr
    match = re.search(r"^  folder: +(\S+)$", result.stdout, flags=re.MULTILINE)
    assert match is not None
    folder = Path(match.group(1))
    try:
        assert folder.parent == Path(tempfile.gettempdir())
        assert (folder / "clinics.db").is_file()
        assert f"rm -r {folder}" in result.stdout
    finally:
        shutil.rmtree(folder)


def test_demo_rejects_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("data")

    result = run_demo("--folder", str(tmp_path))

    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["keep.txt"]
