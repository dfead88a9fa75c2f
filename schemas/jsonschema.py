"""Generate the JSON Schema files in schemas/json/ from the models (python -m schemas.jsonschema).

`<type>.schema.json` is the current version of each event (what producers emit), `event.schema.json` their union;
`<type>.v<N>.schema.json` a superseded version the gate still accepts and upcasts (schemas.history).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.events import EVENT_ADAPTER, EVENT_MODELS
from schemas.history import HISTORY_MODELS

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name → JSON text, for every event type and for the union of all of them."""
    documents = {f"{name}.schema.json": model.model_json_schema() for name, model in EVENT_MODELS.items()}
    documents["event.schema.json"] = EVENT_ADAPTER.json_schema()
    documents.update({f"{name}.v{version}.schema.json": model.model_json_schema()
                      for (name, version), model in HISTORY_MODELS.items()})
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in documents.items()}


def stale() -> list[str]:
    """Names of the checked-in files that differ from what the models generate."""
    return [name for name, text in render().items()
            if not (JSON_DIR / name).exists() or (JSON_DIR / name).read_text() != text]


def main() -> int:
    if "--check" in sys.argv[1:]:
        outdated = stale()
        for name in outdated:
            print(f"schemas/json/{name} is stale; run `make schemas`", file=sys.stderr)
        return 1 if outdated else 0
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (JSON_DIR / name).write_text(text)
        print(f"wrote {JSON_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
