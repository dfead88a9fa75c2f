"""The session check of tests/conftest.py (tests.broker_audit): what it reports and what it leaves to other sessions.

Pure logic on exports; the check against the live broker runs at the end of every session (pytest_sessionfinish)."""

from tests.broker_audit import differences

SESSION = "5e55107a"
MINE = f"sntrack-test-20261126060000-{SESSION}-0123abcd"
OTHERS = "sntrack-test-20261126060000-0ther5e5-0123abcd"


def _user(name: str, tags=(), password_hash: str = "h") -> dict:
    return {f"user {name}": {"tags": list(tags), "password_hash": password_hash, "names": (name,)}}


def _permission(user: str, vhost: str, read: str = ".*") -> dict:
    return {f"permission of {user} on vhost {vhost}": {"configure": "^$", "write": "^$", "read": read,
                                                      "names": (user, vhost)}}


BEFORE = {**_user("guest", ["administrator"]), **_user("sntrack-worker"), **_permission("guest", "/")}


def test_an_unchanged_broker_has_no_differences():
    assert differences(BEFORE, dict(BEFORE), SESSION) == []


def test_leftovers_removals_and_changes_are_each_one_line():
    after = {**BEFORE, **_user(f"{MINE}-worker"), **_permission(f"{MINE}-worker", MINE), **_user("rogue"),
             **_user("sntrack-worker", password_hash="changed"), **_permission("guest", "/", read="^$")}
    del after["user guest"]
    assert differences(BEFORE, after, SESSION) == [
        "~ permission of guest on vhost /: read '.*' -> '^$'",
        f"+ permission of {MINE}-worker on vhost {MINE}: created and not removed "
        "(configure '^$', write '^$', read '.*')",
        "- user guest: removed (was tags ['administrator'])",
        "+ user rogue: created and not removed (tags [])",
        f"+ user {MINE}-worker: created and not removed (tags [])",
        "~ user sntrack-worker: password changed",
    ]


def test_a_concurrent_sessions_sandboxes_and_test_users_are_not_compared():
    during = {**BEFORE, **_user(f"{OTHERS}-worker"), **_permission("guest", OTHERS),
              **_user("sntrack-test-leak-12ab34cd")}
    assert differences(BEFORE, during, SESSION) == []
    assert differences(during, BEFORE, SESSION) == []
