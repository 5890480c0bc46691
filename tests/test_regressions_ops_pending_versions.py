"""Re-encrypting while rotated versions are still pending.

``keys rotate`` told the operator to run ``reencrypt`` once the active key
TTL had passed. But a pending version only becomes active at the tenant's
next write or with ``keys promote``, so a ``reencrypt`` run before that
found nothing stale and reported success, with every value still under
the old version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .ops_cli_support import CliApp, make_cli_app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[CliApp]:
    app = make_cli_app(tmp_path)
    yield app
    app.engine.dispose()


def test_rotate_names_the_promotion_step(app: CliApp) -> None:
    result = app.run("--active-key-ttl", "0", "keys", "rotate", "t-acme")

    assert result.exit_code == 0, result.output
    assert "keys promote" in result.output


def test_reencrypt_notes_pending_versions(app: CliApp) -> None:
    assert app.run("--active-key-ttl", "0", "keys", "rotate", "t-acme").exit_code == 0

    early = app.run("reencrypt")

    assert early.exit_code == 0, early.output
    assert "note: tenant(s) 't-acme' have pending key versions" in early.output
    assert "keys promote" in early.output
    other_tenant = app.run("reencrypt", "--tenant", "t-globex")
    assert "note:" not in other_tenant.output
    assert app.run("--active-key-ttl", "0", "keys", "promote").exit_code == 0
    done = app.run("reencrypt")
    assert done.exit_code == 0, done.output
    assert "re-encrypted 10 value(s)" in done.output
    assert "note:" not in done.output
