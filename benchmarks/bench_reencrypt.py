"""Benchmark re-encryption on PostgreSQL against a plain batched UPDATE.

Run it by hand from the repository root (the test suite only runs it on a few rows)::

    scripts/test.sh --co -q >/dev/null      # once, to create .venv
    .venv/bin/python benchmarks/bench_reencrypt.py
    .venv/bin/python benchmarks/bench_reencrypt.py --rows 20000 --memory-sizes 10000,50000
    .venv/bin/python benchmarks/bench_reencrypt.py --pg-url postgresql+psycopg://u@127.0.0.1/db

Without ``--pg-url`` it starts a private PostgreSQL cluster from the local
server binaries, as the test suite does.

Throughput: a table of ``--rows`` rows with three encrypted columns (a
deterministic e-mail, a randomized SSN and a randomized note of about 500
characters) over ``--tenants`` tenants is rotated, then

* ``plain_executemany``: pages through the table by primary key and writes
  every row back with the same bytes, one ``UPDATE ... WHERE id = :id`` per
  row sent through SQLAlchemy's executemany (psycopg pipelines them), each
  batch in its own transaction: the batched UPDATE an application would
  write;
* ``plain_arrays``: the same rewrite as one ``UPDATE ... FROM unnest(...)``
  per batch with binary array parameters, the statement form the job uses
  on PostgreSQL, without its compare-and-swap conditions;
* ``reencrypt``: ``ReencryptionJob.run()``, census before and after included.

The table is vacuumed before each measured run, and each run is repeated
``--repeat`` times (after a rotation, for the job), keeping the median.

Memory: for each size in ``--memory-sizes`` a fresh table is filled, and a
child process runs the job under ``tracemalloc`` and reports its Python heap
peak and its peak RSS. Figures that do not grow with the size show that the
job's memory is bounded by the batch size, not by the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted  # noqa: E402
from sqlalchemy_encrypted.keyring import Keyring  # noqa: E402
from sqlalchemy_encrypted.kms import LocalKms  # noqa: E402
from sqlalchemy_encrypted.rotation import ReencryptionJob  # noqa: E402

TABLE = "bench_people"
FILL_CHUNK = 5000
ENCRYPTED = ("email", "ssn", "notes")

_WORDS = (
    "patient reported mild symptoms after the second visit and was advised to rest "
    "follow up scheduled with the clinic insurance claim pending review allergy noted"
).split()


def define_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("email", DeterministicEncrypted(sa.String(254))),
        sa.Column("ssn", Encrypted(sa.String(11))),
        sa.Column("notes", Encrypted(sa.Text())),
        info={"tenant_column": "tenant_id"},
    )


def make_rows(start: int, count: int, tenants: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for number in range(start, start + count):
        name = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 9)))
        notes = " ".join(rng.choices(_WORDS, k=70))[: rng.randint(470, 530)]
        rows.append(
            {
                "id": number,
                "tenant_id": f"tenant-{number % tenants:03d}",
                "email": f"{name}.{number}@example.test",
                "ssn": f"9{rng.randint(0, 99):02d}-{rng.randint(1, 99):02d}-"
                f"{rng.randint(1, 9999):04d}",
                "notes": notes,
            }
        )
    return rows


# -- database setup -------------------------------------------------------------


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from tests import pgcluster

    cluster, root = pgcluster.start_cluster()
    try:
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def fill(engine: sa.Engine, table: sa.Table, rows: int, tenants: int, seed: int) -> float:
    """Create and fill ``table``; return the seconds the fill took."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {TABLE}")
    table.create(engine)
    rng = random.Random(seed)
    started = time.perf_counter()
    for start in range(1, rows + 1, FILL_CHUNK):
        batch = make_rows(start, min(FILL_CHUNK, rows + 1 - start), tenants, rng)
        with engine.begin() as conn:
            conn.execute(sa.insert(table), batch)
    return time.perf_counter() - started


