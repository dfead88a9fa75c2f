"""Malformed messages for fuzzing the gate: structured mutations of valid events plus raw garbage.

`malformed(rng, documents, limit)` draws one message body from `rng` (a random.Random, or hypothesis's
`st.randoms()`), so the same generator drives the pure property test and the daemon fuzz run
(tests/test_gate_fuzz.py). A draw is not guaranteed to be invalid (a flipped digit can still be a number):
callers keep the bodies the gate refuses.
"""

from __future__ import annotations

import copy
import json
import random

TOKEN = "\u2063FUZZ\u2063"  # placeholder for a raw literal json.dumps cannot write
RAW_LITERALS = ["1e400", "-1e309", "NaN", "Infinity", "-Infinity", "1" + "0" * 5000, "-" + "9" * 400, "1e-400",
                "01", "+1", ".5", "1.", "0x10", "tru", "nul", "[", "}", '"\\ud800"', '"\\udfff\\ud800"',
                '"\\u0000"', '"\\x00"', '"\\uZZZZ"']
ODD_VALUES = [None, True, False, 0, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**30,
              1.5, -0.0, 5e-324, 1.7976931348623157e308, "", "\u0000", "a\u0000b", "x" * 300, "🙂" * 50, "true",
              "2026-11-25T10:00:00Z", "*", [], {}, [1, [2, [3]]], {"a": {"b": None}}, {"\u0000": 1}]
DATES = ["0001-01-01T00:00:00+01:00", "0001-01-01T00:59:59+01:00", "9999-12-31T23:59:59-00:01",
         "9999-12-31T23:30:00-01:00", "0000-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "2026-02-30T00:00:00Z",
         "2026-01-01T24:00:01Z", "2026-01-01T00:00:00", "2026-01-01T00:00:00+25:00", "-2026-01-01T00:00:00Z",
         "2026-01-01T00:00:00.1234567891234Z", "2026-01-01", "", "now"]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
                b"\x80", b"\xf0\x9f\x99"]


def _paths(node, prefix=()) -> list[tuple]:
    """Every path to a value inside a JSON document (keys of objects, indexes of arrays)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


def _set(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _dump(document, raw: str | None = None) -> bytes:
    text = json.dumps(document, ensure_ascii=False)
    return (text.replace(json.dumps(TOKEN, ensure_ascii=False), raw) if raw is not None else text).encode(
        "utf-8", "surrogatepass")


def replace_value(rng, document, limit):
    document = copy.deepcopy(document)
    path = rng.choice(_paths(document))
    if rng.random() < 0.3:
        _set(document, path, TOKEN)
        return _dump(document, rng.choice(RAW_LITERALS))
    _set(document, path, copy.deepcopy(rng.choice(ODD_VALUES)))
    return _dump(document)


def drop_or_add_key(rng, document, limit):
    document = copy.deepcopy(document)
    objects = [p for p in _paths(document) if isinstance(_get(document, p), dict)] + [()]
    path = rng.choice(objects)
    target = _get(document, path)
    if target and rng.random() < 0.5:
        del target[rng.choice(list(target))]
    else:
        target[rng.choice(["extra", "\u0000", "payload", "🙂", "x" * 150])] = rng.choice(ODD_VALUES)
    return _dump(document)


def _get(document, path):
    for key in path:
        document = document[key]
    return document


def nul_in_a_string(rng, document, limit):
    document = copy.deepcopy(document)
    strings = [p for p in _paths(document) if isinstance(_get(document, p), str)]
    path = rng.choice(strings)
    if rng.random() < 0.5:
        value = _get(document, path)
        at = rng.randint(0, len(value))
        _set(document, path, value[:at] + "\u0000" + value[at:])
    else:  # a NUL in a key
        parent = _get(document, path[:-1])
        if isinstance(parent, dict):
            parent[f"{path[-1]}\u0000"] = parent.pop(path[-1])
        else:
            _set(document, path, "\u0000")
    return _dump(document)


def extreme_date(rng, document, limit):
    return _dump({**document, "occurred_at": rng.choice(DATES)})


def deep_nesting(rng, document, limit):
    """Nesting past pydantic-core's depth limit (200): bare, cut short (unbalanced), or inside an event."""
    depth = rng.choice([150, 201, 1_000, 2_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")])
    nest = opener * depth + b"1" + closer * depth
    if rng.random() < 0.3:
        return (opener * limit)[:rng.randint(1, limit)]
    if rng.random() < 0.3:
        return nest
    document = copy.deepcopy(document)
    _set(document, rng.choice(_paths(document)), TOKEN)
    return _dump(document, nest.decode())


def invalid_utf8(rng, document, limit):
    body = _dump(document)
    at = rng.randint(0, len(body))
    return body[:at] + rng.choice(INVALID_UTF8) + body[at:]


def raw_bytes(rng, document, limit):
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))


def truncated(rng, document, limit):
    body = _dump(document)
    return body[:rng.randint(0, len(body) - 1)]


def flipped_bytes(rng, document, limit):
    body = bytearray(_dump(document))
    for _ in range(rng.randint(1, 4)):
        body[rng.randrange(len(body))] = rng.getrandbits(8)
    return bytes(body)


def huge_string(rng, document, limit):
    """A body within a few bytes of the size limit, either side: too_large, or refused for its content."""
    document = copy.deepcopy(document)
    field = rng.choice([("pad",), ("trial_id",), ("payload", "dataset"), ("producer", "host")])
    _set(document, field, "")
    size = limit + rng.randint(-8, 8) - len(_dump(document))
    _set(document, field, rng.choice(["x", "\u00e9", "\u0000"]) * max(0, size))
    body = _dump(document)
    return body + b" " * max(0, limit + rng.randint(-8, 8) - len(body))


MUTATIONS = [replace_value, replace_value, drop_or_add_key, nul_in_a_string, extreme_date, deep_nesting, invalid_utf8,
             raw_bytes, truncated, flipped_bytes]
HUGE_SHARE = 0.03  # bodies near the size limit are few, or they would be most of the bytes moved


def malformed(rng: random.Random, documents: list[dict], limit: int) -> bytes:
    mutation = huge_string if rng.random() < HUGE_SHARE else rng.choice(MUTATIONS)
    return mutation(rng, rng.choice(documents), limit)
