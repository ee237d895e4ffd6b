"""Private TLS-only Redis services for tests: a certificate authority made in the test
(``trustme``), a single ``redis-server --port 0 --tls-port``, a Sentinel setup and a Cluster,
all speaking TLS only (the plaintext port is off)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis
import trustme

from tests.support.services import (
    form_cluster,
    free_cluster_port,
    free_port,
    kill_process,
    require_binary,
    start_sentinel,
    wait_until,
)


@dataclass(frozen=True)
class Certificates:
    """PEM files: the test CA, a server certificate for 127.0.0.1, a client certificate, a
    certificate of the same CA for another host, and a second CA that signed none of them (the
    "wrong CA")."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_host_cert: Path
    other_host_key: Path

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        ca, other = trustme.CA(), trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("idempotency-client")
        other_host = ca.issue_cert("other.example")
        files = cls(*(directory / name for name in (
            "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "other-ca.pem",
            "other-host.pem", "other-host.key")))
        ca.cert_pem.write_to_path(str(files.ca))
        server.cert_chain_pems[0].write_to_path(str(files.server_cert))
        server.private_key_pem.write_to_path(str(files.server_key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        other.cert_pem.write_to_path(str(files.other_ca))
        other_host.cert_chain_pems[0].write_to_path(str(files.other_host_cert))
        other_host.private_key_pem.write_to_path(str(files.other_host_key))
        return files

    def query(self) -> str:
        """The URL query that trusts the test CA."""
        return f"ssl_ca_certs={self.ca}"

    def tls_args(self, *, auth_clients: bool, other_host: bool = False) -> list[str]:
        cert, key = ((self.other_host_cert, self.other_host_key) if other_host
                     else (self.server_cert, self.server_key))
        return ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "yes" if auth_clients else "no"]

    def client(self, port: int, **kwargs: object) -> redis.Redis:
        """A plain redis-py client for setting up and checking (client certificate given; the
        host name is not checked, so that it also reaches a server with another host's
        certificate)."""
        return redis.Redis(port=port, ssl=True, ssl_ca_certs=str(self.ca),
                           ssl_check_hostname=False,
                           ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key),
                           **kwargs)  # type: ignore[arg-type]


class TlsRedisServer:
    """``redis-server --port 0 --tls-port P``: TLS only, on a free 127.0.0.1 port."""

    def __init__(self, certs: Certificates, *, auth_clients: bool = False,
                 extra_args: tuple[str, ...] = (), port: int | None = None,
                 other_host: bool = False) -> None:
        self.certs = certs
        self.other_host = other_host
        self.port = port or free_port()
        self.auth_clients = auth_clients
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix="idem-tls-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TlsRedisServer:
        self.process = subprocess.Popen(
            [require_binary("redis-server"), "--port", "0", "--tls-port", str(self.port),
             "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "", "--appendonly", "no",
             *self.certs.tls_args(auth_clients=self.auth_clients, other_host=self.other_host),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = self.client()
        wait_until(client.ping, f"TLS redis-server on port {self.port} to start", timeout=15,
                   interval=0.02)
        return self

    def client(self) -> redis.Redis:
        return self.certs.client(self.port)

    def close(self) -> None:
        kill_process(self.process)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class TlsSentinel:
    """A TLS master and one TLS sentinel monitoring it (quorum 1), the sentinel talking TLS to
    the master (``tls-replication yes``)."""

    def __init__(self, certs: Certificates, service: str = "idem-tls") -> None:
        self.certs = certs
        self.service = service
        self.master = TlsRedisServer(certs)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="idem-tls-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TlsSentinel:
        self.master.start()
        config = self.dir / "sentinel.conf"
        certs = self.certs
        config.write_text(
            f"port 0\ntls-port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"tls-cert-file {certs.server_cert}\ntls-key-file {certs.server_key}\n"
            f"tls-ca-cert-file {certs.ca}\ntls-auth-clients no\ntls-replication yes\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n")
        client = certs.client(self.port)
        self.process = start_sentinel(
            config, lambda: client.sentinel_get_master_addr_by_name(self.service),
            f"the TLS sentinel on port {self.port} to start", timeout=15)
        return self

    def close(self) -> None:
        kill_process(self.process)
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class TlsCluster:
    """A three-primary Redis Cluster, TLS for clients and for the cluster bus."""

    def __init__(self, certs: Certificates, size: int = 3) -> None:
        self.certs = certs
        self.nodes = [TlsRedisServer(certs, port=free_cluster_port(), extra_args=(
            "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
            "--tls-cluster", "yes")) for _ in range(size)]

    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> TlsCluster:
        for node in self.nodes:
            node.start()
        certs = self.certs
        form_cluster(self.nodes, ["--tls", "--cacert", str(certs.ca), "--cert",
                                  str(certs.client_cert), "--key", str(certs.client_key)])
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
