"""Benchmark the encrypted column types against plain columns, a hand-written
floor and sqlalchemy-utils, on SQLite and PostgreSQL.

Run it by hand from the repository root; it is not part of the test suite.
It needs the ``.venv`` that ``scripts/test.sh`` creates on first use::

    .venv/bin/python benchmarks/bench_columns.py                  # a few minutes
    .venv/bin/python benchmarks/bench_columns.py --db sqlite --rows 2000 --repeats 1
    .venv/bin/python benchmarks/bench_columns.py --pg-url postgresql+psycopg://u@127.0.0.1/db
    .venv/bin/python benchmarks/bench_columns.py --json results.json

Without ``--pg-url`` it starts a private PostgreSQL cluster from the local
server binaries, the way the test suite does. ``docs/performance.md``
describes the method and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sqlite3
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.column_report import (  # noqa: E402
    DatabaseRun,
    describe_environment,
    environment,
    format_report,
    summarize,
)
from benchmarks.column_variants import ALL_VARIANTS, TENANT, Variant, build_variants  # noqa: E402
from sqlalchemy_encrypted import tenant_scope  # noqa: E402

# Lookups run in chunks of this many per variant, interleaved like batches.
LOOKUP_CHUNK = 100

_WORDS = (
    "patient reported mild symptoms after the second visit and was advised to rest "
    "follow up scheduled with the clinic insurance claim pending review allergy noted "
    "no change in medication dosage blood pressure stable lab results within normal range"
).split()


# -- data ----------------------------------------------------------------------


def make_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Generate rows with unique e-mails of about 25 characters in random
    order, 11-character SSNs and notes of about 500 characters."""
    rng = random.Random(seed)
    domains = ("example.com", "mail.example.org", "corp.test", "clinic.example")
    rows = []
    for number in range(count):
        name = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 9)))
        email = f"{name}.{number}@{rng.choice(domains)}"
        ssn = f"{rng.randint(100, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        length = rng.randint(470, 530)
        words: list[str] = []
        while sum(len(word) + 1 for word in words) < length:
            words.append(rng.choice(_WORDS))
        notes = " ".join(words)[:length]
        rows.append({"tenant_id": TENANT, "email": email, "ssn": ssn, "notes": notes})
    return rows


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _rotated(variants: Sequence[Variant], shift: int) -> list[Variant]:
    shift %= len(variants)
    return [*variants[shift:], *variants[:shift]]


# -- steps ---------------------------------------------------------------------
#
# A step runs in rounds: one insert batch, one primary-key range of rows or one
# chunk of lookups. Every variant runs a round before the next round starts,
# in an order rotated from round to round, so that noise from other processes
# on the machine falls on all variants alike. Each step returns the seconds
# of every round per variant.

Rounds = dict[str, list[float]]


def _interleave(
    variants: Sequence[Variant],
    rounds: Sequence[Any],
    shift: int,
    work: Callable[[Variant, Any], None],
) -> Rounds:
    elapsed: Rounds = {variant.name: [] for variant in variants}
    for index, item in enumerate(rounds):
        for variant in _rotated(variants, index + shift):
            start = time.perf_counter()
            work(variant, item)
            elapsed[variant.name].append(time.perf_counter() - start)
    return elapsed


def orm_insert(
    engine: sa.Engine, variants: Sequence[Variant], batches: Sequence[Sequence[Any]], shift: int
) -> Rounds:
    """Insert each batch with ``Session.add_all`` and one commit."""

    def insert_batch(variant: Variant, batch: Sequence[dict[str, Any]]) -> None:
        with Session(engine) as session:
            session.add_all([variant.model(**row) for row in batch])
            session.commit()

    return _interleave(variants, batches, shift, insert_batch)


def core_insert(
    engine: sa.Engine, variants: Sequence[Variant], batches: Sequence[Sequence[Any]], shift: int
) -> Rounds:
    """Insert each batch with Core ``executemany`` in its own transaction."""

    def insert_batch(variant: Variant, batch: Sequence[dict[str, Any]]) -> None:
        with engine.begin() as conn:
            conn.execute(sa.insert(variant.core_table), list(batch))

    return _interleave(variants, batches, shift, insert_batch)


