"""TLS to RabbitMQ (AMQPS) and PostgreSQL with certificate verification on, configured in the URLs (issue 10,
item 4): the publisher, the consumers and Optuna's storage work through it, and a certificate that does not verify
(another CA, another host name) is refused with one line naming the setting to fix.

The shared servers speak plaintext and may not be reconfigured, so a TLS-terminating proxy on loopback
(tests/tls.py) stands in front of each, with a certificate of a certificate authority the test generates.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from common.errors import ConfigurationError
from common.postgres import drop_database
from common.urls import redact
from consumers.persistence import create_pool
from consumers.runtime import connect
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from producer.study import open_study
from sntrack.settings import Settings
from tests.conftest import wait_until
from tests.tls import CertificateAuthority, TlsProxy


def with_query(url: str, query: str, *, scheme: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=scheme or parts.scheme, query=query))


@contextmanager
def tls_settings(settings: Settings, server: CertificateAuthority, trusted: Path, folder: Path,
                 host: str = "localhost") -> Iterator[tuple[Settings, TlsProxy, TlsProxy]]:
    """Settings reaching RabbitMQ and PostgreSQL through TLS proxies whose certificate (for `localhost`) `server`
    signed; the clients trust the CA in `trusted` and connect to `host`."""
    context = server.server_context(folder, "localhost")
    amqp, postgres = urlsplit(settings.amqp_url), urlsplit(settings.database_url)
    with TlsProxy(amqp.hostname, amqp.port or 5672, context) as broker, \
            TlsProxy(postgres.hostname, postgres.port or 5432, context, postgres=True) as database:
        yield settings.replace(
            amqp_url=with_query(broker.url_for(settings.amqp_url, host), f"cafile={trusted}", scheme="amqps"),
            database_url=with_query(database.url_for(settings.database_url, host),
                                    f"sslmode=verify-full&sslrootcert={trusted}"),
        ), broker, database


async def test_publisher_consumers_and_optuna_work_over_verified_tls(env, tmp_path):
    ca = CertificateAuthority("sntrack test CA")
    with tls_settings(env.settings, ca, ca.write(tmp_path), tmp_path) as (settings, broker, database):
        study = synthetic_study(3, 2, seed=4, producer=producer_info(), model_run_id="over-tls")
        async with running_consumers(settings.consumer(), ["journal", "trials"]):
            with EventPublisher(settings.publisher()) as publisher:
                for event in (event for trial in study for event in trial):
                    publisher.publish(event)
                assert await asyncio.to_thread(publisher.drain, 30)
            await wait_until(lambda: env.fetchval("SELECT count(*) = 3 FROM trials WHERE model_run_id = 'over-tls' "
                                                  "AND status <> 'running'"), timeout=30, what="trials projected")
        storage = with_query(settings.database_url.split("?")[0] + "_optuna", urlsplit(settings.database_url).query)
        try:  # Optuna's storage: SQLAlchemy on psycopg2 (libpq), and sntrack's own psycopg2 admin connection
            optuna_study = await asyncio.to_thread(open_study, storage, "over-tls", dataset="wine", split_seed=0)
            assert optuna_study.user_attrs["dataset"] == "wine"
        finally:
            await asyncio.to_thread(drop_database, storage)
    # The connections went through the proxies (the publisher's and the consumers' to the broker; pool, Optuna and
    # admin connections to PostgreSQL), each TLS: the proxies speak nothing else to clients.
    assert len(broker.tls_versions) >= 2 and set(broker.tls_versions) <= {"TLSv1.2", "TLSv1.3"}
    assert len(database.tls_versions) >= 3 and set(database.tls_versions) <= {"TLSv1.2", "TLSv1.3"}


def sntrack(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **settings.to_env()})


async def test_a_certificate_from_another_ca_is_refused_in_one_line(env, tmp_path):
    trusted = CertificateAuthority("trusted CA").write(tmp_path)
    with tls_settings(env.settings, CertificateAuthority("impostor CA"), trusted, tmp_path) as (settings, *_):
        plain_db = settings.replace(database_url=env.settings.database_url)
        consume, report = await asyncio.gather(asyncio.to_thread(sntrack, plain_db, "consume", "journal"),
                                               asyncio.to_thread(sntrack, settings, "report"))
    assert (consume.returncode, consume.stderr) == (2, (
        f"sntrack: refusing RabbitMQ at {redact(settings.amqp_url)}: its TLS certificate did not verify (unable to "
        "get local issuer certificate); check cafile= (the CA's certificate) and the host name in SNTRACK_AMQP_URL\n"))
    assert (report.returncode, report.stderr) == (2, (
        f"sntrack: refusing PostgreSQL at {redact(settings.database_url)}: its TLS certificate did not verify "
        "(unable to get local issuer certificate); check sslrootcert= (the CA's certificate) and the host name in "
        "SNTRACK_DATABASE_URL\n"))


async def test_a_certificate_for_another_host_name_is_refused(env, tmp_path):
    ca = CertificateAuthority("sntrack test CA")
    with tls_settings(env.settings, ca, ca.write(tmp_path), tmp_path, host="127.0.0.1") as (settings, *_):
        mismatch = r"its TLS certificate did not verify \(IP address mismatch, certificate is not valid for '127.0.0.1'"
        with pytest.raises(ConfigurationError, match=rf"^refusing RabbitMQ at .*: {mismatch}"):
            await connect(settings.consumer())
        with pytest.raises(ConfigurationError, match=rf"^refusing PostgreSQL at .*: {mismatch}"):
            await create_pool(settings.database_url)
        publisher = EventPublisher(settings.publisher()).start()  # a worker: refused, not spooling while it waits
        try:
            refusal = await asyncio.to_thread(publisher.first_contact, 10)
        finally:
            publisher.close(timeout=0)
        assert refusal is not None and "IP address mismatch" in refusal
