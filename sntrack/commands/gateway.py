"""sntrack gateway [--host --port] — HTTP ingest of events (daemon); sntrack gateway token add|list|revoke."""

from __future__ import annotations

import argparse
import signal
import socket
import sys

import asyncpg

from common.errors import ConfigurationError
from gateway.config import GatewayConfig
from gateway.server import serve
from gateway.tokens import add_token, check_producer_id, list_tokens, revoke_token
from sntrack.pools import admin_pool, writer_pool
from sntrack.settings import Settings

EXAMPLE = """example:
  sntrack gateway token add notebook-alice        # prints the token once; store it as a secret
  sntrack gateway --port 8070 &
  curl -X POST http://127.0.0.1:8070/v1/events -H "Authorization: Bearer $TOKEN" \\
       -H 'Content-Type: application/x-ndjson' --data-binary @events.ndjson"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "gateway", help="HTTP ingest of events (daemon), and its bearer tokens",
        description="Accept events over HTTP (POST /v1/events: one JSON event, a JSON array, or NDJSON), validate "
        "them with the consumers' gate and answer 202 once the broker confirmed every one. Also GET /healthz, "
        "/metrics, /openapi.json. Broker: SNTRACK_GATEWAY_AMQP_URL (default SNTRACK_AMQP_URL).",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8070, help="port to listen on (default 8070)")
    parser.set_defaults(run=_serve)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    token = actions.add_parser("token", help="manage bearer tokens",
                               description="Tokens are stored hashed; each is bound to the producer id the "
                               "gateway stamps into producer.worker_id of the events it accepts.")
    token_actions = token.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    add = token_actions.add_parser("add", help="create a token (printed once)",
                                   description="Create a token bound to PRODUCER_ID; the token is printed once.")
    add.add_argument("producer_id", metavar="PRODUCER_ID")
    add.set_defaults(run=_add)
    listing = token_actions.add_parser("list", help="list tokens (ids, producers, revoked or not)")
    listing.set_defaults(run=_list)
    revoke = token_actions.add_parser("revoke", help="revoke a token by its id",
                                      description="Revoke; the gateway refuses it (403) within "
                                      "SNTRACK_GATEWAY_TOKEN_CACHE_S seconds.")
    revoke.add_argument("token_id", metavar="TOKEN_ID")
    revoke.set_defaults(run=_revoke)


def gateway_config(settings: Settings) -> GatewayConfig:
    return GatewayConfig(
        amqp_url=settings.gateway_amqp_url or settings.amqp_url, database_url=settings.database_url,
        max_request_bytes=settings.gateway_max_request_bytes, max_event_bytes=settings.max_message_bytes,
        rate_per_s=settings.gateway_rate_per_s, burst=settings.gateway_burst,
        confirm_timeout_s=settings.publish_confirm_timeout_s, token_cache_s=settings.gateway_token_cache_s)


async def _tokens_pool(settings: Settings, *, admin: bool = True) -> asyncpg.Pool:
    """The daemon checks tokens with its writer login (SELECT only); adding, listing, revoking is the owner's."""
    pool = await (admin_pool(settings) if admin else writer_pool(settings, max_size=2))
    if not await pool.fetchval("SELECT to_regclass('gateway_tokens') IS NOT NULL"):
        await pool.close()
        raise ConfigurationError("table gateway_tokens is missing; run `sntrack db migrate`")
    return pool


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        listening = socket.create_server((args.host, args.port))
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    pool = await _tokens_pool(settings, admin=False)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the previous handler: end with 0 as
    # `sntrack consume` does, rather than being killed by the default handler after a clean shutdown.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        print(f"sntrack gateway listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        await serve(gateway_config(settings), pool, listening)
    finally:
        await pool.close()
        listening.close()
    return 0


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    try:
        check_producer_id(args.producer_id)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    pool = await _tokens_pool(settings)
    try:
        async with pool.acquire() as conn:
            token_id, token = await add_token(conn, args.producer_id)
    finally:
        await pool.close()
    print(f"token {token_id} for producer {args.producer_id} (shown only now; store it as a secret):")
    print(token)
    return 0


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    pool = await _tokens_pool(settings)
    try:
        async with pool.acquire() as conn:
            tokens = await list_tokens(conn)
    finally:
        await pool.close()
    print(f"{'TOKEN_ID':<14}{'PRODUCER':<30}{'CREATED':<27}REVOKED")
    for t in tokens:
        revoked = t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "-"
        print(f"{t.id:<14}{t.producer_id:<30}{t.created_at.isoformat(timespec='seconds'):<27}{revoked}")
    return 0


async def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    pool = await _tokens_pool(settings)
    try:
        async with pool.acquire() as conn:
            found = await revoke_token(conn, args.token_id)
    finally:
        await pool.close()
    if not found:
        raise ConfigurationError(f"no token {args.token_id!r}; see `sntrack gateway token list`")
    print(f"revoked {args.token_id}")
    return 0
