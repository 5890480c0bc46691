"""AwsKms through boto3 against moto's standalone server on 127.0.0.1.

moto is less strict than AWS KMS in places: it still encrypts and decrypts
with a disabled key or one pending deletion, it never throttles and it has
no key policies. Tests of those faults wrap the real boto3 client in
:class:`StrictKmsClient`, which raises the errors AWS KMS raises, or inject
error responses with a botocore ``before-send`` hook. The docstring of each such test states which.
"""

from __future__ import annotations

import collections
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import boto3
import pytest
import sqlalchemy as sa
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError
from sqlalchemy.orm import Session

from sqlalchemy_encrypted import (
    ConfigurationError,
    KeyPurpose,
    KmsAccessDeniedError,
    KmsContextMismatchError,
    KmsError,
    KmsKeyDisabledError,
    KmsKeyNotFoundError,
    KmsThrottlingError,
    KmsUnavailableError,
)
from sqlalchemy_encrypted.keyring import Keyring
from sqlalchemy_encrypted.kms import AwsKms, LocalKms, WrapContext, kms_from_uri

from .keyring_helpers import FakeClock, assert_no_secret, log_text
from .models import Base, Person
from .motoserver import running_moto_server

REGION = "us-east-1"


def _client(url: str, max_attempts: int = 3) -> Any:
    return boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "total_max_attempts": max_attempts}),
    )


def _count_calls(client: Any) -> collections.Counter[str]:
    """Count KMS operations with a boto3 event hook."""
    calls: collections.Counter[str] = collections.Counter()

    def hook(event_name: str, **kwargs: Any) -> None:
        calls[event_name.rsplit(".", 1)[-1]] += 1

    client.meta.events.register("before-call.kms", hook)
    return calls


def _new_key(client: Any, alias: str | None = None) -> tuple[str, str]:
    metadata = client.create_key(Description="sqlalchemy-encrypted test KEK")["KeyMetadata"]
    if alias is not None:
        client.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
    return metadata["KeyId"], metadata["Arn"]


class StrictKmsClient:
    """The real boto3 client, plus the key-state and policy checks AWS KMS makes.

    moto 5 serves Encrypt, Decrypt, GenerateDataKey and ReEncrypt for a
    disabled key or one pending deletion; AWS KMS raises DisabledException
    or KMSInvalidStateException. ``denied`` lists key ARNs whose use raises
    AccessDeniedException, as a key policy would.
    """

    _KEY_PARAMETERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "encrypt": ("KeyId",),
        "decrypt": ("KeyId",),
        "generate_data_key": ("KeyId",),
        "re_encrypt": ("SourceKeyId", "DestinationKeyId"),
    }

    def __init__(self, client: Any) -> None:
        self._client = client
        self.denied: set[str] = set()
        self.meta = client.meta

    def _error(self, code: str, operation: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, operation)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        parameters = self._KEY_PARAMETERS.get(name)
        if parameters is None:
            return method

        def checked(**kwargs: Any) -> Any:
            for parameter in parameters:
                key = kwargs.get(parameter)
                if key is None:
                    continue
                metadata = self._client.describe_key(KeyId=key)["KeyMetadata"]
                if metadata["Arn"] in self.denied:
                    raise self._error("AccessDeniedException", name)
                if metadata["KeyState"] == "Disabled":
                    raise self._error("DisabledException", name)
                if metadata["KeyState"] != "Enabled":
                    raise self._error("KMSInvalidStateException", name)
            return method(**kwargs)

        return checked


def _context(tenant: str = "t-acme", version: int = 1) -> WrapContext:
    return WrapContext(uuid.UUID(int=11), tenant, KeyPurpose.DETERMINISTIC, version)


@pytest.fixture
def kms_client(moto_server: str) -> Any:
    return _client(moto_server)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _add(engine: sa.Engine, tenant: str, name: str, person_id: int | None = None) -> int:
    with Session(engine) as session:
        person = Person(id=person_id, tenant_id=tenant, name=name, email=f"{name}@example.test")
        session.add(person)
        session.commit()
        return person.id


