"""Bring envelopes of older schema versions up to the current one before validation.

UPCASTERS maps a version N to a function turning an N envelope (a dict) into an N+1 envelope.
Version 1 is the first, so there is nothing to upcast yet; a version 2 adds `1: upcast_1_to_2`.
An upcaster that fails, or does not produce version N+1, is reported as UpcastFailed (the gate rejects the
message as invalid_event), never as a crash or an endless loop (tests/test_gate_totality.py).
"""

from collections.abc import Callable

from schemas.events import CURRENT_SCHEMA_VERSION

Upcaster = Callable[[dict], dict]
UPCASTERS: dict[int, Upcaster] = {}


class UnsupportedVersion(ValueError):
    pass


class UpcastFailed(ValueError):
    pass


def upcast(envelope: dict) -> dict:
    version = envelope.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return envelope  # left for validation to refuse with a precise message
    if version > CURRENT_SCHEMA_VERSION:
        raise UnsupportedVersion(
            f"schema_version {version} is newer than this consumer understands ({CURRENT_SCHEMA_VERSION})"
        )
    while version < CURRENT_SCHEMA_VERSION:
        step = UPCASTERS.get(version)
        if step is None:
            raise UnsupportedVersion(f"no upcaster from schema_version {version}")
        try:
            envelope = step(envelope)
        except Exception as exc:  # noqa: BLE001 - an old envelope the step cannot read is a bad message
            raise UpcastFailed(f"upcasting from schema_version {version} failed: {type(exc).__name__}: {exc}") from exc
        produced = envelope.get("schema_version") if isinstance(envelope, dict) else None
        if produced != version + 1:
            raise UpcastFailed(f"the upcaster from schema_version {version} produced version {produced!r}")
        version = produced
    return envelope
