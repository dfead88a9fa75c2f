"""TLS on loopback for tests: a throw-away certificate authority, and a proxy that terminates TLS in front of a
real RabbitMQ or PostgreSQL (whose configuration the tests may not change) and forwards plaintext to it.

    ca = CertificateAuthority("sntrack test CA")
    proxy = TlsProxy("127.0.0.1", 5672, ca.server_context(tmp_path, "localhost"))       # AMQPS in front of 5672
    proxy = TlsProxy("127.0.0.1", 5432, context, postgres=True)                         # PostgreSQL's SSLRequest
    url = proxy.url_for("amqps://guest:guest@x/vhost?cafile=...", host="localhost")

PostgreSQL starts TLS inside its own protocol: the client sends an 8-byte SSLRequest (a GSSENCRequest first, for
some libpq builds), the server answers b"S" (b"N" to GSSENC), then the TLS handshake runs on the same socket. The
proxy plays the server's part, then relays the decrypted stream to the real server, which sees a plaintext client
that never asked for SSL.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


class CertificateAuthority:
    """A CA key and self-signed certificate, valid for a day, that issues server certificates."""

    def __init__(self, name: str):
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (_builder(subject, subject, self._key)
                            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                         content_commitment=False, key_encipherment=False,
                                                         data_encipherment=False, key_agreement=False,
                                                         encipher_only=False, decipher_only=False), critical=True)
                            .sign(self._key, hashes.SHA256()))

    def write(self, folder: Path) -> Path:
        """The CA certificate as a PEM file: what a client trusts (cafile=, sslrootcert=)."""
        path = folder / f"{self.name.replace(' ', '-')}.pem"
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def server_context(self, folder: Path, hostname: str) -> ssl.SSLContext:
        """A server-side context whose certificate, signed by this CA, names `hostname` (a DNS name or an IP)."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san = x509.IPAddress(ipaddress.ip_address(hostname))
        except ValueError:
            san = x509.DNSName(hostname)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
        certificate = (_builder(subject, self.certificate.subject, key)
                       .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                       .sign(self._key, hashes.SHA256()))
        chain, key_file = folder / f"{hostname}-{id(key)}.pem", folder / f"{hostname}-{id(key)}.key"
        chain.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(chain, key_file)
        return context


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


class TlsProxy:
    """Listens on 127.0.0.1:<port>, terminates TLS with `context`, relays plaintext to the target server. Runs its
    own event loop in a background thread, so sync and async tests use it alike; a context manager."""

    def __init__(self, target_host: str, target_port: int, context: ssl.SSLContext, *, postgres: bool = False):
        self.target = (target_host, target_port)
        self.context = context
        self.postgres = postgres
        self.tls_versions: list[str] = []  # the protocol of each handshake that completed
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tlsproxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def url_for(self, url: str, host: str = "localhost") -> str:
        """`url` with its host:port replaced by `host` and the proxy's port (credentials, path and query kept)."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{host}:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{credentials}@{netloc}" if credentials else netloc))

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=None if self.postgres else self.context)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.postgres and not await self._start_postgres_tls(reader, writer):
                writer.close()
                return
        except (OSError, asyncio.IncompleteReadError):  # the client refused our certificate, or hung up
            writer.close()
            return
        if (tls := writer.get_extra_info("ssl_object")) is not None:
            self.tls_versions.append(tls.version())
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    async def _start_postgres_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        while (request := await reader.readexactly(8)) == GSSENC_REQUEST:
            writer.write(b"N")
        if request != SSL_REQUEST:
            return False  # a plaintext client: this proxy only speaks TLS
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(self.context)
        return True

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for writer in self._writers:
                writer.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TlsProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy `source` to `sink` until either side closes, then close `sink`."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        sink.close()
