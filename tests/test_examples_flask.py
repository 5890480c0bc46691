"""The Flask example: one tenant scope per request, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask, g
from flask.testing import FlaskClient

from examples.flask_app import create_app
from examples.flask_app.app import from_environment
from examples.flask_app.models import Patient
from sqlalchemy_encrypted import TenantMismatchError, tenancy
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.pytest_plugin import assert_encrypted_at_rest

NORTH = {"X-Clinic-ID": "north"}
SOUTH = {"X-Clinic-ID": "south"}

PATIENT = {
    "name": "Edda Marlowe",
    "email": "edda.marlowe@example.test",
    "date_of_birth": "1984-02-29",
    "notes": "allergic to penicillin",
}


@pytest.fixture
def app(engine: sa.Engine, local_kms: LocalKms) -> Iterator[Flask]:
    application = create_app(engine, local_kms)
    application.config["TESTING"] = True
    yield application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_create_and_read_patient(client: FlaskClient) -> None:
    created = client.post("/patients", json=PATIENT, headers=NORTH)
    assert created.status_code == 201
    patient_id = created.get_json()["id"]

    read = client.get(f"/patients/{patient_id}", headers=NORTH)

    assert read.status_code == 200
    assert read.get_json() == {"id": patient_id, **PATIENT}


def test_stored_values_are_ciphertext(client: FlaskClient, engine: sa.Engine) -> None:
    client.post("/patients", json=PATIENT, headers=NORTH)

    with engine.connect() as connection:
        for column, plaintext in [
            (Patient.name, PATIENT["name"]),
            (Patient.email, PATIENT["email"]),
            (Patient.notes, PATIENT["notes"]),
            (Patient.date_of_birth, "1984"),
        ]:
            headers = assert_encrypted_at_rest(connection, column, [plaintext])
            assert len(headers) == 1


def test_lookup_by_email_stays_in_clinic(client: FlaskClient) -> None:
    north = client.post("/patients", json=PATIENT, headers=NORTH).get_json()
    south_patient = {**PATIENT, "name": "Edda Marlowe-Ruiz", "notes": None}
    south = client.post("/patients", json=south_patient, headers=SOUTH).get_json()

    found_north = client.get("/patients", query_string={"email": PATIENT["email"]}, headers=NORTH)
    found_south = client.get("/patients", query_string={"email": PATIENT["email"]}, headers=SOUTH)

    assert found_north.get_json() == [north]
    assert found_south.get_json() == [south]


def test_lookup_of_unknown_email_is_empty(client: FlaskClient) -> None:
    client.post("/patients", json=PATIENT, headers=NORTH)

    found = client.get("/patients", query_string={"email": "nobody@example.test"}, headers=NORTH)

    assert found.status_code == 200
    assert found.get_json() == []


def test_other_clinic_gets_not_found(client: FlaskClient) -> None:
    patient_id = client.post("/patients", json=PATIENT, headers=NORTH).get_json()["id"]

    response = client.get(f"/patients/{patient_id}", headers=SOUTH)

    assert response.status_code == 404


def test_duplicate_email_in_clinic_conflicts(client: FlaskClient) -> None:
    assert client.post("/patients", json=PATIENT, headers=NORTH).status_code == 201

    again = client.post("/patients", json=PATIENT, headers=NORTH)

    assert again.status_code == 409


@pytest.mark.parametrize("headers", [{}, {"X-Clinic-ID": ""}, {"X-Clinic-ID": "North Side"}])
def test_missing_or_invalid_clinic_rejected(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.get("/patients", query_string={"email": "a@example.test"}, headers=headers)

    assert response.status_code == 400
    assert "X-Clinic-ID" in response.get_json()["error"]


def test_invalid_bodies_rejected(client: FlaskClient) -> None:
    missing_email = client.post("/patients", json={"name": "Edda"}, headers=NORTH)
    bad_date = client.post("/patients", json={**PATIENT, "date_of_birth": "29/02"}, headers=NORTH)
    too_long = client.post("/patients", json={**PATIENT, "name": "x" * 201}, headers=NORTH)

    assert missing_email.status_code == 400
    assert bad_date.status_code == 400
    assert too_long.status_code == 400
    assert "x" * 201 not in too_long.get_data(as_text=True)


def test_scope_ends_with_request(client: FlaskClient) -> None:
    client.post("/patients", json=PATIENT, headers=NORTH)
    client.get("/patients/1", headers=SOUTH)

    assert tenancy.scoped_tenant() is None


def test_shredded_clinic_is_gone(app: Flask, client: FlaskClient) -> None:
    north_id = client.post("/patients", json=PATIENT, headers=NORTH).get_json()["id"]
    south_id = client.post("/patients", json=PATIENT, headers=SOUTH).get_json()["id"]
    keyring: Keyring = app.extensions["keyring"]

    keyring.shred("north")

    assert client.get(f"/patients/{north_id}", headers=NORTH).status_code == 410
    assert client.post("/patients", json=PATIENT, headers=NORTH).status_code == 410
    south = client.get(f"/patients/{south_id}", headers=SOUTH)
    assert south.status_code == 200
    assert south.get_json()["name"] == PATIENT["name"]


def test_app_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "clinic.key"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'clinic.db'}")
    monkeypatch.setenv("KMS_URI", f"local://{key_file}")

    client = from_environment().test_client()
    created = client.post("/patients", json=PATIENT, headers=NORTH)

    assert created.status_code == 201
    assert key_file.is_file()
    assert client.get("/patients/1", headers=NORTH).get_json()["name"] == PATIENT["name"]


def test_app_from_environment_needs_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("KMS_URI", raising=False)

    with pytest.raises(RuntimeError, match="DATABASE_URL and KMS_URI"):
        from_environment()


def test_unfiltered_read_fails_in_scope(app: Flask, client: FlaskClient) -> None:
    north_id = client.post("/patients", json=PATIENT, headers=NORTH).get_json()["id"]

    # A handler that forgot the clinic filter, inside a request of clinic south.
    with app.test_request_context(headers=SOUTH):
        app.preprocess_request()
        try:
            with pytest.raises(TenantMismatchError):
                g.session.get(Patient, north_id)
        finally:
            app.do_teardown_request()

    assert tenancy.scoped_tenant() is None