def select_all(
    engine: sa.Engine, variants: Sequence[Variant], rows: int, batch_size: int, shift: int
) -> Rounds:
    """Load every row as an ORM object and read every attribute, one
    primary-key range of ``batch_size`` rows per query."""
    ranges = [(low + 1, min(low + batch_size, rows)) for low in range(0, rows, batch_size)]
    loaded = dict.fromkeys((variant.name for variant in variants), 0)

    def load_range(variant: Variant, bounds: tuple[int, int]) -> None:
        model = variant.model
        statement = sa.select(model).where(model.id.between(*bounds))
        with Session(engine) as session:
            for row in session.scalars(statement).all():
                _ = (row.id, row.tenant_id, row.email, row.ssn, row.notes)
                loaded[variant.name] += 1

    elapsed = _interleave(variants, ranges, shift, load_range)
    for name, count in loaded.items():
        if count != rows:
            raise RuntimeError(f"select_all loaded {count} rows of {name}, expected {rows}")
    return elapsed


def lookup(
    engine: sa.Engine, variants: Sequence[Variant], emails: Sequence[str], shift: int
) -> tuple[Rounds, dict[str, int]]:
    """Find rows by e-mail one at a time and read ssn and notes of each hit.

    Returns the seconds per round and the number of rows found, per variant.
    """
    found = dict.fromkeys((variant.name for variant in variants), 0)

    def look_up_chunk(variant: Variant, chunk: Sequence[str]) -> None:
        model = variant.model
        with Session(engine) as session:
            for email in chunk:
                statement = sa.select(model).where(model.email == email)
                row = session.scalars(statement).one_or_none()
                if row is not None:
                    found[variant.name] += 1
                    _ = (row.ssn, row.notes)

    elapsed = _interleave(variants, _chunks(emails, LOOKUP_CHUNK), shift, look_up_chunk)
    return elapsed, found


# -- one database --------------------------------------------------------------


def run_repeat(
    engine: sa.Engine,
    variants: Sequence[Variant],
    rows: Sequence[dict[str, Any]],
    emails: Sequence[str],
    batch_size: int,
    shift: int,
) -> tuple[dict[str, Rounds], dict[str, int]]:
    """Run the four steps once on newly created tables."""
    metadata = variants[0].orm_table.metadata
    metadata.drop_all(engine)
    metadata.create_all(engine)
    batches = _chunks(rows, batch_size)
    results: dict[str, Rounds] = {}
    with tenant_scope(TENANT):
        gc.collect()
        results["orm_insert"] = orm_insert(engine, variants, batches, shift)
        gc.collect()
        results["core_insert"] = core_insert(engine, variants, batches, shift)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        gc.collect()
        results["select_all"] = select_all(engine, variants, len(rows), batch_size, shift)
        gc.collect()
        results["lookup"], found = lookup(engine, variants, emails, shift)
    return results, found


