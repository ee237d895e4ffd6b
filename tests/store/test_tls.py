"""Store URLs with TLS and credentials, for real: private TLS-only redis-servers (``--port 0
--tls-port``) with a certificate authority made in the test, as a single node, behind a
Sentinel (TLS to the sentinel and to the master) and as a Cluster (TLS for clients and the
cluster bus). Each has an ACL user ``idem`` whose password the URL must carry."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from celery_idempotency import (
    IdempotencyError,
    KeyState,
    RecordRef,
    RedisKeyStore,
    StoreMisconfigured,
    StoreUnavailable,
    open_store,
)
from celery_idempotency.store import ClaimStatus
from tests.support.records import RESULT
from tests.support.tls import Certificates, TlsCluster, TlsRedisServer, TlsSentinel

USER = ("--user", "idem", "on", ">s3cret-pw", "~*", "&*", "+@all")
AUTH = "idem:s3cret-pw@"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certs: Certificates) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(certs, extra_args=USER).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_sentinel(certs: Certificates) -> Iterator[TlsSentinel]:
    sentinel = TlsSentinel(certs)
    sentinel.master.extra_args = USER
    yield sentinel.start()
    sentinel.close()


@pytest.fixture(scope="module")
def tls_cluster(certs: Certificates) -> Iterator[TlsCluster]:
    cluster = TlsCluster(certs)
    for node in cluster.nodes:
        node.extra_args += USER
    yield cluster.start()
    cluster.close()


def round_trip(url: str) -> RedisKeyStore:
    """Open the store and run one key through reserve, claim and complete."""
    store = open_store(url, prefix=f"tls-{uuid.uuid4().hex[:8]}:", timeout=5)
    assert isinstance(store, RedisKeyStore)
    ref = RecordRef("tls.task", "order-1")
    store.reserve(ref, task_id="t1", fingerprint="fp", task_name="tls.task", ttl_ms=60_000)
    claim = store.claim(ref, task_id="t1", owner="o1", fingerprint="fp", task_name="tls.task",
                        lease_ms=60_000, ttl_ms=60_000)
    assert claim.status is ClaimStatus.CLAIMED
    store.complete(ref, owner="o1", fence=claim.fence, result=RESULT, ttl_ms=60_000)
    record = store.get(ref)
    assert record is not None and record.state is KeyState.SUCCEEDED
    return store


def refused(url: str, *, needle: str) -> IdempotencyError:
    """The store cannot be used: unreachable (TLS handshake) or refused for good (bad
    credentials: errors.py's classification); either way an error that says why."""
    with pytest.raises((StoreUnavailable, StoreMisconfigured)) as caught:
        store = open_store(url, timeout=5)
        store.ping()
    assert needle in str(caught.value), str(caught.value)
    return caught.value


# -- single node ---------------------------------------------------------------------------------

def test_single_node_over_tls_with_user_and_password(tls_server: TlsRedisServer,
                                                     certs: Certificates) -> None:
    store = round_trip(f"rediss://{AUTH}127.0.0.1:{tls_server.port}/0?{certs.query()}")
    assert store.client.acl_whoami() == "idem"  # the user of the URL, not "default"
    store.close()
    # ?ssl=true is the same as rediss://
    round_trip(f"redis://{AUTH}127.0.0.1:{tls_server.port}/0?ssl=true&{certs.query()}").close()


def test_single_node_wrong_password_is_refused(tls_server: TlsRedisServer,
                                               certs: Certificates) -> None:
    error = refused(f"rediss://idem:wrong@127.0.0.1:{tls_server.port}/0?{certs.query()}",
                    needle="invalid username-password pair")
    assert "wrong" not in str(error)


def test_single_node_with_a_certificate_from_another_ca_is_a_clear_error(
        tls_server: TlsRedisServer, certs: Certificates) -> None:
    refused(f"rediss://{AUTH}127.0.0.1:{tls_server.port}/0?ssl_ca_certs={certs.other_ca}",
            needle="CERTIFICATE_VERIFY_FAILED")


def test_cert_reqs_required_really_verifies(tls_server: TlsRedisServer) -> None:
    # Required (the default, and said explicitly): the test CA is not among the system's.
    for query in ("", "?ssl_cert_reqs=required"):
        refused(f"rediss://{AUTH}127.0.0.1:{tls_server.port}/0{query}",
                needle="CERTIFICATE_VERIFY_FAILED")
    # What the flag changes: without verification the same server is accepted.
    round_trip(f"rediss://{AUTH}127.0.0.1:{tls_server.port}/0?ssl_cert_reqs=none").close()


def test_the_host_name_is_checked(certs: Certificates) -> None:
    """A certificate of the trusted CA, but for another host: refused unless the URL turns
    host name checking off (it is on by default when certificates are required)."""
    server = TlsRedisServer(certs, other_host=True).start()
    try:
        base = f"rediss://127.0.0.1:{server.port}/0?{certs.query()}"
        refused(base, needle="IP address mismatch")
        round_trip(f"{base}&ssl_check_hostname=false").close()
    finally:
        server.close()


def test_plaintext_to_a_tls_port_fails_instead_of_talking_in_clear(
        tls_server: TlsRedisServer) -> None:
    with pytest.raises(StoreUnavailable):
        open_store(f"redis://{AUTH}127.0.0.1:{tls_server.port}/0", timeout=2).ping()


def test_client_certificates(certs: Certificates) -> None:
    server = TlsRedisServer(certs, auth_clients=True).start()
    try:
        base = f"rediss://127.0.0.1:{server.port}/0?{certs.query()}"
        with pytest.raises(StoreUnavailable):
            open_store(base, timeout=5).ping()
        round_trip(f"{base}&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
                   ).close()
    finally:
        server.close()


# -- Sentinel ------------------------------------------------------------------------------------

def test_sentinel_over_tls_with_user_and_password(tls_sentinel: TlsSentinel,
                                                  certs: Certificates) -> None:
    url = (f"rediss+sentinel://{AUTH}127.0.0.1:{tls_sentinel.port}/{tls_sentinel.service}/0"
           f"?{certs.query()}")
    store = round_trip(url)
    assert store.client.acl_whoami() == "idem"
    store.close()
    round_trip(url.replace("rediss+sentinel", "redis+sentinel") + "&ssl=true").close()


def test_sentinel_with_a_certificate_from_another_ca_is_a_clear_error(
        tls_sentinel: TlsSentinel, certs: Certificates) -> None:
    refused(f"rediss+sentinel://{AUTH}127.0.0.1:{tls_sentinel.port}/{tls_sentinel.service}"
            f"/0?ssl_ca_certs={certs.other_ca}", needle="CERTIFICATE_VERIFY_FAILED")


def test_sentinel_wrong_password_is_refused(tls_sentinel: TlsSentinel,
                                            certs: Certificates) -> None:
    refused(f"rediss+sentinel://idem:nope@127.0.0.1:{tls_sentinel.port}/{tls_sentinel.service}"
            f"/0?{certs.query()}", needle="invalid username-password pair")


# -- Cluster -------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["rediss+cluster://{auth}{hosts}?{ca}",
                                  "redis+cluster://{auth}{hosts}?ssl=true&{ca}"])
