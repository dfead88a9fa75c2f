"""The broker topology as data (definitions.json) and its idempotent application over the management API."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from common.errors import ConfigurationError
from common.urls import redact
from consumers.registry import BUILTIN_QUEUES, QUEUES
from consumers.topology import DLQ_MAX_BYTES, DLQ_MAX_LENGTH, QueueSpec
from schemas.topology import DEAD_LETTER_EXCHANGE, EXCHANGE

DEFINITIONS_FILE = Path(__file__).resolve().parent.parent / "infra" / "rabbitmq" / "definitions.json"
DEFAULT_VHOST = "sntrack"
DEFAULT_USER_PREFIX = "sntrack"

# ml.events' alternate exchange: an event no binding matches lands in this bounded queue instead of being dropped
# or returned. Set by a policy, so that an existing ml.events gets it without being re-declared.
UNROUTED = "ml.events.unrouted"
UNROUTED_POLICY = "sntrack-ml-events-alternate-exchange"
UNROUTED_ARGUMENTS = {"x-queue-type": "quorum", "x-max-length": DLQ_MAX_LENGTH, "x-max-length-bytes": DLQ_MAX_BYTES,
                      "x-overflow": "reject-publish"}


def _exactly(names: tuple[str, ...]) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


# Least privilege, one broker user per role (RabbitMQ 3.10 checks configure for an active queue.declare and
# queue.delete, write on the queue and read on the exchange for queue.bind, read for basic.get/consume, write on
# the exchange for basic.publish; a passive declare needs none). Only an administrator (SNTRACK_RABBITMQ_ADMIN_URL,
# through `sntrack topology apply`) declares the vhost, exchanges, built-in queues and bindings.
def role_permissions(specs: tuple[QueueSpec, ...]) -> dict[str, dict[str, str]]:
    """Each role's permissions when the consumer queues are `specs`."""
    return {
        # `sntrack worker` and the producer library: publish events, nothing else.
        "worker": {"configure": "^$", "write": r"^ml\.events$", "read": "^$"},
        # `sntrack gateway`, the HTTP ingest: like a worker, it only publishes.
        "gateway": {"configure": "^$", "write": r"^ml\.events$", "read": "^$"},
        # `sntrack consume`: reads the consumers' queues (the runtime only checks that they exist, a passive
        # declare) and publishes dead letters with their reason; declares, binds and deletes nothing.
        "consumer": {"configure": "^$", "write": r"^ml\.events\.dlx$", "read": _exactly(tuple(q.name for q in specs))},
        # `sntrack subscribe`: declares, binds and reads only its own sntrack.sub.* queues and their .dlq (binding needs
        # read on ml.events and ml.events.dlx), and publishes its dead letters.
        "subscriber": {"configure": r"^sntrack\.sub\..*$", "write": r"^(sntrack\.sub\..*|ml\.events\.dlx)$",
                       "read": r"^(sntrack\.sub\..*|ml\.events|ml\.events\.dlx)$"},
    }


# The built-in topology's (infra/rabbitmq/definitions.json): the consumer role reads sntrack's own queues.
ROLE_PERMISSIONS = role_permissions(BUILTIN_QUEUES)
ROLES = tuple(ROLE_PERMISSIONS)
# `sntrack topology apply` reads each role's password from SNTRACK_<ROLE>_PASSWORD.
PASSWORD_VARIABLES = {role: f"SNTRACK_{role.upper()}_PASSWORD" for role in ROLES}


def user_name(role: str, prefix: str = DEFAULT_USER_PREFIX) -> str:
    """The broker user of `role`: `sntrack-worker` etc.; a sandbox passes its vhost as the prefix."""
    return f"{prefix}-{role}"


