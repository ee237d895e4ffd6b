"""Redis clients from store URLs: a single server, Redis Sentinel, or Redis Cluster.

``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS)
    a single server (port 6379, db 0 by default).
``unix://[[user]:password@]/path/to/redis.sock[?db=N]``
    a single server on a Unix socket.
``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]``
    the current master of ``service_name``, found through the given sentinels (re-resolved on
    failover by redis-py's SentinelConnectionPool). ``rediss+sentinel://``: TLS to the
    sentinels and to the master. The user and password are the master's; sentinels that
    want their own take ``?sentinel_username=...&sentinel_password=...``.
``redis+cluster://[[user]:password@]host:port[,host:port...]``, ``rediss+cluster://...``
    a Redis Cluster, reached through any of the given nodes. Every record's key name is a
    single hash tag, so each Lua script touches one slot.

Query parameters (anything else is an error naming it: a misspelt ``ssl_cert_reqs`` must not
quietly mean "no verification", and redis-py's own parser passes unknown names through):

- ``ssl=true``: TLS, the same as the ``rediss`` form of the scheme;
- TLS only: ``ssl_cert_reqs`` (``required``, the default; ``optional``; ``none``),
  ``ssl_ca_certs`` (a PEM file of CAs to trust instead of the system's), ``ssl_certfile`` and
  ``ssl_keyfile`` (a client certificate), ``ssl_check_hostname`` (default: on when
  certificates are required);
- ``unix://`` only: ``db``; Sentinel only: ``sentinel_username``, ``sentinel_password``.

Timeouts and retries come from the settings (``idempotency_store_timeout``), not the URL.
Every message here shows the URL through `redact_url`: never its password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from ..exceptions import ConfigurationError, StoreMisconfigured, StoreUnavailable
from ..redact import redact, redact_url
from .errors import Fault, classify

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = (*SINGLE_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
# Kept for callers that name the plaintext forms.
SENTINEL_SCHEME, CLUSTER_SCHEME = SENTINEL_SCHEMES[0], CLUSTER_SCHEMES[0]

DEFAULT_PORT = 6379
MAX_CONNECTIONS = 2**31  # per pool (per node on a Cluster): see _common_options
TLS_PARAMETERS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                  "ssl_check_hostname")
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("required", "optional", "none")
_SENTINEL_PARAMETERS = ("sentinel_username", "sentinel_password")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def accepted_parameters(scheme: str) -> tuple[str, ...]:
    """The query parameters a URL of ``scheme`` may carry."""
    extra: tuple[str, ...] = ()
    if scheme == "unix":
        return ("db",)
    if scheme in SENTINEL_SCHEMES:
        extra = _SENTINEL_PARAMETERS
    return ("ssl", *TLS_PARAMETERS, *extra)


@dataclass(frozen=True)
class StoreAddress:
    """A store URL, parsed and checked: where the store is, who we are, and how to talk."""

    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()
    socket_path: str | None = None
    db: int = 0
    service: str | None = None  # Sentinel: the monitored master's name
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: Mapping[str, Any] = field(default_factory=dict)
    sentinel_auth: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        if self.scheme in SENTINEL_SCHEMES:
            return "sentinel"
        if self.scheme in CLUSTER_SCHEMES:
            return "cluster"
        return "unix" if self.scheme == "unix" else "single"

    def credentials(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password}

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py connection arguments for TLS (none for plaintext)."""
        return {"ssl": True, **self.tls_options} if self.tls else {}