def test_cluster_over_tls_with_user_and_password(tls_cluster: TlsCluster, certs: Certificates,
                                                 form: str) -> None:
    store = round_trip(form.format(auth=AUTH, hosts=tls_cluster.hosts(), ca=certs.query()))
    assert store.client.acl_whoami() == "idem"
    store.close()


def test_cluster_tls_options_are_not_ignored(tls_cluster: TlsCluster,
                                             certs: Certificates) -> None:
    hosts = tls_cluster.hosts()
    # ssl_cert_reqs=required with no CA for the test's certificates: verification fails.
    refused(f"redis+cluster://{AUTH}{hosts}?ssl=true&ssl_cert_reqs=required",
            needle="CERTIFICATE_VERIFY_FAILED")
    refused(f"rediss+cluster://{AUTH}{hosts}?ssl_ca_certs={certs.other_ca}",
            needle="CERTIFICATE_VERIFY_FAILED")
    # Plaintext to TLS ports: no connection, rather than a silent plaintext one.
    refused(f"redis+cluster://{AUTH}{hosts}", needle="unreachable")


def test_cluster_user_and_password_are_honoured(tls_cluster: TlsCluster,
                                                certs: Certificates) -> None:
    with pytest.raises(StoreMisconfigured, match="invalid username-password pair") as caught:
        open_store(f"rediss+cluster://idem:nope@{tls_cluster.hosts()}?{certs.query()}",
                   timeout=5)
    assert "nope" not in str(caught.value) and "user name and password" in str(caught.value)

