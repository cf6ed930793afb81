"""Helpers for webhook tests: a fake DNS, a transport that must never be reached, a socket guard
that fails any connection to a non-loopback address, and a real HTTP(S) receiver on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx


class FakeResolver:
    """``getaddrinfo`` over a fixed map; unknown names fail (real DNS is never asked)."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, f"unknown test host {host}")
        out: list[tuple[Any, ...]] = []
        for text in self.names[host]:
            addr = ipaddress.ip_address(text)
            if addr.version == 4:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, port)))
            else:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, port, 0, 0)))
        return out


class RebindingResolver(FakeResolver):
    """Answers the first lookup of a name with one address and every later one with another."""

    def __init__(self, host: str, first: str, then: str) -> None:
        super().__init__({host: [first]})
        self.host, self.then = host, then

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        out = super().__call__(host, port, *args, **kwargs)
        self.names[host] = [self.then]
        return out


class NoConnectTransport(httpx.BaseTransport):
    """The transport behind the guard in refusal tests: reaching it means the guard let a
    request through, which fails the test before any socket is opened."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raise AssertionError(f"the guard let a request through to {request.url}")


def guard_sockets(monkeypatch: Any) -> list[Any]:
    """Fail any socket connection to a non-loopback address; returns the addresses connected to."""
    seen: list[Any] = []
    original = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        seen.append(address)
        if not ipaddress.ip_address(str(host).split("%")[0]).is_loopback:
            raise AssertionError(f"test tried to connect to non-loopback {address}")
        original(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0
    """time.monotonic() when the request had arrived"""


@dataclass(frozen=True)
class Reply:
    """How the receiver answers one request: a status after ``delay_s``; ``hang`` never answers
    (until the receiver stops); ``endless`` streams a body that never ends."""

    status: int = 204
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    delay_s: float = 0.0
    hang: bool = False
    endless: bool = False


@dataclass
class Receiver:
    port: int
    received: list[Received] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    answered: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def _answer(handler: BaseHTTPRequestHandler, reply: Reply, receiver: Receiver) -> None:
    if reply.hang:
        receiver.release.wait()
        return
    if reply.delay_s and receiver.release.wait(reply.delay_s):
        return
    handler.send_response(reply.status)
    for name, value in reply.headers:
        handler.send_header(name, value)
    if reply.endless:
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        chunk = b"x" * 65536
        while not receiver.release.is_set():
            handler.wfile.write(chunk)
        return
    handler.send_header("Content-Length", str(len(reply.body)))
    handler.end_headers()
    handler.wfile.write(reply.body)
    receiver.answered += 1


@contextmanager
def http_receiver(
    ssl_context: ssl.SSLContext | None = None,
    replies: list[Reply] | None = None,
    port: int = 0,
) -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 (a free port, or ``port``) that records requests and
    answers them with ``replies`` in turn (the last one repeats; default: 204)."""
    receiver = Receiver(port=port)
    script = list(replies or [Reply()])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            receiver.received.append(
                Received(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.monotonic(),
                )
            )
            reply = script.pop(0) if len(script) > 1 else script[0]
            # the sender may hang up (timeouts, capped reads): that is what is tested
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                _answer(self, reply, receiver)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    if ssl_context is not None:

        def on_sni(sock: Any, name: str | None, ctx: Any) -> None:
            receiver.sni.append(name)

        ssl_context.sni_callback = on_sni
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def make_tls(tmp: Path, hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a certificate for ``hostname`` only (no IP SAN): (server, client)
    contexts. A client that checked the certificate against the IP address would fail."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlx-fusion test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = tmp / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem = tmp / "cert.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = tmp / "key.pem"
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(ca_pem))
    return server, client
