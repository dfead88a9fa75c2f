"""The broker's users and permissions before and after a test session: a session leaves them exactly as it found them.

tests/conftest.py exports them at the start of a session (in the pytest-xdist controller, or the only process) and
fails the session with the differences at its end. What a concurrent session owns comes and goes on its own and is
not compared: a vhost or user in the tests' namespace (named like a sandbox, `…-<UTC time>-…`, or starting with
`sntrack-test`) that does not carry this session's id (tests.sandbox.session_id). So a test names what it creates
after its sandbox's vhost (`env.vhost`), which carries the id.
"""

from __future__ import annotations

import re

from consumers.broker_admin import ManagementApi, user_tags

TEST_NAMESPACE = re.compile(r"^sntrack-test|-\d{14}-")  # tests.sandbox.sandbox and remove_stale: a UTC time
PERMISSION_KINDS = ("configure", "write", "read")


def export_access(api: ManagementApi) -> dict[str, dict]:
    """Every user (tags, password hash), permission and topic permission, keyed by a readable name."""
    out: dict[str, dict] = {}
    for user in api.request("GET", "users") or []:
        out[f"user {user['name']}"] = {"tags": sorted(user_tags(user)), "password_hash": user["password_hash"],
                                       "names": (user["name"],)}
    for perm in api.request("GET", "permissions") or []:
        out[f"permission of {perm['user']} on vhost {perm['vhost']}"] = {
            **{k: perm[k] for k in PERMISSION_KINDS}, "names": (perm["user"], perm["vhost"])}
    for perm in api.request("GET", "topic-permissions") or []:
        out[f"topic permission of {perm['user']} on {perm['vhost']}/{perm['exchange']}"] = {
            "write": perm["write"], "read": perm["read"], "names": (perm["user"], perm["vhost"])}
    return out


def differences(before: dict[str, dict], after: dict[str, dict], session: str) -> list[str]:
    """One line per user or permission this session created and left, removed, or changed."""
    lines = []
    for key in sorted(before.keys() | after.keys()):
        entry = after.get(key) or before[key]
        if any(TEST_NAMESPACE.search(name) and session not in name for name in entry["names"]):
            continue  # a concurrent session's sandbox
        old, new = before.get(key), after.get(key)
        if old is None:
            lines.append(f"+ {key}: created and not removed ({_describe(new)})")
        elif new is None:
            lines.append(f"- {key}: removed (was {_describe(old)})")
        elif old != new:
            changed = [f"{k} {old[k]!r} -> {new[k]!r}" if k != "password_hash" else "password changed"
                       for k in old if k != "names" and old[k] != new[k]]
            lines.append(f"~ {key}: {', '.join(changed)}")
    return lines


def _describe(entry: dict) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in entry.items() if k not in ("names", "password_hash"))
