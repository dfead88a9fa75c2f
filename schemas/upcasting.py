"""Bring envelopes of older schema versions up to the current one before validation.

UPCASTERS maps a version N to a function turning an N envelope (a dict) into an N+1 envelope.
Version 1 is the first, so there is nothing to upcast yet; a version 2 adds `1: upcast_1_to_2`.
"""

from collections.abc import Callable

from schemas.events import CURRENT_SCHEMA_VERSION

Upcaster = Callable[[dict], dict]
UPCASTERS: dict[int, Upcaster] = {}


class UnsupportedVersion(ValueError):
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
        envelope = step(envelope)
        version = envelope["schema_version"]
    return envelope
