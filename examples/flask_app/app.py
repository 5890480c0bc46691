"""The Flask application: one tenant scope per request.

The clinic comes from the ``X-Clinic-ID`` request header. A real application
takes it from the authenticated user instead; the header keeps the example
short. A ``before_request`` hook opens ``tenant_scope(clinic)`` and a
database session, and a ``teardown_request`` hook closes both, so every
encrypted write and lookup of the request uses that clinic's keys, and a
value of another clinic cannot be decrypted by mistake.

Run it against SQLite and a local key file::

    DATABASE_URL=sqlite:////tmp/clinic.db KMS_URI=local:///tmp/clinic.key \\
        flask --app 'examples.flask_app.app:from_environment()' run
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, g, jsonify, request
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    DecryptionError,
    KeyDestroyedError,
    PlaintextTooLongError,
    ValueTypeError,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import KmsProvider, LocalKms, kms_from_uri

from .models import Base, Patient

__all__ = ["create_app", "from_environment"]

logger = logging.getLogger(__name__)

CLINIC_HEADER = "X-Clinic-ID"
_CLINIC_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def create_app(engine: sa.Engine, kms: KmsProvider) -> Flask:
    """Create the application on ``engine``, with DEKs wrapped by ``kms``."""
    app = Flask(__name__)
    keyring = Keyring(engine, kms)
    keyring.create_table()
    Base.metadata.create_all(engine)
    app.extensions["keyring"] = keyring

    @app.before_request
    def open_tenant_scope() -> None:
        clinic = request.headers.get(CLINIC_HEADER, "")
        if not _CLINIC_ID.match(clinic):
            abort(400, description=f"missing or invalid {CLINIC_HEADER} header")
        scope = contextlib.ExitStack()
        scope.enter_context(tenant_scope(clinic))
        g.clinic = clinic
        g.scope = scope
        g.session = scope.enter_context(Session(engine))

    @app.teardown_request
    def close_tenant_scope(error: BaseException | None) -> None:
        scope = g.pop("scope", None)
        if scope is not None:
            scope.close()

    @app.post("/patients")
    def create_patient() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not body.get("name") or not body.get("email"):
            abort(400, description="a patient needs a JSON body with name and email")
        patient = Patient(
            clinic_id=g.clinic,
            name=body["name"],
            email=body["email"],
            date_of_birth=_parse_date(body.get("date_of_birth")),
            notes=body.get("notes"),
        )
        session: Session = g.session
        session.add(patient)
        try:
            session.commit()
        except sa.exc.IntegrityError:
            session.rollback()
            abort(409, description="a patient with this email already exists in this clinic")
        return jsonify(patient.to_json()), 201

    @app.get("/patients/<int:patient_id>")
    def get_patient(patient_id: int) -> Any:
        patient = _clinic_patients().where(Patient.id == patient_id)
        found = g.session.scalars(patient).one_or_none()
        if found is None:
            abort(404, description="no such patient in this clinic")
        return jsonify(found.to_json())

    @app.get("/patients")
    def find_patients() -> Any:
        email = request.args.get("email")
        if not email:
            abort(400, description="give the email query parameter")
        # The deterministic column turns == into a search for the email's
        # ciphertext under each of the clinic's key versions.
        query = _clinic_patients().where(Patient.email == email).order_by(Patient.id)
        return jsonify([patient.to_json() for patient in g.session.scalars(query)])

    @app.errorhandler(KeyDestroyedError)
    def clinic_erased(error: KeyDestroyedError) -> Any:
        # Raised on reads (StoredKeyDestroyedError) and writes of a clinic
        # whose keys were destroyed by crypto-shredding.
        logger.info("request for erased clinic %s: %s", g.get("clinic"), type(error).__name__)
        return jsonify(error="this clinic's data was erased"), 410

    @app.errorhandler(DecryptionError)
    def undecryptable(error: DecryptionError) -> Any:
        # The message names table, column, tenant and key id, never plaintext,
        # so it is safe to log; the client gets no detail.
        logger.error("could not decrypt a stored value: %s", error)
        return jsonify(error="a stored value could not be decrypted"), 500

    @app.errorhandler(PlaintextTooLongError)
    @app.errorhandler(ValueTypeError)
    def invalid_value(error: Exception) -> Any:
        return jsonify(error=str(error)), 400

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(409)
    def client_error(error: Any) -> Any:
        return jsonify(error=error.description), error.code

    return app


def _clinic_patients() -> sa.Select[tuple[Patient]]:
    # Filtering on the tenant column keeps each clinic to its own rows. The
    # tenant scope is the second line of defence: a row of another clinic
    # that slipped through would fail to decrypt instead of leaking.
    return sa.select(Patient).where(Patient.clinic_id == g.clinic)


def _parse_date(value: object) -> datetime.date | None:
    if value is None:
        return None
    if not isinstance(value, str):
        abort(400, description="date_of_birth must be an ISO date such as 1980-04-30")
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        abort(400, description="date_of_birth must be an ISO date such as 1980-04-30")


def from_environment() -> Flask:
    """Create the application from ``DATABASE_URL`` and ``KMS_URI``.

    A ``KMS_URI`` of the form ``local:///path`` whose key file does not
    exist yet gets a new key file.
    """
    database_url = os.environ.get("DATABASE_URL")
    kms_uri = os.environ.get("KMS_URI")
    if not database_url or not kms_uri:
        raise RuntimeError("set DATABASE_URL and KMS_URI, for example local:///tmp/clinic.key")
    if kms_uri.startswith("local:///") and "?" not in kms_uri:
        path = kms_uri.removeprefix("local://")
        if not os.path.exists(path):
            LocalKms.create(path)
    return create_app(sa.create_engine(database_url), kms_from_uri(kms_uri))
