"""Run the re-encryption benchmark on a few PostgreSQL rows so the script keeps working.

It checks the shape of the JSON output and asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_reencrypt.py"


def test_reencrypt_benchmark_runs(pg_engine: sa.Engine, tmp_path: Path) -> None:
    with pg_engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    url = pg_engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    output = tmp_path / "results.json"

    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"--pg-url={url.render_as_string(hide_password=False)}",
            "--rows=300",
            "--tenants=3",
            "--batch-size=100",
            "--repeat=1",
            "--memory-sizes=200,400",
            f"--json={output}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    results = json.loads(output.read_text())
    throughput = results["throughput"]
    assert throughput["rows"] == 300
    assert set(throughput["rows_per_second"]) == {"plain_arrays", "plain_executemany", "reencrypt"}
    assert throughput["ratio_to_plain_executemany"] > 0
    assert [run["rows"] for run in results["memory"]] == [200, 400]
    assert all(run["values"] == 3 * run["rows"] for run in results["memory"])
    assert all(run["tracemalloc_peak_kib"] > 0 for run in results["memory"])
