"""The tenant whose DEKs seal new values and deterministic query parameters."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from .errors import TenantContextError

logger = logging.getLogger("sqlalchemy_encrypted")

__all__ = [
    "TenantBound",
    "copy_current_tenant_scope",
    "current_tenant",
    "get_default_tenant",
    "scoped_tenant",
    "set_default_tenant",
    "tenant_scope",
]

_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sqlalchemy_encrypted_tenant", default=None
)
_default_tenant: str | None = None
# The innermost open scope of this context, linked to the ones it is nested
# in. _scope contains its tenant, for the per-value paths.
_innermost: contextvars.ContextVar[_OpenScope | None] = contextvars.ContextVar(
    "sqlalchemy_encrypted_open_scope", default=None
)


def _validate(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not tenant_id:
        raise TenantContextError(
            f"invalid tenant id of type {type(tenant_id).__name__}: a tenant id is a non-empty str"
        )
    return tenant_id


@contextlib.contextmanager
def tenant_scope(tenant_id: str) -> Iterator[str]:
    """Set the tenant for writes and deterministic lookups inside the block.

    The scope is a context variable, and scopes nest. An asyncio task
    created inside the block and ``asyncio.to_thread()`` copy the context,
    so they run in the scope. A new thread, a ``ThreadPoolExecutor`` worker
    and ``loop.run_in_executor()`` do not, so wrap the function they run
    with :func:`copy_current_tenant_scope`.

    A generator shares the
    context of the code that iterates it, so a generator that yields inside
    ``tenant_scope()`` hands its scope to that code. When a scope ends while
    a scope opened inside it is still open, it raises
    :class:`TenantContextError` (after restoring the scope it was opened in),
    because the code in between ran under the wrong tenant. A generator read
    to the end closes its own scope, so that case goes unnoticed.
    """
    tenant = _validate(tenant_id)
    token = _scope.set(tenant)
    scope = _OpenScope(tenant, token, _innermost.get())
    _innermost.set(scope)
    try:
        yield tenant_id
    except BaseException:
        # The block raised, or a generator holding the scope is being closed
        # (GeneratorExit), maybe in another context: report, do not replace.
        _close_scope(scope, strict=False)
        raise
    _close_scope(scope, strict=True)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def copy_current_tenant_scope(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wrap ``func`` to run inside the tenant scope that is active now.

    A function that an executor runs in another thread starts without the
    caller's :func:`tenant_scope`, so its writes raise
    :class:`TenantContextError` and its reads of other tenants' values do
    not raise :class:`TenantMismatchError`. The wrapper opens
    ``tenant_scope()`` of the same tenant around each call, in whatever
    thread runs it::

        with tenant_scope("acme"):
            future = executor.submit(copy_current_tenant_scope(load_report), report_id)

    Raises :class:`TenantContextError` when no scope is active. Raises
    ``TypeError`` for a callable whose body would run after the wrapper's
    scope has closed. Those are coroutine functions, async generator
    functions and objects with ``async def __call__``, which need no
    wrapper because asyncio tasks copy the scope already. Generator
    functions are rejected too, because a generator's body runs wherever
    it is iterated, so wrap the function that iterates it instead. A call
    that returns a generator, coroutine or async generator raises
    ``TypeError`` when it returns, before that body runs.
    """
    name = _callable_name(func)
    kind, is_async = _deferred_body_kind(func)
    if kind is not None and is_async:
        raise TypeError(
            f"copy_current_tenant_scope() cannot wrap {kind} {name}: its body runs after the "
            "wrapper's scope has closed, and an asyncio task created inside tenant_scope() "
            "already runs in that scope"
        )
    if kind is not None:
        raise TypeError(
            f"copy_current_tenant_scope() cannot wrap {kind} {name}: its body runs wherever "
            "the generator is iterated, after the wrapper's scope has closed, so wrap the "
            "function that iterates the generator instead"
        )
    tenant = _scope.get()
    if tenant is None:
        raise TenantContextError(
            f"copy_current_tenant_scope({name}) was called outside any "
            "tenant_scope(): call it inside the scope whose tenant the function should run in"
        )

    @functools.wraps(func)
    def run_in_scope(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with tenant_scope(tenant):
            result = func(*args, **kwargs)
        # A plain function can still return a generator or coroutine, whose
        # body would run outside the scope, as in the rejected cases above.
        if inspect.isgenerator(result) or inspect.iscoroutine(result):
            result.close()
        elif not inspect.isasyncgen(result):
            return result
        raise TypeError(
            f"copy_current_tenant_scope({name}) returned a {type(result).__name__}, whose "
            "body would run after the wrapper's scope has closed; wrap the function that "
            "iterates or awaits it instead"
        )

    return run_in_scope


def _callable_name(func: object) -> str:
    """Return the qualified name of ``func``, or its repr for a callable
    without one (a ``functools.partial``, an instance with ``__call__``)."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


def _deferred_body_kind(func: object) -> tuple[str | None, bool]:
    """Return the kind of ``func`` and whether it is async when calling it
    only creates a coroutine, async generator or generator, else (None, False)."""
    while isinstance(func, functools.partial):
        func = func.func
    prefix = ""
    if not inspect.isroutine(func) and not inspect.isclass(func):
        # An instance: its class's __call__ decides what a call returns.
        func = type(func).__call__
        prefix = "callable object whose __call__ is a "
    if inspect.iscoroutinefunction(func):
        return prefix + "coroutine function", True
    if inspect.isasyncgenfunction(func):
        return prefix + "async generator function", True
    if inspect.isgeneratorfunction(func):
        return prefix + "generator function", False
    return None, False


class _OpenScope:
    """One open :func:`tenant_scope`, linked to the scope it was opened in."""

    __slots__ = ("outer", "tenant", "token")

    def __init__(
        self, tenant: str, token: contextvars.Token[str | None], outer: _OpenScope | None
    ) -> None:
        self.tenant = tenant
        self.token = token
        self.outer = outer


def _close_scope(scope: _OpenScope, *, strict: bool) -> None:
    """End ``scope`` and any scope opened inside it and left open.

    With ``strict``, a scope left open raises; otherwise it is logged,
    because an exception is already on its way.
    """
    left_open: list[str] = []
    current = _innermost.get()
    while current is not None and current is not scope:
        left_open.append(current.tenant)
        current = current.outer
    if current is not None:
        try:
            _scope.reset(scope.token)
        except ValueError:
            # The scope is open here only because this context is a copy of
            # the one it was opened in (another asyncio task, a callback,
            # copy_context().run()), where it stays open.
            current = None
    if current is None:
        logger.warning(
            "tenant_scope(%r) ended outside the context it was opened in, so the scope stays "
            "set there. A generator that yields inside tenant_scope(), or an ExitStack closed "
            "by another task or callback, leaves its scope in the original context",
            scope.tenant,
        )
        return
    _innermost.set(scope.outer)
    if not left_open:
        return
    message = (
        f"tenant_scope({scope.tenant!r}) ended while tenant_scope({left_open[0]!r}), opened "
        f"inside it, was still open, so the code between them ran in tenant "
        f"{left_open[0]!r}: do not yield inside tenant_scope() in a generator; open the "
        "scope around the loop that iterates it instead"
    )
    if strict:
        raise TenantContextError(message)
    logger.error(message)


def set_default_tenant(tenant_id: str | None) -> None:
    """Configure the tenant used when no scope is active, for single-tenant apps.

    Without it, an encrypted write outside any scope raises
    :class:`TenantContextError`: there is no silent global key.
    """
    global _default_tenant
    _default_tenant = None if tenant_id is None else _validate(tenant_id)


def get_default_tenant() -> str | None:
    return _default_tenant


def scoped_tenant() -> str | None:
    """Return the tenant of the active :func:`tenant_scope`, or None."""
    return _scope.get()


def current_tenant(column: str = "", *, search: bool = False) -> str:
    """Return the scoped tenant, else the default tenant, else raise.

    ``search`` words the error for a lookup, which only a scope or the
    default tenant can serve.
    """
    tenant_id = _scope.get()
    if tenant_id is not None:
        return tenant_id
    if _default_tenant is not None:
        return _default_tenant
    where = f" for encrypted column {column}" if column else ""
    if search:
        raise TenantContextError(
            f"no tenant is set for a search on encrypted column {column}: the searched "
            "value is sealed under the tenant's keys, so wrap the query in "
            "tenant_scope(tenant_id) (a tenant column, even in the WHERE clause, does not "
            "set it), or call set_default_tenant() for a single-tenant app"
        )
    raise TenantContextError(
        f"no tenant is set{where}: wrap the work in tenant_scope(tenant_id), give the "
        "table a tenant column, or call set_default_tenant() for a single-tenant app"
    )


class TenantBound:
    """A value to seal under a given tenant: the ORM hooks wrap the values of
    a row whose table has a tenant column, so one flush can hold rows of
    several tenants."""

    __slots__ = ("tenant_id", "value")

    def __init__(self, value: object, tenant_id: str) -> None:
        self.value = value
        self.tenant_id = tenant_id

    def __repr__(self) -> str:
        return f"<value bound to tenant {self.tenant_id!r}>"