def run_database(
    database: str,
    version: str,
    engine: sa.Engine,
    variants: Sequence[Variant],
    rows: Sequence[dict[str, Any]],
    args: argparse.Namespace,
) -> DatabaseRun:
    """Run a warm-up on a tenth of the rows, then the timed repeats."""
    rng = random.Random(args.seed + 1)
    emails = [row["email"] for row in rng.sample(list(rows), min(args.lookups, len(rows)))]
    run = DatabaseRun(database=database, version=version, rows=len(rows), lookups=len(emails))

    warmup_rows = rows[: max(len(rows) // 10, min(args.batch, len(rows)))]
    warmup_emails = [row["email"] for row in warmup_rows[: max(len(emails) // 10, 1)]]
    _progress(f"{database}: warm-up on {len(warmup_rows):,} rows")
    run_repeat(engine, variants, warmup_rows, warmup_emails, args.batch, 0)

    for repeat in range(args.repeats):
        _progress(f"{database}: repeat {repeat + 1} of {args.repeats}")
        results, found = run_repeat(engine, variants, rows, emails, args.batch, repeat)
        for step, elapsed in results.items():
            run.record(step, elapsed)
        run.found = found

    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            for variant in variants:
                size = conn.execute(
                    sa.text("SELECT pg_total_relation_size(CAST(:name AS regclass))"),
                    {"name": variant.orm_table.name},
                ).scalar_one()
                run.storage_bytes[variant.name] = int(size)
    for variant in variants:
        cache = getattr(variant.keyring, "cache", None)
        if cache is not None:
            stats = cache.stats
            run.kms_calls[variant.name] = {
                "kms_calls": stats.kms_calls,
                "hits": stats.hits,
                "misses": stats.misses,
            }
    variants[0].orm_table.metadata.drop_all(engine)
    return run


# -- databases -----------------------------------------------------------------


@contextlib.contextmanager
def sqlite_engine(workdir: Path) -> Iterator[tuple[sa.Engine, str]]:
    """Yield an engine on a new SQLite file with the default journal and sync settings."""
    engine = sa.create_engine(f"sqlite:///{workdir / 'bench.db'}")
    try:
        yield engine, f"SQLite {sqlite3.sqlite_version} (file)"
    finally:
        engine.dispose()


@contextlib.contextmanager
def postgres_engine(url: str | None) -> Iterator[tuple[sa.Engine, str]]:
    """Yield an engine on a new schema of ``url``, or of a private cluster
    started here and stopped afterwards."""
    cluster = None
    cluster_root = None
    if url is None:
        from tests import pgcluster

        cluster, cluster_root = pgcluster.start_cluster()
        url = cluster.url
    schema = f"bench_columns_{os.getpid()}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            version = conn.exec_driver_sql("SHOW server_version").scalar_one()
            fsync = conn.exec_driver_sql("SHOW fsync").scalar_one()
        origin = "private cluster" if cluster is not None else "--pg-url"
        engine = sa.create_engine(url, connect_args={"options": f"-c search_path={schema}"})
        try:
            yield engine, f"PostgreSQL {version} ({origin}, fsync={fsync})"
        finally:
            engine.dispose()
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(str(cluster_root), ignore_errors=True)


# -- command line --------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[bench_columns] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time encrypted columns against plain columns, a hand-written AES "
        "TypeDecorator and sqlalchemy-utils on SQLite and PostgreSQL."
    )
    parser.add_argument("--rows", type=int, default=20_000, help="rows per table (default 20000)")
    parser.add_argument(
        "--batch", type=int, default=1_000, help="rows per insert batch and commit (default 1000)"
    )
    parser.add_argument(
        "--lookups", type=int, default=2_000, help="equality lookups by e-mail (default 2000)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats after the warm-up (default 3)"
    )
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--pg-url",
        help="SQLAlchemy URL of a PostgreSQL server to use instead "
        "of a private cluster; the run creates and drops its own schema there",
    )
    parser.add_argument(
        "--variants",
        default=",".join(ALL_VARIANTS),
        help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (plain is always run)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ALL_VARIANTS))
    if unknown:
        parser.error(
            f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}"
        )
    args.variant_names = [
        "plain",
        *[name for name in ALL_VARIANTS if name in names and name != "plain"],
    ]
    for option in ("rows", "batch", "lookups", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = make_rows(args.rows, args.seed)
    databases = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    report: dict[str, Any] = {
        "environment": environment(),
        "config": {
            "rows": args.rows,
            "batch": args.batch,
            "lookups": args.lookups,
            "repeats": args.repeats,
            "seed": args.seed,
            "variants": args.variant_names,
        },
        "databases": {},
    }
    print(describe_environment(report["environment"]), end="\n\n", flush=True)
    started = time.perf_counter()
    for database in databases:
        with tempfile.TemporaryDirectory(prefix="bench-columns-") as folder:
            workdir = Path(folder)
            variants = build_variants(args.variant_names, workdir)
            try:
                opener = (
                    sqlite_engine(workdir) if database == "sqlite" else postgres_engine(args.pg_url)
                )
                with opener as (engine, version):
                    run = run_database(database, version, engine, variants, rows, args)
            finally:
                for variant in variants:
                    variant.close()
        summary = summarize(run)
        summary["variants"] = {variant.name: variant.description for variant in variants}
        report["databases"][database] = summary
        print(format_report(summary), end="\n\n", flush=True)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    _progress(f"finished in {report['wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
