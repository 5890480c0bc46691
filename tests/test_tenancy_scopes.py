"""Nesting of tenant_scope(), and scopes left open by generators."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator

import pytest

from sqlalchemy_encrypted import TenantContextError, tenant_scope
from sqlalchemy_encrypted.tenancy import scoped_tenant


def _yield_in_scope(tenant: str) -> Iterator[str | None]:
    with tenant_scope(tenant):
        yield scoped_tenant()
        yield scoped_tenant()


def test_nested_scopes_restore_outer() -> None:
    with tenant_scope("a"):
        with tenant_scope("b"):
            assert scoped_tenant() == "b"
        assert scoped_tenant() == "a"
        with tenant_scope("a"):
            assert scoped_tenant() == "a"
        assert scoped_tenant() == "a"
    assert scoped_tenant() is None


def test_scope_left_open_by_generator_raises() -> None:
    rows = _yield_in_scope("a")

    with pytest.raises(TenantContextError) as caught:
        with tenant_scope("b"):
            assert next(rows) == "a"
            # The generator's scope leaked into this block.
            assert scoped_tenant() == "a"

    message = str(caught.value)
    assert "tenant_scope('b')" in message
    assert "tenant_scope('a')" in message
    assert "yield" in message
    assert scoped_tenant() is None
    rows.close()
    assert scoped_tenant() is None


def test_generator_closed_in_other_thread(caplog: pytest.LogCaptureFixture) -> None:
    rows = _yield_in_scope("a")
    worker_context = contextvars.copy_context()
    assert worker_context.run(next, rows) == "a"
    assert worker_context.run(scoped_tenant) == "a"
    errors: list[BaseException] = []

    def close() -> None:
        with tenant_scope("c"):
            try:
                rows.close()
            except BaseException as exc:
                errors.append(exc)
            assert scoped_tenant() == "c"

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted"):
        thread = threading.Thread(target=close)
        thread.start()
        thread.join()

    assert errors == []
    assert "ended outside the context it was opened in" in caplog.text
    assert scoped_tenant() is None


def test_block_error_wins_over_open_scope(caplog: pytest.LogCaptureFixture) -> None:
    rows = _yield_in_scope("a")

    with caplog.at_level(logging.ERROR, logger="sqlalchemy_encrypted"):
        with pytest.raises(KeyError):
            with tenant_scope("b"):
                next(rows)
                raise KeyError("from the block")

    assert "tenant_scope('b') ended while tenant_scope('a')" in caplog.text
    assert scoped_tenant() is None
    rows.close()


def test_copied_context_keeps_own_scope() -> None:
    with tenant_scope("a"):
        context = contextvars.copy_context()

        def inner() -> str | None:
            with tenant_scope("b"):
                assert scoped_tenant() == "b"
            return scoped_tenant()

        assert context.run(inner) == "a"
        assert scoped_tenant() == "a"
    assert context.run(scoped_tenant) == "a"
    assert scoped_tenant() is None


def test_scope_closed_in_copied_context(caplog: pytest.LogCaptureFixture) -> None:
    stack = contextlib.ExitStack()
    stack.enter_context(tenant_scope("a"))
    copy = contextvars.copy_context()

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted"):
        copy.run(stack.close)

    assert "tenant_scope('a') ended outside the context it was opened in" in caplog.text
    # The scope stays open where it was opened, and nested scopes still work.
    assert scoped_tenant() == "a"
    with tenant_scope("b"):
        assert scoped_tenant() == "b"
    assert scoped_tenant() == "a"
    _close_leftover_scope()
    assert scoped_tenant() is None


def test_scope_closed_by_other_task(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> str | None:
        stack = contextlib.ExitStack()
        stack.enter_context(tenant_scope("a"))
        await asyncio.create_task(asyncio.to_thread(lambda: None))
        await asyncio.create_task(_close_later(stack))
        return scoped_tenant()

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_encrypted"):
        assert asyncio.run(main()) == "a"

    assert "ended outside the context it was opened in" in caplog.text


async def _close_later(stack: contextlib.ExitStack) -> None:
    stack.close()


def _close_leftover_scope() -> None:
    """End the scope the copied-context test left open in this context."""
    from sqlalchemy_encrypted import tenancy

    leftover = tenancy._innermost.get()
    assert leftover is not None
    tenancy._close_scope(leftover, strict=True)
