from __future__ import annotations

import traceback
from pathlib import Path
from urllib.parse import quote

import pytest

from celery_idempotency import (
    ConfigurationError,
    IdempotencyError,
    MemoryKeyStore,
    RedisKeyStore,
    StoreUnavailable,
    open_store,
)
from celery_idempotency.config import resolve
from celery_idempotency.redact import redact, redact_url
from celery_idempotency.store.connect import parse_store_url
from tests.support.services import free_port

SECRET = "s3cr@t/pw:x"  # holds '@', '/' and ':' : the characters that break naive redaction
ENCODED = quote(SECRET, safe="")


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:6379", "unsupported idempotency store URL scheme 'http'"),
    ("redis+sentinel://127.0.0.1:26379", "service_name"),
    ("redis+sentinel://127.0.0.1:26379/master/x", "service_name"),
    ("redis+sentinel://127.0.0.1/master", "the port is required"),
    ("redis+cluster://127.0.0.1:7000/3", "no database number"),
    ("redis+cluster://127.0.0.1:7000,nohost", "the port is required"),
    ("redis://127.0.0.1:99999/0", "bad port '99999'"),
    ("redis://127.0.0.1:abc/0", "bad port 'abc'"),
    ("redis://[::1:6379/0", "bad IPv6 address"),
    ("redis://::1:6379/0", "goes in brackets"),
    ("redis://127.0.0.1:6379/x", "with a number as db"),
    ("redis://127.0.0.1:6379/0/1", "with a number as db"),
    ("redis://a:1,b:2/0", "takes one host"),
    ("redis:/127.0.0.1:6379", "no '://' found"),
    ("unix://relative.sock", "absolute"),
    ("redis://127.0.0.1#frag", "fragment"),
])
def test_unusable_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_store(url)


@pytest.mark.parametrize(("url", "parameter"), [
    # redis-py's own parser passes these through (and fails later, or never): refused here.
    ("redis://127.0.0.1/0?sslcertreqs=required", "sslcertreqs"),
    ("rediss://127.0.0.1/0?ssl_cert_req=required", "ssl_cert_req"),
    ("redis://127.0.0.1/0?socket_timeout=5", "socket_timeout"),
    ("redis://127.0.0.1/0?db=2", "db"),
    ("redis+sentinel://127.0.0.1:26379/svc?ssl_verify=1", "ssl_verify"),
    ("redis+cluster://127.0.0.1:7000?readonly=1", "readonly"),
    ("redis+cluster://127.0.0.1:7000?sentinel_password=x", "sentinel_password"),
    ("unix:///tmp/r.sock?ssl=true", "ssl"),
])
def test_unknown_query_parameters_are_refused_by_name(url: str, parameter: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unknown query parameter '{parameter}'"):
        open_store(url)


@pytest.mark.parametrize(("url", "message"), [
    ("redis://127.0.0.1/0?ssl_cert_reqs=required", "without TLS"),
    ("redis+cluster://127.0.0.1:7000?ssl_ca_certs=/etc/hostname", "without TLS"),
    ("rediss://127.0.0.1/0?ssl=false", "contradicts"),
    ("rediss://127.0.0.1/0?ssl_cert_reqs=maybe", "must be one of required, optional, none"),
    ("rediss://127.0.0.1/0?ssl_cert_reqs=none&ssl_check_hostname=true", "cannot be combined"),
    ("rediss://127.0.0.1/0?ssl_ca_certs=/no/such/ca.pem", "no such file '/no/such/ca.pem'"),
    ("rediss://127.0.0.1/0?ssl_certfile=/etc/hostname", "both ssl_certfile and ssl_keyfile"),
    ("redis://127.0.0.1/0?ssl=maybe", "ssl must be true or false"),
    ("rediss://127.0.0.1/0?ssl=true&ssl=true", "given twice"),
    ("redis://secret@127.0.0.1/0", "must be user:password or :password"),
    ("redis://:ab?x=cd@127.0.0.1/0", "percent-encode a '\\?' in the password"),
])
def test_contradictory_or_unusable_options_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_store(url)


def test_url_schemes_give_the_right_stores_without_connecting() -> None:
    assert isinstance(open_store("memory://"), MemoryKeyStore)
    single = open_store("redis://127.0.0.1:1/0", prefix="p:")
    assert isinstance(single, RedisKeyStore) and single.prefix == "p:"
    sentinel = open_store("redis+sentinel://:secret@127.0.0.1:1,127.0.0.1:2/svc/4")
    assert isinstance(sentinel, RedisKeyStore)
    pool = sentinel.client.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"],
            pool.connection_kwargs["password"]) == ("svc", 4, "secret")
    ports = [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels]
    assert ports == [1, 2]