class _Parser:
    """Parses one URL; every error names the problem and shows the URL redacted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = redact_url(url)

    def error(self, problem: str) -> ConfigurationError:
        return ConfigurationError(redact(f"bad idempotency store URL {self.shown!r}: {problem}",
                                         self.url))

    def parse(self) -> StoreAddress:
        scheme, separator, rest = self.url.partition("://")
        scheme = scheme.lower()
        if not separator:
            raise self.error("expected scheme://..., e.g. redis://127.0.0.1:6379/0 (no '://' "
                             "found)")
        if scheme not in SCHEMES:
            raise ConfigurationError(redact(
                f"unsupported idempotency store URL scheme {scheme!r} in {self.shown!r}; use "
                f"one of {', '.join(s + '://' for s in SCHEMES)} or memory://", self.url))
        if "#" in rest:
            raise self.error("a store URL has no '#fragment' (a '#' in a password must be "
                             "percent-encoded as %23)")
        if "?" in rest[:max(rest.rfind("@"), 0)]:
            # Either a password with a raw '?' or a query value with a raw '@': which part is
            # which cannot be told, and guessing could quote a piece of the password.
            raise self.error("'?' before the last '@': percent-encode a '?' in the password "
                             "as %3F (and an '@' in a query value as %40)")
        rest, _, query = rest.partition("?")
        # The last '@' ends the credentials: a password may hold an unencoded '@'.
        userinfo, at, location = rest.rpartition("@")
        username, password = self.credentials(userinfo) if at else (None, None)
        params = self.query(scheme, query)
        tls, tls_options = self.tls(scheme, params)
        if scheme == "unix":
            return self.unix(location, params, username, password)
        netloc, slash, path = location.partition("/")
        segments = [unquote(s) for s in path.split("/")] if slash and path else []
        if segments and segments[-1] == "":  # one trailing slash is harmless
            segments.pop()
        common: dict[str, Any] = {"scheme": scheme, "username": username,
                                  "password": password, "tls": tls, "tls_options": tls_options}
        if scheme in SENTINEL_SCHEMES:
            if not 1 <= len(segments) <= 2 or not segments[0] or (
                    len(segments) == 2 and not segments[1].isdigit()):
                raise self.error(f"expected {scheme}://host:port[,host:port]/service_name[/db]"
                                 f", got the path {'/' + path if path else '(none)'!r}")
            sentinel_auth = {name[len("sentinel_"):]: value for name, value in params.items()
                             if name in _SENTINEL_PARAMETERS}
            return StoreAddress(hosts=self.hosts(netloc, default_port=None),
                                service=segments[0],
                                db=int(segments[1]) if len(segments) == 2 else 0,
                                sentinel_auth=sentinel_auth, **common)
        if scheme in CLUSTER_SCHEMES:
            if segments:
                raise self.error(f"a cluster has no database number or path, got "
                                 f"{'/' + path!r} (Redis Cluster has only db 0)")
            return StoreAddress(hosts=self.hosts(netloc, default_port=None), **common)
        if len(segments) > 1 or (segments and not segments[0].isdigit()):
            raise self.error(f"expected {scheme}://host[:port][/db] with a number as db, got "
                             f"the path {'/' + path!r}")
        hosts = self.hosts(netloc or "127.0.0.1", default_port=DEFAULT_PORT)
        if len(hosts) != 1:
            raise self.error(f"{scheme}:// takes one host; for several use redis+sentinel:// "
                             "or redis+cluster://")
        return StoreAddress(hosts=hosts, db=int(segments[0]) if segments else 0, **common)

    def credentials(self, userinfo: str) -> tuple[str | None, str | None]:
        user, colon, password = userinfo.partition(":")
        if not colon:
            raise self.error("the part before '@' must be user:password or :password (a "
                             "lone name is ambiguous: is it a user or a password?)")
        return unquote(user) or None, unquote(password) or None

    def query(self, scheme: str, query: str) -> dict[str, str]:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise self.error("the query string is not name=value pairs joined by '&'") from None
        accepted = accepted_parameters(scheme)
        params: dict[str, str] = {}
        for name, value in pairs:
            if name not in accepted:
                raise self.error(f"unknown query parameter {name!r}; {scheme}:// accepts "
                                 f"{', '.join(accepted)}")
            if name in params:
                raise self.error(f"query parameter {name!r} is given twice")
            params[name] = value
        return params

    def flag(self, name: str, value: str) -> bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise self.error(f"{name} must be true or false, got {value!r}")

    def tls(self, scheme: str, params: Mapping[str, str]) -> tuple[bool, dict[str, Any]]:
        tls = scheme.startswith("rediss")
        if "ssl" in params:
            wanted = self.flag("ssl", params["ssl"])
            if tls and not wanted:
                raise self.error(f"ssl=false contradicts the TLS scheme {scheme}://")
            tls = wanted
        given = [name for name in TLS_PARAMETERS if name in params]
        if given and not tls:
            raise self.error(f"{', '.join(given)} without TLS: use rediss://, rediss+sentinel://"
                             ", rediss+cluster:// or add ssl=true")
        options: dict[str, Any] = {}
        cert_reqs = params.get("ssl_cert_reqs", "required").lower()
        if cert_reqs not in _CERT_REQS:
            raise self.error(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got "
                             f"{params['ssl_cert_reqs']!r}")
        if tls:
            options["ssl_cert_reqs"] = cert_reqs
            check = params.get("ssl_check_hostname")
            options["ssl_check_hostname"] = (cert_reqs == "required" if check is None
                                             else self.flag("ssl_check_hostname", check))
            if options["ssl_check_hostname"] and cert_reqs == "none":
                raise self.error("ssl_check_hostname=true needs certificates: it cannot be "
                                 "combined with ssl_cert_reqs=none")
        for name in _TLS_FILES:
            if name in params:
                path = params[name]
                if not os.path.isfile(path):
                    raise self.error(f"{name}: no such file {path!r}")
                options[name] = path
        if ("ssl_keyfile" in options) != ("ssl_certfile" in options):
            raise self.error("a client certificate needs both ssl_certfile and ssl_keyfile")
        return tls, options

    def unix(self, location: str, params: Mapping[str, str], username: str | None,
             password: str | None) -> StoreAddress:
        path = unquote(location)
        if not path.startswith("/"):
            raise self.error("expected unix:///absolute/path/to/redis.sock")
        db = params.get("db", "0")
        if not db.isdigit():
            raise self.error(f"db must be a number, got {db!r}")
        return StoreAddress(scheme="unix", socket_path=path, db=int(db), username=username,
                            password=password)

    def hosts(self, netloc: str, *, default_port: int | None) -> tuple[tuple[str, int], ...]:
        found = []
        for item in netloc.split(","):
            item = item.strip()
            if item.startswith("["):  # [IPv6]:port
                host, bracket, port = item[1:].partition("]")
                if not bracket or not host or (port and not port.startswith(":")):
                    raise self.error(f"bad IPv6 address {item!r}: expected [address]:port")
                port = port[1:]
            else:
                host, colon, port = item.rpartition(":")
                if not colon:
                    host, port = item, ""
            if not host or (":" in host and not item.startswith("[")):
                raise self.error(f"expected host:port pairs separated by commas, got {item!r} "
                                 "(an IPv6 address goes in brackets: [::1]:6379)")
            if not port:
                if default_port is None:
                    raise self.error(f"expected host:port pairs separated by commas, got "
                                     f"{item!r}: the port is required")
                port = str(default_port)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise self.error(f"bad port {port!r} for host {host!r}: expected a number "
                                 "from 1 to 65535")
            found.append((host, int(port)))
        return tuple(found)


def parse_store_url(url: str) -> StoreAddress:
    """Parse and check a Redis store URL (`ConfigurationError` naming what is wrong)."""
    return _Parser(url).parse()


def _common_options(timeout: float) -> dict[str, Any]:
    # Few, fast retries: a store that is down must surface as StoreUnavailable quickly so
    # that publishing fails closed and workers back off, instead of blocking for seconds.
    # Every script is safe to repeat (a repeated call by the same caller is recognised).
    # max_connections: redis-py >= 6 caps a pool at 100 connections unless told otherwise, and
    # the 101st caller at once gets "Too many connections" (StoreUnavailable here) instead of
    # waiting: a thread or gevent pool with a concurrency above 100 would fail tasks for no
    # fault of the store. The cap of redis-py 5 (2**31) is kept for every version.
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            "max_connections": MAX_CONNECTIONS}


def _single(address: StoreAddress, timeout: float) -> redis.Redis:
    if address.socket_path is not None:
        location: dict[str, Any] = {"unix_socket_path": address.socket_path}
    else:
        host, port = address.hosts[0]
        location = {"host": host, "port": port}
    return redis.Redis(**location, db=address.db, health_check_interval=30,
                       **address.credentials(), **address.tls_kwargs(),
                       **_common_options(timeout))


class _Sentinel(Sentinel):
    """redis-py's Sentinel, with each sentinel's own error in `MasterNotFoundError`: redis-py
    names only the error class, which hides e.g. a failed certificate check."""

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)  # type: ignore[no-untyped-call]
        except MasterNotFoundError as exc:
            reasons = []
            for sentinel in self.sentinels:
                kwargs = sentinel.connection_pool.connection_kwargs
                try:
                    sentinel.ping()
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    reasons.append(f"sentinel {kwargs.get('host')}:{kwargs.get('port')}: "
                                   f"{error}")
            why = "; ".join(reasons) or "the sentinels answer but know no such master"
            raise MasterNotFoundError(f"no master found for {service_name!r} ({why})") from exc


def _sentinel_master(address: StoreAddress, timeout: float) -> redis.Redis:
    # The sentinels get the same transport (TLS or not, same CA and client certificate) but
    # their own credentials: a sentinel's password is often not the master's.
    sentinel_kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                       **address.sentinel_auth, **address.tls_kwargs()}
    sentinel = _Sentinel(  # type: ignore[no-untyped-call]
        list(address.hosts), sentinel_kwargs=sentinel_kwargs, **address.credentials(),
        **address.tls_kwargs(), **_common_options(timeout))
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        address.service, db=address.db)
    return master


def _cluster(address: StoreAddress, url: str, timeout: float) -> RedisCluster:
    nodes = [ClusterNode(host, port)  # type: ignore[no-untyped-call]
             for host, port in address.hosts]
    try:
        # Unlike the other clients, RedisCluster connects at once (to learn the slots).
        return RedisCluster(startup_nodes=nodes, **address.credentials(),
                            **address.tls_kwargs(), **_common_options(timeout))
    except (RedisClusterException, redis.RedisError) as exc:
        # Not chained: the cause's text is redacted here, and a logged traceback must not
        # show it raw. redis-py wraps what the nodes answered: a refused password does not
        # heal by retrying, unlike a node that is down.
        if any(classify(link) is Fault.MISCONFIGURED for link in _chain(exc)
               if isinstance(link, redis.RedisError)):  # a wrong password, an ACL
            raise StoreMisconfigured(redact(
                f"the idempotency store (Redis Cluster) refused the connection: {exc}; check "
                "the user name and password in idempotency_store_url", url)) from None
        raise StoreUnavailable(redact(f"idempotency store unreachable: {exc}", url)) from None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling."""
    links: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in links:
        links.append(current)
        current = current.__cause__ or current.__context__
    return links


def redis_client(url: str, *, timeout: float) -> redis.Redis | RedisCluster:
    """A client for ``url``; `ConfigurationError` for a URL it cannot use."""
    address = parse_store_url(url)
    if address.kind == "sentinel":
        return _sentinel_master(address, timeout)
    if address.kind == "cluster":
        return _cluster(address, url, timeout)
    return _single(address, timeout)
