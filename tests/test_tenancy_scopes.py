"""Nesting of tenant_scope(), and scopes left open by generators."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    TenantContextError,
    TenantMismatchError,
    copy_current_tenant_scope,
    tenant_scope,
)
from sqlalchemy_encrypted.tenancy import scoped_tenant
from sqlalchemy_encrypted.testing import InMemoryKeyring

from .rotation_support import Base, Person


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


def test_executor_worker_starts_without_scope() -> None:
    with tenant_scope("a"), ThreadPoolExecutor(1) as executor:
        plain = executor.submit(scoped_tenant).result()
        wrapped = executor.submit(copy_current_tenant_scope(scoped_tenant)).result()
        copied = executor.submit(contextvars.copy_context().run, scoped_tenant).result()

    assert plain is None
    assert wrapped == "a"
    assert copied == "a"


def test_asyncio_scope_in_tasks_not_executor() -> None:
    async def main() -> tuple[str | None, str | None, str | None]:
        async def in_task() -> str | None:
            return scoped_tenant()

        with tenant_scope("a"):
            task = await asyncio.create_task(in_task())
            to_thread = await asyncio.to_thread(scoped_tenant)
            executor = await asyncio.get_running_loop().run_in_executor(None, scoped_tenant)
        return task, to_thread, executor

    task, to_thread, executor = asyncio.run(main())

    assert task == "a"
    assert to_thread == "a"
    assert executor is None


def test_copied_scope_closes_after_each_call() -> None:
    with tenant_scope("a"):
        wrapped = copy_current_tenant_scope(scoped_tenant)
    with tenant_scope("b"), ThreadPoolExecutor(1) as executor:
        in_worker = executor.submit(wrapped).result()
        after_call = executor.submit(scoped_tenant).result()
        in_caller = wrapped()
        assert scoped_tenant() == "b"

    # The wrapper keeps the tenant of the scope it was created in.
    assert in_worker == "a"
    assert after_call is None
    assert in_caller == "a"
    assert wrapped.__name__ == "scoped_tenant"


def test_copy_scope_outside_scope_raises() -> None:
    with pytest.raises(TenantContextError, match=r"outside any tenant_scope\(\)"):
        copy_current_tenant_scope(scoped_tenant)


def test_copy_scope_rejects_coroutine_function() -> None:
    async def read() -> str | None:
        return scoped_tenant()

    with tenant_scope("a"), pytest.raises(TypeError, match="asyncio task"):
        copy_current_tenant_scope(read)


def test_copy_scope_rejects_async_callables() -> None:
    async def read() -> str | None:
        return scoped_tenant()

    async def read_all() -> AsyncIterator[str | None]:
        yield scoped_tenant()

    class AsyncReader:
        async def __call__(self) -> str | None:
            return scoped_tenant()

    cases = [
        (read_all, "async generator function"),
        (AsyncReader(), "callable object whose __call__ is a coroutine function"),
        (functools.partial(read), "coroutine function functools.partial"),
        (functools.partial(AsyncReader()), "__call__ is a coroutine function"),
    ]
    for func, kind in cases:
        with tenant_scope("a"), pytest.raises(TypeError, match="asyncio task") as raised:
            copy_current_tenant_scope(func)
        assert kind in str(raised.value)


def test_copy_scope_rejects_generator_function() -> None:
    def read_all() -> Iterator[str | None]:
        yield scoped_tenant()

    class Reader:
        def __call__(self) -> Iterator[str | None]:
            yield scoped_tenant()

    for func in (read_all, functools.partial(read_all), Reader()):
        with tenant_scope("a"), pytest.raises(TypeError, match="function that iterates"):
            copy_current_tenant_scope(func)


def test_copy_scope_rejects_returned_generator() -> None:
    """A plain function that returns a generator, coroutine or async
    generator is caught when it returns, before the body runs unscoped."""
    body_ran: list[str | None] = []

    def read_all() -> Iterator[str | None]:
        body_ran.append(scoped_tenant())
        yield scoped_tenant()

    async def read_async() -> str | None:
        body_ran.append(scoped_tenant())
        return scoped_tenant()

    async def read_agen() -> AsyncIterator[str | None]:
        body_ran.append(scoped_tenant())
        yield scoped_tenant()

    with tenant_scope("a"):
        wrapped = [
            copy_current_tenant_scope(lambda: read_all()),
            copy_current_tenant_scope(lambda: read_async()),
            copy_current_tenant_scope(lambda: read_agen()),
        ]
    with ThreadPoolExecutor(1) as executor:
        for func in wrapped:
            with pytest.raises(TypeError, match="iterates or awaits it"):
                executor.submit(func).result()
    assert body_ran == []


def test_copy_scope_wraps_partial_and_object() -> None:
    def read(prefix: str) -> str:
        return f"{prefix}{scoped_tenant()}"

    class Reader:
        def __call__(self) -> str | None:
            return scoped_tenant()

    with tenant_scope("a"):
        partial = copy_current_tenant_scope(functools.partial(read, "tenant "))
        instance = copy_current_tenant_scope(Reader())
    with ThreadPoolExecutor(1) as executor:
        assert executor.submit(partial).result() == "tenant a"
        assert executor.submit(instance).result() == "a"


def test_copy_scope_outside_scope_names_partial() -> None:
    with pytest.raises(TenantContextError, match=r"functools\.partial\(.*scoped_tenant"):
        copy_current_tenant_scope(functools.partial(scoped_tenant))


def test_worker_read_checked_only_with_copied_scope(
    engine: sa.Engine, keyring: InMemoryKeyring
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, tenant_id="t-acme", name="Mara Quint"))
        session.commit()

    def read_name() -> str | None:
        with Session(engine) as session:
            person = session.get(Person, 1)
            assert person is not None
            return person.name

    with tenant_scope("t-globex"), ThreadPoolExecutor(1) as executor:
        # Without the scope the worker reads another tenant's row unchecked.
        assert executor.submit(read_name).result() == "Mara Quint"
        with pytest.raises(TenantMismatchError):
            executor.submit(copy_current_tenant_scope(read_name)).result()


def _close_leftover_scope() -> None:
    """End the scope the copied-context test left open in this context."""
    from sqlalchemy_encrypted import tenancy

    leftover = tenancy._innermost.get()
    assert leftover is not None
    tenancy._close_scope(leftover, strict=True)
