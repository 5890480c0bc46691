"""Time the per-value work of each column variant without a database.

Run it by hand from the repository root::

    .venv/bin/python benchmarks/bench_value_costs.py            # about 30 seconds

It times the SSN column (AES-GCM, 11 characters) and the e-mail column
(AES-SIV, 25 characters) of the variants of ``bench_columns.py``: the bind
processor (Python value to stored value) and the result processor (stored
value to Python value) as SQLAlchemy calls them. For the library it also
times the key provider's lookups, which the column types make once per
key lease rather than once per value. Each figure is the lowest of several
samples, because load from other processes only adds time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import timeit
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import sqlite

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.column_variants import TENANT, Variant, build_variants  # noqa: E402
from sqlalchemy_encrypted import KeyPurpose, tenant_scope  # noqa: E402

# Column name -> a value of the benchmark's kind for it.
VALUES = {"ssn": "123-45-6789", "email": "mara.quint.4821@example.com"}


def best_ns(function: Callable[[], Any], number: int, samples: int) -> float:
    """Return the lowest mean time of one call over ``samples`` runs, in nanoseconds."""
    return min(timeit.repeat(function, number=number, repeat=samples)) / number * 1e9


def _time_call(function: Callable[[Any], Any], argument: Any, number: int, samples: int) -> float:
    return best_ns(lambda: function(argument), number, samples)


def _measure_variant(variant: Variant, number: int, samples: int) -> list[tuple[str, float]]:
    dialect = sqlite.dialect()
    timings = []
    for column, value in VALUES.items():
        column_type = variant.orm_table.c[column].type
        bind = column_type._cached_bind_processor(dialect)
        result = column_type._cached_result_processor(dialect, None)
        if bind is None or result is None:
            raise RuntimeError(f"{variant.name} has no bind or result processor for SQLite")
        stored = bind(value)
        if result(stored) != value:
            raise RuntimeError(f"{variant.name} did not read back its own {column} value")
        timings.append((f"{column} bind", _time_call(bind, value, number, samples)))
        timings.append((f"{column} result", _time_call(result, stored, number, samples)))
    provider = variant.keyring
    if provider is None:
        return timings
    key = provider.active_key(TENANT, KeyPurpose.RANDOMIZED)
    # A stored value's key id is a new UUID object, parsed from the header.
    key_id = uuid.UUID(bytes=key.key_id.bytes)

    def active_key() -> Any:
        return provider.active_key(TENANT, KeyPurpose.RANDOMIZED)

    def key_by_id() -> Any:
        return provider.key_by_id(key_id, expected_tenant=TENANT)

    timings.append(("  provider.active_key", best_ns(active_key, number, samples)))
    timings.append(("  provider.key_by_id", best_ns(key_by_id, number, samples)))
    return timings


def measure(number: int, samples: int) -> list[tuple[str, str, float]]:
    """Return (variant, operation, nanoseconds) for every timed operation."""
    results: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-values-") as folder:
        variants = build_variants(["bare", "su_gcm", "lib", "lib_kms"], Path(folder))
        try:
            with tenant_scope(TENANT):
                for variant in variants:
                    for operation, nanoseconds in _measure_variant(variant, number, samples):
                        results.append((variant.name, operation, nanoseconds))
        finally:
            for variant in variants:
                variant.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the per-value work of each variant.")
    parser.add_argument("--number", type=int, default=20_000, help="calls per sample")
    parser.add_argument("--samples", type=int, default=15, help="samples; the lowest is kept")
    args = parser.parse_args(argv)
    print(f"{'variant':<10} {'operation':<24} {'ns per value':>12}")
    for name, operation, nanoseconds in measure(args.number, args.samples):
        print(f"{name:<10} {operation:<24} {nanoseconds:12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
