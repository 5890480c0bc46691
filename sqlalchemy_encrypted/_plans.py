"""Per-column copies of key lookups, so that a column seals and opens values
without asking its key provider for every value.

A :class:`WritePlan` holds, for one tenant, the active DEK with the header
and AAD that values sealed under it get. A :class:`ReadPlan` holds, for one
stored 24-byte header, the DEK it names and the AAD to open values with.
Both copy the validity of the :class:`~sqlalchemy_encrypted.keys.KeyLease`
they were built from: a plan is used only while the lease would be current.
The column types check that inline, because they run once per value;
:meth:`is_current` is the same test in readable form. A column drops all its
plans when its identity, key provider or codec changes, and when the default
key provider changes, so the per-value paths need not compare providers or
identities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from . import keys
from ._aead import AeadCipher
from .envelope import Algorithm
from .keys import DataKey, KeyLease, KeyProvider, LeaseGeneration, SealBudget

__all__ = ["PLAN_CACHE_SIZE", "ColumnState", "ReadPlan", "WritePlan", "remember"]

# The number of plans kept per column type. The dict is emptied when it
# reaches this size, so that many tenants cannot grow it without limit.
PLAN_CACHE_SIZE = 4096


class _Plan:
    __slots__ = (
        "aad",
        "cipher",
        "clock",
        "expires_at",
        "generation",
        "identity",
        "key",
        "stamp",
    )

    def __init__(self, lease: KeyLease, identity: str, aad: bytes) -> None:
        self.key: DataKey = lease.key
        self.cipher: AeadCipher = lease.key.cipher
        self.identity = identity
        self.aad = aad
        self.expires_at = lease.expires_at
        self.generation: LeaseGeneration = lease.generation
        self.stamp = lease.stamp
        self.clock: Callable[[], float] = lease.clock

    def is_current(self) -> bool:
        return self.generation.value == self.stamp and self.clock() < self.expires_at

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {self.identity} under {self.key!r}>"

    def __reduce__(self) -> str:
        raise TypeError("a plan contains key material and cannot be pickled")


class WritePlan(_Plan):
    """The active DEK of one tenant for one column, with its header and AAD.

    ``encrypt`` is the AEAD primitive's own method (see
    :meth:`AeadCipher.raw_encrypt`); ``aad_list`` is ``[aad]`` for AES-SIV.
    ``budget`` is the DEK's :class:`~sqlalchemy_encrypted.keys.SealBudget`,
    ``tickets`` its ticket counter, which every AES-GCM seal takes a ticket
    from, and ``seal_end`` a copy of its ``end``. The copy may lag behind
    ``budget.end`` but never passes it, so a ticket below it is covered.
    """

    __slots__ = ("aad_list", "budget", "encrypt", "gcm", "header", "seal_end", "tickets")

    def __init__(self, lease: KeyLease, identity: str, header: bytes, aad: bytes) -> None:
        super().__init__(lease, identity, aad)
        self.header = header
        self.gcm = self.cipher.algorithm is Algorithm.AES_256_GCM
        self.encrypt: Callable[..., bytes] = self.cipher.raw_encrypt()
        self.aad_list = [aad]
        self.budget: SealBudget = lease.key.budget
        self.tickets: Iterator[int] = self.budget.tickets
        self.seal_end: int = self.budget.end


class ReadPlan(_Plan):
    """The DEK and AAD that open the values with one stored header.

    ``decrypt`` is the AEAD primitive's own method (see
    :meth:`AeadCipher.raw_decrypt`). ``aad_list`` is ``[aad]``, the form
    AES-SIV takes; it is never mutated.
    """

    __slots__ = ("aad_list", "decrypt", "gcm", "min_size", "tenant_id")

    def __init__(self, lease: KeyLease, identity: str, aad: bytes, min_size: int) -> None:
        super().__init__(lease, identity, aad)
        self.tenant_id = lease.key.tenant_id
        self.min_size = min_size
        self.gcm = self.cipher.algorithm is Algorithm.AES_256_GCM
        self.decrypt: Callable[..., bytes] = self.cipher.raw_decrypt()
        self.aad_list = [aad]


class ColumnState:
    """The settings a column type's per-value functions read, in one plain object.

    An attribute read on a ``TypeDecorator`` instance costs several times
    one on a plain object (SQLAlchemy's ``TypeDecorator`` defines
    ``__getattr__``, which keeps CPython from specializing the read), so the
    bind and result processors read these copies instead. The column type
    updates them whenever the setting they copy changes.

    ``identity`` is the column identity, or None while the column is
    unattached and has no ``context=``. ``str_limit`` is the limit in
    characters of a column whose codec is the plain string codec
    (``sys.maxsize`` for none), and -1 for every other codec, so that one
    comparison decides whether an exact ``str`` may take the inlined path.
    """

    __slots__ = (
        "__weakref__",
        "base64",
        "decoder",
        "encode",
        "identity",
        "keyring",
        "limit",
        "read_plans",
        "str_limit",
        "tag",
        "tag_byte",
        "write_plans",
    )

    def __init__(self) -> None:
        self.identity: str | None = None
        self.keyring: KeyProvider | None = None
        self.base64 = False
        self.encode: Callable[[Any, str], bytes] | None = None
        self.decoder: Callable[[bytes], Any] | None = None
        self.limit: int | None = None
        self.str_limit = -1
        self.tag = -1
        self.tag_byte = b""
        self.write_plans: dict[str, WritePlan] = {}
        self.read_plans: dict[bytes, ReadPlan] = {}
        # Plans of a column without keyring= contain keys of the default provider.
        keys.register_column_state(self)

    def forget_plans(self) -> None:
        """Drop every plan, after a change of the settings plans were built from."""
        self.write_plans = {}
        self.read_plans = {}

    def forget_expired_plans(self) -> None:
        """Drop the plans whose leases have expired, and with them their DEKs.

        Other threads add plans meanwhile, so this filters copies: a plan
        added during the filtering is dropped with the old dict, which only
        costs its thread one lookup more.
        """
        write_plans = self.write_plans.copy()
        self.write_plans = {
            tenant: plan for tenant, plan in write_plans.items() if plan.is_current()
        }
        read_plans = self.read_plans.copy()
        self.read_plans = {header: plan for header, plan in read_plans.items() if plan.is_current()}

    def __repr__(self) -> str:
        return f"<ColumnState of {self.identity}>"


def remember(plans: dict[Any, Any], key: Any, plan: _Plan) -> None:
    """Store ``plan`` unless its lease is already unusable, bounding the dict."""
    if not plan.clock() < plan.expires_at:
        return
    if len(plans) >= PLAN_CACHE_SIZE:
        plans.clear()
    plans[key] = plan