def vacuum(engine: sa.Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM (ANALYZE) {TABLE}")


def rotate_all(keyring: Keyring, tenants: int) -> None:
    for number in range(tenants):
        keyring.rotate(f"tenant-{number:03d}", activate_now=True)


# -- the runs -----------------------------------------------------------------------


def _raw_table() -> sa.TableClause:
    return sa.table(
        TABLE,
        sa.column("id", sa.Integer),
        *(sa.column(name, sa.LargeBinary) for name in ENCRYPTED),
    )


_PLAIN_ARRAY_UPDATE = (
    f"UPDATE {TABLE} AS t SET email = v.email, ssn = v.ssn, notes = v.notes "
    "FROM unnest(%(ids)b::INTEGER[], %(email)b::BYTEA[], %(ssn)b::BYTEA[], %(notes)b::BYTEA[]) "
    "AS v(id, email, ssn, notes) WHERE t.id = v.id"
)


def plain_arrays(engine: sa.Engine, batch_size: int) -> int:
    """Rewrite every row with its own bytes: one ``UPDATE ... FROM unnest(...)``
    per batch with binary array parameters, the statement form the job uses
    on PostgreSQL (without its compare-and-swap conditions)."""
    raw = _raw_table()
    cursor = 0
    written = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                sa.select(raw).where(raw.c.id > cursor).order_by(raw.c.id).limit(batch_size)
            ).all()
            if not rows:
                return written
            parameters = {"ids": [row.id for row in rows]}
            for name in ENCRYPTED:
                parameters[name] = [row._mapping[name] for row in rows]
            conn.exec_driver_sql(_PLAIN_ARRAY_UPDATE, parameters)
            written += len(rows)
            cursor = rows[-1].id


def plain_executemany(engine: sa.Engine, batch_size: int) -> int:
    """Rewrite every row with its own bytes, one UPDATE per row through executemany."""
    raw = _raw_table()
    statement = (
        sa.update(raw)
        .where(raw.c.id == sa.bindparam("row_id"))
        .values({name: sa.bindparam(f"new_{name}") for name in ENCRYPTED})
    )
    cursor = 0
    written = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                sa.select(raw).where(raw.c.id > cursor).order_by(raw.c.id).limit(batch_size)
            ).all()
            if not rows:
                return written
            conn.execute(
                statement,
                [
                    {"row_id": row.id, **{f"new_{name}": row._mapping[name] for name in ENCRYPTED}}
                    for row in rows
                ],
            )
            written += len(rows)
            cursor = rows[-1].id


def reencrypt(engine: sa.Engine, metadata: sa.MetaData, batch_size: int, workers: int) -> int:
    result = ReencryptionJob(
        engine, metadata, batch_size=batch_size, workers=workers, job_name=f"bench-{time.time()}"
    ).run()
    if not result.ok:
        raise SystemExit(f"re-encryption failed: {result.to_dict()}")
    return result.values_reencrypted


