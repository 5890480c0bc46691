"""The whole key lifecycle on a small multi-tenant database, with no service.

``scripts/demo.sh`` runs this program. It creates a SQLite database and a
local KMS key file in a new folder (or in ``--folder``), fills a clinic
schema with invented patients of three clinics, and then shows, section by
section: what the database stores, a lookup by encrypted email, tenant
isolation, a key rotation with re-encryption and the census before and
after, and the crypto-shredding of one clinic.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import tempfile
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_encrypted import (
    DeterministicEncrypted,
    Encrypted,
    StoredKeyDestroyedError,
    TenantMismatchError,
    parse_header,
    tenant_scope,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import LocalKms
from sqlalchemy_encrypted.rotation import (
    Census,
    ReencryptionJob,
    ReencryptionProgress,
    census,
    retire_key_version,
)

CLINICS = ["alderbank", "brightwater", "corvid-bay"]
PATIENTS_PER_CLINIC = 40
ROTATED = "alderbank"
SHREDDED = "corvid-bay"

FIRST_NAMES = [
    "Mara", "Tomas", "Ines", "Jonas", "Edda", "Rhea", "Bruno", "Carla", "Nils", "Selma",
    "Oskar", "Lina", "Piet", "Greta", "Anouk", "Levi", "Marit", "Ivo", "Tilde", "Emre",
]  # fmt: skip
LAST_NAMES = [
    "Quint", "Ekberg", "Duarte", "Feld", "Marlowe", "Solberg", "Stahl", "Moss", "Varga",
    "Lindqvist", "Okafor", "Brandt", "Haddad", "Novak", "Ferreira", "Aalto", "Kowal",
]  # fmt: skip
DIAGNOSES = [
    "seasonal allergic rhinitis", "sprained left ankle", "iron deficiency anaemia",
    "tension headache", "type 2 diabetes, stable", "acute bronchitis", "mild hypertension",
]  # fmt: skip


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (
        sa.UniqueConstraint("clinic_id", "email"),
        {"info": {"tenant_column": "clinic_id"}},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str] = mapped_column(sa.String(40), index=True)
    name: Mapped[str] = mapped_column(Encrypted(sa.String(200)))
    email: Mapped[str] = mapped_column(DeterministicEncrypted(sa.String(254)))
    phone: Mapped[str | None] = mapped_column(Encrypted(sa.String(40)))
    date_of_birth: Mapped[datetime.date | None] = mapped_column(Encrypted(sa.Date))


class Visit(Base):
    __tablename__ = "visits"
    __table_args__ = {"info": {"tenant_column": "clinic_id"}}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    clinic_id: Mapped[str] = mapped_column(sa.String(40), index=True)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"))
    visited_on: Mapped[datetime.date]
    diagnosis: Mapped[str] = mapped_column(Encrypted(sa.Text))


# -- output -----------------------------------------------------------------------

_section_number = 0


def section(title: str) -> None:
    global _section_number
    _section_number += 1
    heading = f"{_section_number}. {title}"
    print(f"\n{heading}\n{'=' * len(heading)}")


def table(headings: list[str], rows: Iterable[Iterable[object]]) -> None:
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(text) for text in column) for column in zip(headings, *cells, strict=True)]
    for row in [headings, ["-" * width for width in widths], *cells]:
        line = "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))
        print("  " + line.rstrip())


def show_error(exc: Exception) -> None:
    wrapped = textwrap.wrap(f"{type(exc).__name__}: {exc}", width=88)
    print("\n".join("    " + line for line in wrapped))


class ProgressBar:
    """Re-encryption progress bar, redrawn in place on a terminal and printed
    as one line per quarter otherwise (for logs and tests)."""

    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self.longest = 0
        self.next_quarter = 1

    def __call__(self, progress: ReencryptionProgress) -> None:
        planned = max(progress.values_planned, 1)
        done = min(progress.values_reencrypted, planned)
        filled = self.WIDTH * done // planned
        line = (
            f"  [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{planned} values "
            f"({progress.table}, {progress.elapsed:.1f} s)"
        )
        if self.interactive:
            # Pad to the longest line so far, so that no tail of it is left.
            self.longest = max(self.longest, len(line))
            print("\r" + line.ljust(self.longest), end="", file=self.stream, flush=True)
        elif done * 4 >= self.next_quarter * planned:
            print(line, file=self.stream)
            self.next_quarter = done * 4 // planned + 1

    def finish(self) -> None:
        if self.interactive:
            print(file=self.stream)


def show_census(result: Census) -> None:
    """Print the census summed over the encrypted columns, per clinic and key version."""
    totals: dict[tuple[str, int, str], tuple[int, int]] = {}
    for entry in result:
        key = (entry.tenant_id or "?", entry.key_version, entry.key_state)
        values, stale = totals.get(key, (0, 0))
        totals[key] = (values + entry.count, stale + (entry.count if entry.stale else 0))
    rows = [
        (clinic, version, state, values, stale or "")
        for (clinic, version, state), (values, stale) in sorted(totals.items())
    ]
    table(["clinic", "key version", "key state", "values", "stale"], rows)
    print(f"  {len(result.columns)} encrypted columns, {result.stale_total} stale values in all")


# -- data ---------------------------------------------------------------------------


def invented_patients(clinic: str, rng: random.Random) -> list[Patient]:
    patients: list[Patient] = []
    used: set[str] = set()
    while len(patients) < PATIENTS_PER_CLINIC:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        email = f"{first}.{last}@example.test".lower()
        if email in used:
            continue
        used.add(email)
        birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 65))
        patients.append(
            Patient(
                clinic_id=clinic,
                name=f"{first} {last}",
                email=email,
                # 555-01xx numbers are reserved for fiction in North America.
                phone=f"+1 202 555 01{rng.randrange(100):02d}",
                date_of_birth=birth,
            )
        )
    return patients


def fill(engine: sa.Engine) -> dict[str, int]:
    rng = random.Random(20240229)
    counts = {}
    with Session(engine) as session:
        for clinic in CLINICS:
            patients = invented_patients(clinic, rng)
            session.add_all(patients)
            session.flush()
            first_day = datetime.date(2024, 1, 2)
            visits = [
                Visit(
                    clinic_id=clinic,
                    patient_id=patient.id,
                    visited_on=first_day + datetime.timedelta(days=rng.randrange(300)),
                    diagnosis=rng.choice(DIAGNOSES),
                )
                for patient in patients
                for _ in range(2)
            ]
            session.add_all(visits)
            counts[clinic] = len(patients)
        session.commit()
    return counts


# -- the walkthrough -------------------------------------------------------------


def set_up(folder: Path) -> tuple[sa.Engine, Keyring]:
    section("Set up: a SQLite database and the local KMS")
    database = folder / "clinics.db"
    key_file = folder / "master.key"
    engine = sa.create_engine(f"sqlite:///{database}")
    kms = LocalKms.create(key_file)
    keyring = Keyring(engine, kms)
    keyring.create_table()
    Base.metadata.create_all(engine)
    for clinic in CLINICS:
        # SQLite allows one writing transaction at a time, so the clinics'
        # first DEKs are created before the inserts that use them.
        keyring.provision(clinic)
    print(f"  folder:    {folder}")
    print(f"  database:  {database.name} (tables patients, visits, {keyring.table.name})")
    print(f"  KEK:       {key_file.name}, {kms.kek_id}")
    dek_count = len(keyring.list_keys())
    print(f"  DEKs:      {dek_count}, a randomized and a deterministic one per clinic")
    return engine, keyring


def write_rows(engine: sa.Engine) -> None:
    section("Write encrypted rows")
    counts = fill(engine)
    for clinic, count in counts.items():
        print(f"  {clinic}: {count} patients, {2 * count} visits")
    print("  Encrypted columns: patients.name, .phone, .date_of_birth (AES-256-GCM),")
    print("  patients.email (AES-256-SIV, searchable), visits.diagnosis (AES-256-GCM).")


def show_ciphertext(engine: sa.Engine, folder: Path) -> None:
    section("What the database holds: ciphertext only")
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT id, clinic_id, hex(substr(name, 1, 24)), hex(substr(name, 25, 12)), "
            "length(name), hex(substr(email, 25, 12)) FROM patients ORDER BY id LIMIT 3"
        ).all()
        first_name = connection.exec_driver_sql(
            "SELECT name FROM patients WHERE id = 1"
        ).scalar_one()
    print("  SELECT id, clinic_id, name, email FROM patients  -- raw SQL, first 3 rows")
    table(
        ["id", "clinic", "name: header (24 bytes)", "name: ciphertext...", "bytes", "email..."],
        [
            (row[0], row[1], row[2].lower(), f"{row[3].lower()}...", row[4], f"{row[5].lower()}...")
            for row in rows
        ],
    )
    header = parse_header(bytes(first_name))
    print(
        f"  Header of patient 1's name: format 1, {header.algorithm.name}, "
        f"key id {header.key_id}, key version {header.key_version}"
    )

    with Session(engine) as session:
        names = list(session.scalars(sa.select(Patient.name).limit(20)))
        emails = list(session.scalars(sa.select(Patient.email).limit(20)))
    database_bytes = (folder / "clinics.db").read_bytes()
    found = sum(database_bytes.count(text.encode()) for text in [*names, *emails])
    print(
        f"  Searching the database file for 20 patient names and 20 emails: "
        f"{found} occurrences ({len(database_bytes)} bytes scanned)"
    )


def look_up(engine: sa.Engine) -> str:
    section("Look a patient up by encrypted email")
    with Session(engine) as session:
        email = session.scalars(
            sa.select(Patient.email).where(Patient.clinic_id == ROTATED).order_by(Patient.id)
        ).first()
    assert email is not None
    query = sa.select(Patient).where(Patient.email == email)
    print(f"  with tenant_scope({ROTATED!r}):  select(Patient).where(Patient.email == {email!r})")
    show_lookup_sql(query)
    with tenant_scope(ROTATED), Session(engine) as session:
        patient = session.scalars(query).one()
        print(f"  found patient {patient.id}: {patient.name}, born {patient.date_of_birth}")
    print("  The email is sealed under the clinic's deterministic key and compared as bytes.")
    return email


def show_lookup_sql(query: sa.Select[Any]) -> None:
    """Print the WHERE clause of a lookup of the rotated clinic and its parameters.

    The comparison becomes an IN over one search token per decryptable key
    version, so the tokens exist only inside the tenant's scope.
    render_postcompile writes one placeholder per token where SQLAlchemy
    would otherwise print its internal __[POSTCOMPILE_...] marker.
    """
    with tenant_scope(ROTATED):
        compiled = query.compile(compile_kwargs={"render_postcompile": True})
    print(f"  SQL: {str(compiled).splitlines()[-1].strip()}")
    for name, value in compiled.params.items():
        print(f"    {name} = {value!r}")


def show_isolation(engine: sa.Engine) -> None:
    section("Tenant isolation")
    other = CLINICS[1]
    with tenant_scope(other), Session(engine) as session:
        try:
            session.get(Patient, 1)
        except TenantMismatchError as exc:
            print(f"  with tenant_scope({other!r}), reading patient 1 of {ROTATED!r} raises")
            show_error(exc)


def rotate_and_reencrypt(engine: sa.Engine, keyring: Keyring, email: str) -> None:
    section("Census before rotation")
    show_census(census(engine, Base.metadata))

    section(f"Rotate the keys of clinic {ROTATED!r}")
    for info in keyring.rotate(ROTATED, activate_now=True):
        print(f"  new {info.purpose.value} key: version {info.version}, state {info.state.value}")
    print("  New writes use version 2. Values under version 1 still decrypt.")
    print("  A lookup by email now matches the value under both versions:")
    show_lookup_sql(sa.select(Patient).where(Patient.email == email))
    show_census(census(engine, Base.metadata))

    section("Re-encrypt the stale values")
    bar = ProgressBar()
    job = ReencryptionJob(engine, Base.metadata, tenants=[ROTATED], batch_size=20, progress=bar)
    result = job.run()
    bar.finish()
    result.raise_for_failures()
    print(
        f"  {result.status}: {result.values_reencrypted} values re-encrypted in "
        f"{result.rows_scanned} rows, {result.passes} pass(es), {result.elapsed:.1f} s"
    )

    section("Census after re-encryption")
    show_census(census(engine, Base.metadata))
    # Other processes may cache version 1 as active for their active_key_ttl
    # after the rotation, so retiring waits that long plus a margin by
    # default. This demo is the only process using the keyring, and its
    # rotation ended its own cached lookups, so it need not wait.
    retired = retire_key_version(engine, Base.metadata, keyring, ROTATED, 1, min_inactive_seconds=0)
    for info in retired:
        print(f"  retired {info.purpose.value} key version {info.version} of {ROTATED!r}")
    print("  The census found no value under version 1, so it could be retired.")
    with tenant_scope(ROTATED), Session(engine) as session:
        patient = session.scalars(sa.select(Patient).where(Patient.email == email)).one()
    print(f"  lookup by email after rotation: found patient {patient.id}, {patient.name}")


def shred(engine: sa.Engine, keyring: Keyring) -> None:
    section(f"Crypto-shred clinic {SHREDDED!r}")
    destroyed = keyring.shred(SHREDDED)
    print(f"  destroyed {destroyed} keys of {SHREDDED!r}; its rows stay, unreadable")
    rows = []
    with Session(engine) as session:
        for clinic in CLINICS:
            ids = session.scalars(sa.select(Patient.id).where(Patient.clinic_id == clinic))
            readable = unreadable = 0
            for patient_id in ids.all():
                try:
                    with Session(engine) as reader:
                        reader.get(Patient, patient_id)
                    readable += 1
                except StoredKeyDestroyedError:
                    unreadable += 1
            rows.append((clinic, readable, unreadable))
    table(["clinic", "readable patients", "unreadable patients"], rows)
    with Session(engine) as session:
        query = sa.select(Patient.id).where(Patient.clinic_id == SHREDDED).limit(1)
        shredded_id = session.scalars(query).one()
        try:
            session.get(Patient, shredded_id)
        except StoredKeyDestroyedError as exc:
            print(f"  reading patient {shredded_id} of {SHREDDED!r} raises")
            show_error(exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folder",
        type=Path,
        help="empty or new folder for the database and key file (default: a new temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.folder is None:
        folder = Path(tempfile.mkdtemp(prefix="sqlalchemy-encrypted-demo-"))
    else:
        folder = args.folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            parser.error(f"folder {folder} is not empty")

    engine, keyring = set_up(folder)
    write_rows(engine)
    show_ciphertext(engine, folder)
    email = look_up(engine)
    show_isolation(engine)
    rotate_and_reencrypt(engine, keyring, email)
    shred(engine, keyring)
    engine.dispose()

    section("Done")
    print(f"  The database and key file are in {folder}")
    print(f"  Inspect them with: sqlite3 {folder / 'clinics.db'} 'SELECT * FROM encryption_keys'")
    print(f"  Remove them with:  rm -r {folder}")


if __name__ == "__main__":
    main()