def _raw(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, name, email FROM persons ORDER BY id")).all()
    return [(row[0], bytes(row[1]), bytes(row[2])) for row in rows]


# -- the provider -------------------------------------------------------------


def test_alias_resolves_to_arn(kms_client: Any) -> None:
    _, arn = _new_key(kms_client, "alias/test-resolve")
    kms = AwsKms("alias/test-resolve", client=kms_client)
    assert kms.kek_id == arn
    assert AwsKms(arn.split("/")[-1], client=kms_client).kek_id == arn
    info = kms.describe_kek()
    assert info.kek_id == arn
    assert info.enabled
    assert info.state == "Enabled"


def test_generate_and_unwrap(kms_client: Any) -> None:
    _, arn = _new_key(kms_client)
    kms = AwsKms(arn, client=kms_client)
    calls = _count_calls(kms_client)
    generated = kms.generate_data_key(64, _context())
    assert len(generated.plaintext) == 64
    assert kms.unwrap(generated.wrapped, _context(), arn) == generated.plaintext
    assert calls == {"GenerateDataKey": 1, "Decrypt": 1}
    wrapped = kms.wrap(generated.plaintext, _context(version=2))
    assert kms.unwrap(wrapped, _context(version=2), arn) == generated.plaintext


def test_wrong_context_is_mismatch(kms_client: Any) -> None:
    """moto enforces the encryption context as AWS KMS does."""
    _, arn = _new_key(kms_client)
    kms = AwsKms(arn, client=kms_client)
    generated = kms.generate_data_key(32, _context())
    for other in (_context(tenant="t-globex"), _context(version=2)):
        with pytest.raises(KmsContextMismatchError) as caught:
            kms.unwrap(generated.wrapped, other, arn)
        message = str(caught.value)
        assert arn in message
        assert "InvalidCiphertextException" in message
        assert_no_secret(message, [generated.plaintext, generated.wrapped])


def test_disabled_key(kms_client: Any) -> None:
    """moto decrypts with a disabled key; StrictKmsClient raises what AWS KMS raises."""
    key_id, arn = _new_key(kms_client)
    strict = StrictKmsClient(kms_client)
    kms = AwsKms(arn, client=strict)  # type: ignore[arg-type]
    generated = kms.generate_data_key(32, _context())
    kms_client.disable_key(KeyId=key_id)
    with pytest.raises(KmsKeyDisabledError) as caught:
        kms.unwrap(generated.wrapped, _context(), arn)
    assert arn in str(caught.value)
    assert "DisabledException" in str(caught.value)
    assert_no_secret(str(caught.value), [generated.plaintext])
    kms_client.enable_key(KeyId=key_id)
    kms_client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(KmsKeyDisabledError, match="KMSInvalidStateException"):
        kms.unwrap(generated.wrapped, _context(), arn)


def test_access_denied(kms_client: Any) -> None:
    """moto has no key policies; StrictKmsClient denies listed keys as a policy would."""
    _, arn = _new_key(kms_client)
    strict = StrictKmsClient(kms_client)
    strict.denied.add(arn)
    kms = AwsKms(arn, client=strict)  # type: ignore[arg-type]
    with pytest.raises(KmsAccessDeniedError) as caught:
        kms.generate_data_key(32, _context())
    assert arn in str(caught.value)
    assert "t-acme" in str(caught.value)


def test_throttling_retried_then_raised(
    moto_server: str, caplog: pytest.LogCaptureFixture, engine: sa.Engine, tmp_path: Path
) -> None:
    """moto never throttles: a before-send hook returns ThrottlingException for Decrypt.

    boto3's standard retry mode retries it; after the last attempt the
    keyring raises KmsThrottlingError naming the KEK and tenant.
    """
    client = _client(moto_server, max_attempts=3)
    _, arn = _new_key(client)
    keyring = Keyring(engine, AwsKms(arn, client=client))
    keyring.create_table()
    key = keyring.active_key("t-acme", KeyPurpose.RANDOMIZED)
    keyring.cache.clear()
    attempts = []

    def throttle(request: Any, **kwargs: Any) -> AWSResponse:
        attempts.append(request.url)
        body = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
        return AWSResponse(
            request.url, 400, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(body)
        )

    client.meta.events.register("before-send.kms.Decrypt", throttle)
    caplog.set_level(logging.WARNING, logger="sqlalchemy_encrypted.audit")
    with pytest.raises(KmsThrottlingError) as caught:
        keyring.key_by_id(key.key_id)
    assert len(attempts) == 3
    message = str(caught.value)
    assert arn in message
    assert "t-acme" in message
    assert "3 attempt(s)" in message
    failures = [r for r in caplog.records if getattr(r, "audit_event", "") == "kms.failed"]
    assert len(failures) == 1
    assert "KmsThrottlingError" in failures[0].getMessage()

    client.meta.events.unregister("before-send.kms.Decrypt", throttle)
    assert keyring.key_by_id(key.key_id).key_id == key.key_id


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def test_unreachable_endpoint(aws_credentials: None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    kms = AwsKms(
        "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        max_attempts=1,
        connect_timeout=1,
    )
    with pytest.raises(KmsUnavailableError) as caught:
        kms.generate_data_key(32, _context())
    assert "arn:aws:kms:us-east-1:123456789012:key/11111111" in str(caught.value)


@pytest.mark.parametrize(
    "reference",
    ["not a key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "", "local:default:00"],
)
def test_invalid_key_reference(reference: str, kms_client: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AwsKms(reference, client=kms_client)
    if reference:
        assert reference not in str(caught.value)


def test_client_built_with_standard_retries(aws_credentials: None) -> None:
    kms = AwsKms("alias/app", region_name=REGION, max_attempts=4)
    retries = kms.client.meta.config.retries
    assert retries["mode"] == "standard"
    assert retries["total_max_attempts"] == 4


def test_kms_from_uri(tmp_path: Path, moto_server: str, aws_credentials: None) -> None:
    key_file = tmp_path / "master.key"
    local = LocalKms.create(key_file, kek="kek-a")
    LocalKms.add_kek(key_file, "kek-b")
    assert kms_from_uri(f"local://{key_file}?kek=kek-a").kek_id == local.kek_id
    assert kms_from_uri(f"local://{key_file}").kek_id.startswith("local:kek-b:")
    _, arn = _new_key(_client(moto_server), "alias/from-uri")
    aws = kms_from_uri(f"aws-kms://alias/from-uri?region={REGION}&endpoint_url={moto_server}")
    assert isinstance(aws, AwsKms)
    assert aws.kek_id == arn
    for bad in ("vault://x", "local://relative/path", f"aws-kms://{arn}?colour=red"):
        with pytest.raises(ConfigurationError):
            kms_from_uri(bad)


def test_kms_uri_sets_timeouts(aws_credentials: None) -> None:
    kms = kms_from_uri(
        f"aws-kms://alias/app?region={REGION}&connect_timeout=0.5&read_timeout=1.5&max_attempts=2"
    )

    assert isinstance(kms, AwsKms)
    config = kms.client.meta.config
    assert config.connect_timeout == 0.5
    assert config.read_timeout == 1.5
    assert config.retries["total_max_attempts"] == 2
    for bad in ("read_timeout=0", "read_timeout=soon", "max_attempts=1.5", "connect_timeout=inf"):
        with pytest.raises(ConfigurationError, match="in KMS URI aws-kms://"):
            kms_from_uri(f"aws-kms://alias/app?region={REGION}&{bad}")


# -- the keyring on AWS KMS ---------------------------------------------------


def test_keyring_reads_unwrap_once_per_dek(engine: sa.Engine, kms_client: Any) -> None:
    _, arn = _new_key(kms_client, None)
    Keyring(engine, AwsKms(arn, client=kms_client)).create_table()
    Base.metadata.create_all(engine)
    rows = [
        {"id": i, "tenant_id": "t-acme", "name": f"Person {i}", "email": f"p{i}@example.test"}
        for i in range(500)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(Person.__table__), rows)

    reader_client = _client(kms_client.meta.endpoint_url)
    calls = _count_calls(reader_client)
    clock = FakeClock()
    keyring = Keyring(engine, AwsKms(arn, client=reader_client), cache_ttl=1.0, clock=clock)
    with Session(engine) as session:
        assert len(session.scalars(sa.select(Person)).all()) == 500
    assert calls["Decrypt"] == 2
    clock.advance(1.1)
    with Session(engine) as session:
        assert len(session.scalars(sa.select(Person)).all()) == 500
    assert calls["Decrypt"] == 4
    assert keyring.list_keys("t-acme")[0].kek_id == arn


def test_keyring_stores_canonical_arn(engine: sa.Engine, kms_client: Any) -> None:
    alias = f"alias/canonical-{uuid.uuid4()}"
    _, arn = _new_key(kms_client, alias)
    keyring = Keyring(engine, AwsKms(alias, client=kms_client))
    keyring.create_table()
    keyring.provision("t-acme")
    assert {(k.kms_provider, k.kek_id) for k in keyring.list_keys()} == {("aws-kms", arn)}


def test_kms_down_writes_fail_cached_reads_work(engine: sa.Engine) -> None:
    with running_moto_server() as url:
        client = _client(url, max_attempts=1)
        _, arn = _new_key(client)
        keyring = Keyring(engine, AwsKms(arn, client=client))
        keyring.create_table()
        Base.metadata.create_all(engine)
        acme_id = _add(engine, "t-acme", "cached")
    # The server is stopped: the t-acme DEKs are cached, t-globex has none.
    with Session(engine) as session:
        assert session.get(Person, acme_id).name == "cached"  # type: ignore[union-attr]
    with pytest.raises(KmsUnavailableError) as caught:
        _add(engine, "t-globex", "lost")
    assert arn in str(caught.value)
    with engine.connect() as conn:
        tenants = conn.execute(sa.text("SELECT tenant_id FROM persons")).scalars().all()
    assert tenants == ["t-acme"]
    assert keyring.list_keys("t-globex") == []
    keyring.cache.clear()
    with Session(engine) as session, pytest.raises(KmsError):
        session.get(Person, acme_id)


def test_rewrap_between_aws_keys(engine: sa.Engine, kms_client: Any) -> None:
    """Rewrap with ReEncrypt, then schedule the old key's deletion.

    moto keeps serving a key pending deletion, so reads go through
    StrictKmsClient, which refuses it as AWS KMS does.
    """
    old_id, old_arn = _new_key(kms_client)
    _, new_arn = _new_key(kms_client)
    keyring = Keyring(engine, AwsKms(old_arn, client=kms_client))
    keyring.create_table()
    Base.metadata.create_all(engine)
    for index in range(10):
        _add(engine, "t-acme", f"Person {index}")
    before = _raw(engine)
    calls = _count_calls(kms_client)

    assert keyring.rewrap(AwsKms(new_arn, client=kms_client)) == 2
    assert calls["ReEncrypt"] == 2
    assert calls["Decrypt"] == 2  # the verification unwrap of each new wrapped DEK
    assert {k.kek_id for k in keyring.list_keys()} == {new_arn}
    assert _raw(engine) == before

    kms_client.schedule_key_deletion(KeyId=old_id, PendingWindowInDays=7)
    strict = StrictKmsClient(kms_client)
    strict_calls = _count_calls(kms_client)
    cold = Keyring(engine, AwsKms(new_arn, client=strict))  # type: ignore[arg-type]
    for _ in range(2):
        with Session(engine) as session:
            assert session.get(Person, 1).name == "Person 0"  # type: ignore[union-attr]
    with Session(engine) as session:
        names = [p.name for p in session.scalars(sa.select(Person).order_by(Person.id))]
    assert names == [f"Person {i}" for i in range(10)]
    assert strict_calls["Decrypt"] == 2
    assert cold.kms.kek_id == new_arn
    with pytest.raises(KmsKeyDisabledError):
        AwsKms(old_arn, client=strict).generate_data_key(32, _context())  # type: ignore[arg-type]


def test_provider_change_local_to_aws(
    engine: sa.Engine, kms_client: Any, local_kms: LocalKms, caplog: pytest.LogCaptureFixture
) -> None:
    local_keyring = Keyring(engine, local_kms)
    local_keyring.create_table()
    Base.metadata.create_all(engine)
    old_id = _add(engine, "t-acme", "local person")
    _, arn = _new_key(kms_client)
    aws = AwsKms(arn, client=kms_client)

    mixed = Keyring(engine, aws, previous_kms=[local_kms])
    new_id = _add(engine, "t-globex", "aws person")
    with Session(engine) as session:
        assert session.get(Person, old_id).name == "local person"  # type: ignore[union-attr]
        assert session.get(Person, new_id).name == "aws person"  # type: ignore[union-attr]
    providers = {(k.tenant_id, k.kms_provider) for k in mixed.list_keys()}
    assert providers == {("t-acme", "local"), ("t-globex", "aws-kms")}

    before = _raw(engine)
    caplog.set_level(logging.INFO, logger="sqlalchemy_encrypted.audit")
    assert local_keyring.rewrap(aws) == 4
    assert local_keyring.kms is aws
    assert {k.kek_id for k in local_keyring.list_keys()} == {arn}
    assert _raw(engine) == before
    aws_only = Keyring(engine, AwsKms(arn, client=kms_client))
    with Session(engine) as session:
        names = sorted(p.name for p in session.scalars(sa.select(Person)))
    assert names == ["aws person", "local person"]
    assert aws_only.cache.stats.kms_calls == 4
    rewrapped = [r for r in caplog.records if getattr(r, "audit_event", "") == "key.rewrapped"]
    assert len(rewrapped) == 4
    assert "t-acme" in log_text(rewrapped)


def test_region_mismatch_named(moto_server: str, aws_credentials: None) -> None:
    _, arn = _new_key(_client(moto_server))
    elsewhere = AwsKms(arn, region_name="eu-west-1", endpoint_url=moto_server)

    with pytest.raises(KmsKeyNotFoundError) as raised:
        elsewhere.describe_kek(arn)

    message = str(raised.value)
    assert f"the key is in region {REGION}, but the client calls region eu-west-1" in message
    assert f"region_name={REGION!r}" in message