def job_child(url: str, key_file: str, job_name: str, batch_size: int, workers: int) -> None:
    """Run one process of a multi-process job once the parent sends "go"; print its count."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    define_table(metadata)
    Keyring(engine, LocalKms(key_file))
    print("ready", flush=True)
    sys.stdin.readline()
    result = ReencryptionJob(
        engine, metadata, batch_size=batch_size, workers=workers, job_name=job_name
    ).run()
    print(json.dumps({"ok": result.ok, "values": result.values_reencrypted}), flush=True)


def reencrypt_processes(args: argparse.Namespace, url: str, key_file: Path) -> tuple[float, int]:
    """Run the job in ``args.processes`` processes sharing one job name, as on
    several machines; time it from the moment every process is ready."""
    job_name = f"bench-{time.time()}"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--job-child",
                url,
                str(key_file),
                job_name,
                "--batch-size",
                str(args.batch_size),
                "--workers",
                str(args.workers),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(args.processes)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    values = 0
    for child in children:
        assert child.stdout is not None
        outcome = json.loads(child.stdout.readline())
        child.wait()
        if not outcome["ok"]:
            raise SystemExit("re-encryption failed in a child process")
        values += outcome["values"]
    return time.perf_counter() - started, values


def timed(run: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = run(*args)
    return time.perf_counter() - started, value


def throughput(args: argparse.Namespace, url: str, key_file: Path) -> dict[str, Any]:
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = define_table(metadata)
    keyring = Keyring(engine, LocalKms(key_file))
    keyring.create_table()
    fill_seconds = fill(engine, table, args.rows, args.tenants, seed=1)
    print(f"filled {args.rows} rows in {fill_seconds:.1f} s", file=sys.stderr)

    runs: dict[str, list[float]] = {"plain_arrays": [], "plain_executemany": [], "reencrypt": []}
    for repeat in range(args.repeat):
        for name in ("plain_arrays", "plain_executemany"):
            vacuum(engine)
            function = plain_arrays if name == "plain_arrays" else plain_executemany
            seconds, rows = timed(function, engine, args.batch_size)
            assert rows == args.rows
            runs[name].append(seconds)
            print(f"{name} #{repeat + 1}: {seconds:.2f} s", file=sys.stderr)
        rotate_all(keyring, args.tenants)
        vacuum(engine)
        if args.processes > 1:
            seconds, values = reencrypt_processes(args, url, key_file)
        else:
            seconds, values = timed(reencrypt, engine, metadata, args.batch_size, args.workers)
        assert values == 3 * args.rows, values
        runs["reencrypt"].append(seconds)
        print(f"reencrypt #{repeat + 1}: {seconds:.2f} s", file=sys.stderr)

    medians = {name: statistics.median(times) for name, times in runs.items()}
    rates = {name: args.rows / seconds for name, seconds in medians.items()}
    engine.dispose()
    return {
        "rows": args.rows,
        "tenants": args.tenants,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "processes": args.processes,
        "seconds": {name: [round(t, 3) for t in times] for name, times in runs.items()},
        "rows_per_second": {name: round(rate) for name, rate in rates.items()},
        "ratio_to_plain_executemany": round(rates["reencrypt"] / rates["plain_executemany"], 3),
        "ratio_to_plain_arrays": round(rates["reencrypt"] / rates["plain_arrays"], 3),
    }


# -- memory ---------------------------------------------------------------------------


def memory_child(url: str, key_file: str, batch_size: int) -> None:
    """Run one job under tracemalloc and print its memory figures as JSON."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    define_table(metadata)
    Keyring(engine, LocalKms(key_file))
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    values = reencrypt(engine, metadata, batch_size, 1)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "values": values,
                "seconds": round(seconds, 2),
                "tracemalloc_peak_kib": peak // 1024,
                "rss_before_kib": baseline_rss,
                "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def memory(args: argparse.Namespace, url: str, key_file: Path) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = define_table(metadata)
    keyring = Keyring(engine, LocalKms(key_file))
    keyring.create_table()
    results = []
    for size in args.memory_sizes:
        fill_seconds = fill(engine, table, size, args.tenants, seed=2)
        rotate_all(keyring, args.tenants)
        vacuum(engine)
        print(f"memory run: filled {size} rows in {fill_seconds:.1f} s", file=sys.stderr)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                url,
                str(key_file),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        figures["rows"] = size
        results.append(figures)
        print(f"memory run: {figures}", file=sys.stderr)
    engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", help="PostgreSQL URL (default: start a private cluster)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the throughput run")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="worker threads per process")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes running the job together"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--memory-sizes",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=[10_000, 100_000, 1_000_000],
        help="comma-separated table sizes for the memory runs (empty to skip)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("URL", "KEY_FILE"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--job-child", nargs=3, metavar=("URL", "KEY_FILE", "JOB"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], args.batch_size)
        return
    if args.job_child:
        url, key_file, job_name = args.job_child
        job_child(url, key_file, job_name, args.batch_size, args.workers)
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-reencrypt-"))
    key_file = workdir / "master.key"
    LocalKms.create(key_file)
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "sqlalchemy": sa.__version__,
        }
    }
    try:
        with postgres(args.pg_url) as url:
            if not args.skip_throughput:
                results["throughput"] = throughput(args, url, key_file)
            if args.memory_sizes:
                results["memory"] = memory(args, url, key_file)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
