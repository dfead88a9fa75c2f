"""docs/asyncapi.json: the AsyncAPI 3 document generated from schemas/ is current, describes every routing key and
every event version, and passes `asyncapi validate` (AsyncAPI's own CLI, run through npx when it is available
without a download)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from schemas.asyncapi import DOCUMENT, build, render, stale
from schemas.events import EVENT_MODELS, SCHEMA_VERSIONS
from schemas.history import HISTORY_MODELS
from schemas.topology import EXCHANGE, ROUTING_KEYS

CLI = ["npx", "--offline", "--yes", "@asyncapi/cli"]  # --offline: from the npm cache only, never a download


def test_the_checked_in_document_is_current():
    assert not stale(), "docs/asyncapi.json is stale: run `make schemas`"
    assert json.loads(DOCUMENT.read_text()) == build()


def test_channels_are_the_routing_keys_and_messages_every_event_version():
    doc = build()
    assert doc["asyncapi"].startswith("3.")
    assert sorted(c["address"] for c in doc["channels"].values()) == sorted(ROUTING_KEYS)
    for channel in doc["channels"].values():
        assert channel["bindings"]["amqp"]["exchange"]["name"] == EXCHANGE
    carried = {(c["address"], ref["$ref"].rsplit("/", 1)[1]) for c in doc["channels"].values()
               for ref in c["messages"].values()}
    expected = {(t, m.__name__) for t, m in EVENT_MODELS.items()}
    expected |= {(t, m.__name__) for (t, _), m in HISTORY_MODELS.items()}
    assert carried == expected
    for name, message in doc["components"]["messages"].items():
        schema = doc["components"]["schemas"][message["payload"]["$ref"].rsplit("/", 1)[1]]
        assert schema["properties"]["event_type"]["const"] == message["bindings"]["amqp"]["messageType"]
        assert schema["title"] == name
    current = {doc["components"]["schemas"][m.__name__]["properties"]["schema_version"]["const"]
               for m in EVENT_MODELS.values()}
    assert current == set(SCHEMA_VERSIONS.values())


def test_every_ref_resolves_inside_the_document():
    doc = build()
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        target = doc
        for part in ref[2:].split("/"):
            assert part in target, f"{ref} does not resolve"
            target = target[part]


def _cli_available() -> str | None:
    """None when the AsyncAPI CLI runs without a download, else why not."""
    if shutil.which("npx") is None:
        return "npx is not on this machine"
    try:
        probe = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "`npx @asyncapi/cli --version` did not answer within 180 s"
    if probe.returncode != 0:
        return "@asyncapi/cli is not in the npm cache and may not be downloaded here (npx --offline failed)"
    return None


@pytest.fixture(scope="module")
def asyncapi_cli():
    if (reason := _cli_available()) is not None:
        pytest.skip(f"asyncapi validate not run: {reason}")


def validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "validate", str(path)], capture_output=True, text=True, timeout=300)


def test_asyncapi_cli_validates_the_document(asyncapi_cli):
    result = validate(DOCUMENT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "is valid" in result.stdout


def test_asyncapi_cli_refuses_a_broken_document(asyncapi_cli, tmp_path):
    """The validation above can fail: a dangling channel reference is refused."""
    broken = json.loads(render())
    broken["operations"]["send_ml_run_start"]["channel"]["$ref"] = "#/channels/missing"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert validate(tmp_path / "broken.json").returncode != 0
