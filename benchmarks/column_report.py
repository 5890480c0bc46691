"""Turn the timings of ``bench_columns.py`` into ratios, target checks and a table."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

__all__ = ["DatabaseRun", "describe_environment", "environment", "format_report", "summarize"]

STEPS = ("orm_insert", "core_insert", "select_all", "lookup")

# Targets for the library's variants, each a ratio of times from one run.
MAX_RATIO_TO_BARE = 1.15
MIN_SPEEDUP_OVER_SU = 4.0
SPEEDUP_STEPS = ("core_insert", "select_all")
LIBRARY_VARIANTS = ("lib", "lib_rowtenant", "lib_kms")


@dataclass
class DatabaseRun:
    """Timings of every repeat on one database."""

    database: str
    version: str
    rows: int
    lookups: int
    # seconds[step][variant][repeat][round]
    seconds: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # Rows found by the lookups of the last repeat, per variant.
    found: dict[str, int] = field(default_factory=dict)
    storage_bytes: dict[str, int] = field(default_factory=dict)
    kms_calls: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, step: str, rounds: dict[str, list[float]]) -> None:
        per_variant = self.seconds.setdefault(step, {})
        for name, seconds in rounds.items():
            per_variant.setdefault(name, []).append(seconds)


def _ratios(numerator: list[list[float]], denominator: list[list[float]]) -> dict[str, float]:
    """Compare two variants' times from the same repeats.

    ``median``, ``min`` and ``max`` are over the repeats, of the ratio of the
    step's total times: the figure the report and the targets use. The
    ``round_*`` quartiles are over the ratios of single rounds, which ran
    back to back. Their median leaves out pauses that hit few rounds, from
    other processes or from Python's garbage collector, so it shows the
    steady cost per row.
    """
    totals = [sum(top) / sum(bottom) for top, bottom in zip(numerator, denominator, strict=True)]
    rounds = [
        top / bottom
        for top_rounds, bottom_rounds in zip(numerator, denominator, strict=True)
        for top, bottom in zip(top_rounds, bottom_rounds, strict=True)
    ]
    if len(rounds) > 1:
        q1, round_median, q3 = statistics.quantiles(rounds, n=4, method="inclusive")
    else:
        q1 = round_median = q3 = rounds[0]
    return {
        "median": statistics.median(totals),
        "min": min(totals),
        "max": max(totals),
        "round_median": round_median,
        "round_q1": q1,
        "round_q3": q3,
    }


def _verdict(ratio: dict[str, float], meets: Callable[[float], bool]) -> str:
    """Return "met" or "missed" when the total and the round median agree, else "unclear"."""
    total_meets = meets(ratio["median"])
    round_meets = meets(ratio["round_median"])
    if total_meets and round_meets:
        return "met"
    if not total_meets and not round_meets:
        return "missed"
    return "unclear"


def _targets(run: DatabaseRun) -> list[dict[str, Any]]:
    targets = []
    # The floor's own speed-up over sqlalchemy-utils shows whether 4x is
    # within reach of any column type that does the same per-value work.
    for name in ("bare", *LIBRARY_VARIANTS):
        for step in STEPS:
            per_variant = run.seconds[step]
            if name not in per_variant:
                continue
            if "bare" in per_variant and name != "bare":
                ratio = _ratios(per_variant[name], per_variant["bare"])
                targets.append(
                    {
                        "variant": name,
                        "step": step,
                        "check": f"{name} / bare <= {MAX_RATIO_TO_BARE}",
                        "ratio": ratio,
                        "verdict": _verdict(ratio, lambda value: value <= MAX_RATIO_TO_BARE),
                    }
                )
            if step in SPEEDUP_STEPS and "su_gcm" in per_variant:
                ratio = _ratios(per_variant["su_gcm"], per_variant[name])
                targets.append(
                    {
                        "variant": name,
                        "step": step,
                        "check": f"su_gcm / {name} >= {MIN_SPEEDUP_OVER_SU}",
                        "ratio": ratio,
                        "verdict": _verdict(ratio, lambda value: value >= MIN_SPEEDUP_OVER_SU),
                    }
                )
    return targets


def summarize(run: DatabaseRun) -> dict[str, Any]:
    """Compute per-unit times, ratios to plain and the target checks of one database."""
    steps: dict[str, Any] = {}
    for step in STEPS:
        per_variant = run.seconds[step]
        units = run.lookups if step == "lookup" else run.rows
        entry: dict[str, Any] = {}
        for name, repeats in per_variant.items():
            totals = [sum(rounds) for rounds in repeats]
            cell: dict[str, Any] = {
                "seconds_per_round": repeats,
                "us_per_unit": statistics.median(totals) / units * 1e6,
                "ratio_to_plain": _ratios(repeats, per_variant["plain"]),
            }
            if step == "lookup":
                cell["found"] = run.found[name]
            entry[name] = cell
        steps[step] = entry
    return {
        "database": run.database,
        "version": run.version,
        "rows": run.rows,
        "lookups": run.lookups,
        "repeats": len(run.seconds["orm_insert"]["plain"]),
        "steps": steps,
        "targets": _targets(run),
        "storage_bytes": run.storage_bytes,
        "kms_calls": run.kms_calls,
    }


def _ratio_cell(step: str, name: str, cell: dict[str, Any], lookups: int) -> str:
    if name == "plain":
        return f"{cell['us_per_unit']:.1f} us"
    if step == "lookup" and cell["found"] < lookups:
        return f"found {cell['found']}/{lookups}"
    ratio = cell["ratio_to_plain"]
    return f"{ratio['median']:.2f}x ({ratio['round_median']:.2f}x)"


def format_report(summary: dict[str, Any]) -> str:
    """Render one database's summary as plain-text tables."""
    steps = summary["steps"]
    names = list(steps["orm_insert"])
    width = max(17, *(len(name) + 2 for name in names))
    lines = [
        f"{summary['version']}: {summary['rows']:,} rows, {summary['lookups']:,} lookups, "
        f"{summary['repeats']} repeat(s)",
        "",
        "time against plain (lower is better): ratio of total times, median of the repeats,",
        "and in brackets the median ratio of single rounds; plain in us per row or lookup",
        f"{'step':<12}" + "".join(f"{name:>{width}}" for name in names),
    ]
    for step, entry in steps.items():
        cells = [_ratio_cell(step, name, entry[name], summary["lookups"]) for name in names]
        lines.append(f"{step:<12}" + "".join(f"{cell:>{width}}" for cell in cells))

    if summary["targets"]:
        lines += [
            "",
            "targets: ratio of total times, median [min-max] of the repeats, "
            "(round median); met or missed when both agree",
        ]
        for target in summary["targets"]:
            ratio = target["ratio"]
            verdict = target["verdict"].upper() if target["verdict"] != "met" else "met"
            lines.append(
                f"  {target['step']:<12} {target['check']:<32} {ratio['median']:6.2f} "
                f"[{ratio['min']:.2f}-{ratio['max']:.2f}] ({ratio['round_median']:.2f})  "
                f"{verdict}"
            )

    if summary["storage_bytes"]:
        plain_size = summary["storage_bytes"]["plain"]
        lines += ["", "ORM table size with its indexes (pg_total_relation_size)"]
        for name, size in summary["storage_bytes"].items():
            growth = "" if name == "plain" else f" ({size / plain_size - 1:+.0%})"
            lines.append(f"  {name:<14} {size / 1e6:7.1f} MB{growth}")

    for name, stats in summary["kms_calls"].items():
        lines += [
            "",
            f"{name}: {stats['kms_calls']} KMS call(s) in the whole run on this database; "
            f"DEK cache {stats['hits']:,} hits, {stats['misses']} misses",
        ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Describe the machine and the software versions."""
    import cryptography

    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "cpu family", "model", "flags") and name not in cpu:
                cpu[name] = value.strip()
    flags = set(cpu.get("flags", "").split())
    versions = {
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "cryptography": cryptography.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    with contextlib.suppress(ImportError, AttributeError):
        from cryptography.hazmat.backends.openssl import backend

        versions["openssl (cryptography)"] = backend.openssl_version_text()
    for module in ("psycopg", "sqlalchemy_utils"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu.get("model name", "unknown"),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
        "cpu_crypto_flags": sorted(
            flags & {"aes", "pclmulqdq", "vaes", "vpclmulqdq", "avx2", "avx512f", "sha_ni"}
        ),
        "versions": versions,
    }


def describe_environment(env: dict[str, Any]) -> str:
    """Render the machine and versions as two lines for the report header."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return (
        f"machine: {env['cpus']} CPUs, {env['cpu_model']} (family/model "
        f"{env['cpu_family_model']}), flags {' '.join(env['cpu_crypto_flags'])}\n"
        f"software: {versions}"
    )
