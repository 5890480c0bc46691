"""Run the column benchmark on a few rows of SQLite so that the script keeps working.

These tests check that every variant runs every step and that the JSON
output has its expected shape. They assert nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_columns.py"
VARIANTS = ["plain", "bare", "su_gcm", "lib", "lib_rowtenant", "lib_kms"]
STEPS = ["orm_insert", "core_insert", "select_all", "lookup"]


def _run_benchmark(tmp_path: Path, **options: int) -> tuple[str, dict[str, Any]]:
    """Run the script on SQLite; return its standard output and the SQLite results."""
    output = tmp_path / "results.json"
    arguments = [f"--{name}={value}" for name, value in options.items()]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--db=sqlite", f"--json={output}", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout, json.loads(output.read_text())["databases"]["sqlite"]


def test_benchmark_runs_every_step(tmp_path: Path) -> None:
    stdout, sqlite = _run_benchmark(tmp_path, rows=60, batch=20, lookups=30, repeats=2)

    assert "targets: ratio of total times" in stdout
    assert sqlite["rows"] == 60
    assert sqlite["lookups"] == 30
    assert sqlite["repeats"] == 2
    assert list(sqlite["steps"]) == STEPS
    for step in STEPS:
        assert list(sqlite["steps"][step]) == VARIANTS
        for cell in sqlite["steps"][step].values():
            # Two repeats of three rounds: 60 rows in batches of 20, 30 lookups in one chunk.
            rounds = 1 if step == "lookup" else 3
            assert [len(repeat) for repeat in cell["seconds_per_round"]] == [rounds, rounds]
            assert cell["ratio_to_plain"]["median"] > 0
    checks = {(target["variant"], target["check"]) for target in sqlite["targets"]}
    assert ("bare", "su_gcm / bare >= 4.0") in checks
    for name in ("lib", "lib_rowtenant", "lib_kms"):
        assert (name, f"{name} / bare <= 1.15") in checks
        assert (name, f"su_gcm / {name} >= 4.0") in checks
    assert all(target["verdict"] in ("met", "missed", "unclear") for target in sqlite["targets"])


def test_benchmark_lookups_find_rows(tmp_path: Path) -> None:
    _, sqlite = _run_benchmark(tmp_path, rows=40, batch=20, lookups=25, repeats=1)

    found = {name: cell["found"] for name, cell in sqlite["steps"]["lookup"].items()}
    # Deterministic encryption finds every e-mail. sqlalchemy-utils with
    # AesGcmEngine draws a new nonce per value, so its lookups find nothing.
    assert found == {
        "plain": 25,
        "bare": 25,
        "su_gcm": 0,
        "lib": 25,
        "lib_rowtenant": 25,
        "lib_kms": 25,
    }


def test_benchmark_keeps_kms_out_of_hot_path(tmp_path: Path) -> None:
    _, sqlite = _run_benchmark(tmp_path, rows=100, batch=50, lookups=20, repeats=1)

    stats = sqlite["kms_calls"]["lib_kms"]
    # One generate-data-key call per DEK (randomized and deterministic) of
    # the single tenant; every other value is served by the DEK cache,
    # through the columns' leases, so few lookups even reach the keyring.
    assert stats["kms_calls"] == 2
    assert stats["hits"] + stats["misses"] < 100
