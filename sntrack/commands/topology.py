"""sntrack topology apply|export|check — the broker topology of infra/rabbitmq/definitions.json."""

from __future__ import annotations

import argparse
import os
import sys

from consumers.broker_admin import (
    DEFAULT_USER_PREFIX,
    DEFINITIONS_FILE,
    PASSWORD_VARIABLES,
    ManagementApi,
    apply_topology,
    render_definitions,
    user_name,
)
from sntrack.argtypes import user_prefix
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("topology", help="declare or export the RabbitMQ topology",
                            description="The vhost, users, permissions, exchanges and quorum queues sntrack uses.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = actions.add_parser(
        "apply", help="declare everything idempotently through the management API",
        description="As the administrator of SNTRACK_RABBITMQ_ADMIN_URL, declare vhost, the role users and their "
        "permissions, exchanges, queues and bindings (safe to repeat). Each role's password is taken from "
        + ", ".join(f"{var} ({user_name(role)})" for role, var in PASSWORD_VARIABLES.items())
        + " when set; existing users keep theirs otherwise.")
    apply.add_argument("--vhost", help="vhost to declare (default: the one in SNTRACK_AMQP_URL)")
    apply.add_argument("--user-prefix", default=DEFAULT_USER_PREFIX, metavar="PREFIX", type=user_prefix,
                       help=f"users are named PREFIX-worker, PREFIX-consumer, … (default {DEFAULT_USER_PREFIX})")
    apply.set_defaults(run=_apply)
    export = actions.add_parser("export", help="write infra/rabbitmq/definitions.json from the code")
    export.add_argument("--vhost", default="sntrack", help="vhost named in the file (default sntrack)")
    export.add_argument("--output", default=str(DEFINITIONS_FILE), help="file to write, - for stdout")
    export.set_defaults(run=_export)
    check = actions.add_parser("check", help="exit 1 when definitions.json differs from the code")
    check.set_defaults(run=_check)


def _apply(args: argparse.Namespace, settings: Settings) -> int:
    passwords = {role: os.environ[var] for role, var in PASSWORD_VARIABLES.items() if os.environ.get(var)}
    vhost = args.vhost or settings.amqp_vhost
    for line in apply_topology(ManagementApi(settings.rabbitmq_admin_url), vhost, passwords,
                               user_prefix=args.user_prefix):
        print(f"ok  {line}")
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    text = render_definitions(args.vhost)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    return 0


def _check(args: argparse.Namespace, settings: Settings) -> int:
    if DEFINITIONS_FILE.read_text() == render_definitions():
        print(f"{DEFINITIONS_FILE} matches the code")
        return 0
    print(f"{DEFINITIONS_FILE} is stale; run `sntrack topology export`", file=sys.stderr)
    return 1