def build_definitions(vhost: str = DEFAULT_VHOST, user_prefix: str = DEFAULT_USER_PREFIX,
                      specs: tuple[QueueSpec, ...] = QUEUES) -> dict:
    """The whole topology in `rabbitmqctl import_definitions` form. Users carry no password (set it with
    `sntrack topology apply` and SNTRACK_<ROLE>_PASSWORD, or rabbitmqctl). `specs`: the consumer queues, by
    default with those of the installed projection plugins (consumers.plugins), which the consumer role reads too."""
    queues, bindings = [], []
    for spec in specs:
        queues.append({"name": spec.name, "vhost": vhost, "durable": True, "auto_delete": False,
                       "arguments": spec.arguments})
        queues.append({"name": spec.dead_letter_queue, "vhost": vhost, "durable": True, "auto_delete": False,
                       "arguments": spec.dead_letter_arguments})
        for pattern in spec.bindings:
            bindings.append({"source": EXCHANGE, "vhost": vhost, "destination": spec.name,
                             "destination_type": "queue", "routing_key": pattern, "arguments": {}})
        bindings.append({"source": DEAD_LETTER_EXCHANGE, "vhost": vhost, "destination": spec.dead_letter_queue,
                         "destination_type": "queue", "routing_key": spec.name, "arguments": {}})
    queues.append({"name": UNROUTED, "vhost": vhost, "durable": True, "auto_delete": False,
                   "arguments": UNROUTED_ARGUMENTS})
    bindings.append({"source": UNROUTED, "vhost": vhost, "destination": UNROUTED, "destination_type": "queue",
                     "routing_key": "", "arguments": {}})
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {"name": user_name(role, user_prefix), "password_hash": "",
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ""}
            for role in ROLES
        ],
        "permissions": [{"user": user_name(role, user_prefix), "vhost": vhost, **perms}
                        for role, perms in role_permissions(specs).items()],
        "exchanges": [
            {"name": EXCHANGE, "vhost": vhost, "type": "topic", "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}},
            {"name": DEAD_LETTER_EXCHANGE, "vhost": vhost, "type": "direct", "durable": True,
             "auto_delete": False, "internal": False, "arguments": {}},
            {"name": UNROUTED, "vhost": vhost, "type": "fanout", "durable": True, "auto_delete": False,
             "internal": True, "arguments": {}},
        ],
        "queues": queues,
        "bindings": bindings,
        "policies": [
            {"vhost": vhost, "name": UNROUTED_POLICY, "pattern": r"^ml\.events$", "apply-to": "exchanges",
             "priority": 0, "definition": {"alternate-exchange": UNROUTED}},
        ],
    }


def render_definitions(vhost: str = DEFAULT_VHOST) -> str:
    """definitions.json: sntrack's own queues only, whatever plugins this machine has installed."""
    return json.dumps(build_definitions(vhost, specs=BUILTIN_QUEUES), indent=2, sort_keys=True) + "\n"