def test_credentials_and_tls_options_reach_every_kind_of_client(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before connecting")
    single = open_store(f"rediss://app:{ENCODED}@127.0.0.1:1/3?ssl_ca_certs={ca}")
    assert isinstance(single, RedisKeyStore)
    kwargs = single.client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", SECRET, 3)
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == (
        str(ca), "required", True)
    assert single.client.connection_pool.connection_class.__name__ == "SSLConnection"

    sentinel = open_store(f"rediss+sentinel://app:{ENCODED}@127.0.0.1:1/svc?ssl_ca_certs={ca}"
                          "&sentinel_password=sp")
    assert isinstance(sentinel, RedisKeyStore)
    pool = sentinel.client.connection_pool
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    assert (pool.connection_kwargs["username"], pool.connection_kwargs["password"]) == (
        "app", SECRET)
    to_sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert to_sentinel.connection_class.__name__ == "SSLConnection"
    assert to_sentinel.connection_kwargs["password"] == "sp"

    cluster = parse_store_url(f"redis+cluster://app:{ENCODED}@h1:7000,[::1]:7001?ssl=true"
                              "&ssl_cert_reqs=optional")
    assert (cluster.username, cluster.password, cluster.tls) == ("app", SECRET, True)
    assert cluster.hosts == (("h1", 7000), ("::1", 7001))
    assert cluster.tls_kwargs() == {"ssl": True, "ssl_cert_reqs": "optional",
                                    "ssl_check_hostname": False}
    assert parse_store_url("rediss+cluster://h:1").tls


def test_the_address_repr_hides_the_password() -> None:
    address = parse_store_url(f"redis://app:{ENCODED}@127.0.0.1/0")
    assert SECRET not in repr(address) and ENCODED not in repr(address)


def test_unreachable_cluster_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="unreachable"):
        open_store(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.2)


# -- redaction -------------------------------------------------------------------------------------

MALFORMED = {
    "bad port": "redis://app:{pw}@127.0.0.1:99999/0",
    "unknown scheme": "rdis://app:{pw}@127.0.0.1:6379/0",
    "missing ://": "redis:/app:{pw}@127.0.0.1:6379/0",
    "no scheme at all": ":{pw}@127.0.0.1:6379/0",
    "extra sentinel path segment": "redis+sentinel://app:{pw}@127.0.0.1:26379/svc/0/extra",
    "cluster with a db number": "redis+cluster://app:{pw}@127.0.0.1:7000/2",
    "bad IPv6": "redis://app:{pw}@[::1:6379/0",
    "unknown parameter": "redis://app:{pw}@127.0.0.1:6379/0?sslmode=on",
    "'?' in the password": "redis://app:{pw}?ssl=1@127.0.0.1:6379/0",
    "unreachable cluster": "redis+cluster://app:{pw}@127.0.0.1:{port}",
}


def leaks(text: str) -> list[str]:
    """The forms of SECRET that appear in ``text`` (none, or the test fails)."""
    return [form for form in (SECRET, ENCODED, "s3cr@t", "t/pw:x", "s3cr%40t") if form in text]


@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "raw"])
@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_errors_for_malformed_urls_never_show_the_password(kind: str, encoded: bool) -> None:
    url = MALFORMED[kind].format(pw=ENCODED if encoded else SECRET, port=free_port())
    with pytest.raises(IdempotencyError) as caught:
        open_store(url, timeout=0.2)
    error = caught.value
    shown = "".join(traceback.format_exception(error))  # what a log's traceback prints
    for text in (str(error), repr(error), shown):
        assert not leaks(text), text
    cause = error.__cause__
    while cause is not None:
        assert not leaks(str(cause)) and not leaks(repr(cause))
        cause = cause.__cause__
    if isinstance(error, ConfigurationError):  # it shows the URL, redacted
        assert ":***@" in str(error), str(error)


def test_the_settings_check_never_shows_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve({"idempotency_store_url": f"redis:/app:{SECRET}@127.0.0.1:6379/0"}, {})
    assert not leaks(str(caught.value)) and "***" in str(caught.value)


@pytest.mark.parametrize(("text", "shown"), [
    ("redis://:pw1234@h:1/0", "redis://:***@h:1/0"),
    ("see rediss://user:pw1234@h:1/0?x=1 now", "see rediss://user:***@h:1/0?x=1 now"),
    ("'redis://u:p@w@rd@h:1'", "'redis://u:***@h:1'"),
    ("redis+sentinel://h:1/s?sentinel_password=pw1234&ssl=true",
     "redis+sentinel://h:1/s?sentinel_password=***&ssl=true"),
    ("redis://pw1234@h:1", "redis://***@h:1"),
    ("redis://h:1/0", "redis://h:1/0"),
])
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_knows_the_password_of_the_url_in_any_form() -> None:
    url = f"redis://app:{ENCODED}@h:1/0"
    text = f"failed for {SECRET!r} ({ENCODED}) and {SECRET}"
    assert not leaks(redact(text, url))
    assert redact_url(url) == "redis://app:***@h:1/0"
