"""The Python blocks of docs/getting-started.md run as written, top to bottom.

Only the database URL and the key file path are replaced, so that the page
runs on the test PostgreSQL cluster.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa

PAGE = Path(__file__).resolve().parent.parent / "docs" / "getting-started.md"
PAGE_URL = "postgresql+psycopg://app@db.internal/app"
PAGE_KEY_FILE = "/etc/app/master.key"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _url_with_schema(engine: sa.Engine) -> str:
    """Return the engine's URL with the search path of its test schema."""
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    url = engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def test_getting_started_runs(pg_engine: sa.Engine, tmp_path: Path) -> None:
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    source = "\n".join(blocks)
    source = source.replace(PAGE_URL, _url_with_schema(pg_engine))
    source = source.replace(PAGE_KEY_FILE, str(tmp_path / "master.key"))
    assert len(blocks) == 6
    assert PAGE_URL not in source
    assert PAGE_KEY_FILE not in source

    namespace: dict[str, Any] = {"__name__": "getting_started"}
    try:
        # dont_inherit: run the page without this module's "from __future__" flags.
        exec(compile(source, str(PAGE), "exec", dont_inherit=True), namespace)
    finally:
        for name in ("engine", "keyring_engine"):
            if name in namespace:
                namespace[name].dispose()
        if "async_engine" in namespace:
            asyncio.run(namespace["async_engine"].dispose())

    assert namespace["customer"].name == "Mara Quint"
    assert namespace["future"].result() == "Mara Quint"
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT tenant_id, name FROM customers")).all()
    assert [row.tenant_id for row in rows] == ["acme", "acme"]
    assert all(b"Mara" not in bytes(row.name) for row in rows)