@dataclass
class ManagementApi:
    """A small client of RabbitMQ's management HTTP API (the plugin rabbitmq_management)."""

    base_url: str
    timeout_s: float = 10.0

    def request(self, method: str, path: str, body: object | None = None) -> object:
        parts = urlsplit(self.base_url)
        url = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api/{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        token = base64.b64encode(f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method in ("GET", "DELETE"):
                return None  # absent, or already gone
            if exc.code == 401:
                raise ConfigurationError(
                    f"RabbitMQ management API at {redact(self.base_url)} refused the credentials; "
                    "set SNTRACK_RABBITMQ_ADMIN_URL to an administrator's http://user:password@host:15672"
                ) from None
            detail = exc.read()[:300].decode(errors="replace")
            raise ConfigurationError(f"RabbitMQ management API {method} {path}: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigurationError(
                f"cannot reach the RabbitMQ management API at {redact(self.base_url)} ({exc}); is RabbitMQ running "
                "with the rabbitmq_management plugin (rabbitmq-plugins enable rabbitmq_management)?"
            ) from None
        return json.loads(payload) if payload else None

    @property
    def admin_user(self) -> str:
        return urlsplit(self.base_url).username or "guest"


def user_tags(user: dict) -> list[str]:
    """The tags of a user as GET /api/users returns it (a list; a comma-separated string before RabbitMQ 3.9)."""
    tags = user.get("tags") or []
    return [t for t in tags.split(",") if t] if isinstance(tags, str) else list(tags)


def _q(value: str) -> str:
    return quote(value, safe="")


def apply_topology(api: ManagementApi, vhost: str, passwords: dict[str, str] | None = None, *,
                   user_prefix: str) -> list[str]:
    """Declare vhost, users, permissions, exchanges, queues and bindings; safe to run any number of times.

    The users are `<user_prefix>-<role>` (`sntrack-worker`, …; a test's own users are named after its vhost: no
    default, so that no caller touches the global users by accident). `passwords` maps a role (ROLES) to its user's
    password; a user that already exists keeps its password unless a new one is given. Returns what was done."""
    passwords = passwords or {}
    definitions = build_definitions(vhost, user_prefix)
    done = []
    api.request("PUT", f"vhosts/{_q(vhost)}", {})
    full = {"configure": ".*", "write": ".*", "read": ".*"}
    api.request("PUT", f"permissions/{_q(vhost)}/{_q(api.admin_user)}", full)
    done.append(f"vhost {vhost}")
    for role in ROLES:
        name = user_name(role, user_prefix)
        if role in passwords:
            api.request("PUT", f"users/{_q(name)}", {"password": passwords[role], "tags": ""})
            done.append(f"user {name} (password set)")
        elif api.request("GET", f"users/{_q(name)}") is None:
            api.request("PUT", f"users/{_q(name)}", {"password_hash": "", "tags": ""})
            done.append(f"user {name} (no password: it cannot log in until one is set)")
    for perm in definitions["permissions"]:
        api.request("PUT", f"permissions/{_q(vhost)}/{_q(perm['user'])}",
                    {k: perm[k] for k in ("configure", "write", "read")})
    for exchange in definitions["exchanges"]:
        api.request("PUT", f"exchanges/{_q(vhost)}/{_q(exchange['name'])}",
                    {k: exchange[k] for k in ("type", "durable", "auto_delete", "internal", "arguments")})
        done.append(f"exchange {exchange['name']}")
    for queue in definitions["queues"]:
        _declare_queue(api, vhost, queue)
        done.append(f"queue {queue['name']}")
    for binding in definitions["bindings"]:
        path = f"bindings/{_q(vhost)}/e/{_q(binding['source'])}/q/{_q(binding['destination'])}"
        existing = api.request("GET", path) or []
        if not any(b["routing_key"] == binding["routing_key"] for b in existing):
            api.request("POST", path, {"routing_key": binding["routing_key"], "arguments": {}})
        done.append(f"binding {binding['source']} -[{binding['routing_key']}]-> {binding['destination']}")
    for policy in definitions["policies"]:
        api.request("PUT", f"policies/{_q(vhost)}/{_q(policy['name'])}",
                    {k: policy[k] for k in ("pattern", "apply-to", "priority", "definition")})
        done.append(f"policy {policy['name']} ({policy['pattern']}: {policy['definition']})")
    return done


def _declare_queue(api: ManagementApi, vhost: str, queue: dict) -> None:
    existing = api.request("GET", f"queues/{_q(vhost)}/{_q(queue['name'])}")
    if existing is not None and existing.get("arguments") != queue["arguments"]:
        raise ConfigurationError(
            f"queue {queue['name']} exists with other arguments ({existing.get('arguments')}; this version declares "
            f"{queue['arguments']}); RabbitMQ cannot change them in place: stop its consumer, let it drain, delete "
            "the queue, and run `sntrack topology apply` again")
    api.request("PUT", f"queues/{_q(vhost)}/{_q(queue['name'])}",
                {k: queue[k] for k in ("durable", "auto_delete", "arguments")})


def delete_vhost(api: ManagementApi, vhost: str) -> None:
    api.request("DELETE", f"vhosts/{_q(vhost)}")


def delete_users(api: ManagementApi, user_prefix: str) -> None:
    """Remove the role users `apply_topology(..., user_prefix=user_prefix)` created (absent ones are skipped)."""
    for role in ROLES:
        api.request("DELETE", f"users/{_q(user_name(role, user_prefix))}")
