"""A dependency-free client of the gateway (the standard library's urllib, `schemas` and producer.emitter, which
imports nothing but `schemas`). A notebook reports a trial in three lines:

    from gateway.client import GatewayClient
    client = GatewayClient("http://127.0.0.1:8070", token="sntk_…")
    client.report_trial("my-search", spectral_norm=True, hyperparams={"lr": 0.01}, curve=[{"val_accuracy": 0.9}])

`send` retries a 429 or 503 (after Retry-After) and a refused connection with the very same events: the event ids
are the dedupe key downstream, so a retry never records an event twice (tests/test_gateway.py).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence

from producer.emitter import TrialEvents, producer_info
from schemas import Event, RunError, StartPayload

RETRIED = (429, 503)


class GatewayError(Exception):
    """The gateway refused the events (status 4xx, `body` says why per event) or stayed unavailable (status 0)."""

    def __init__(self, status: int, body: object):
        super().__init__(f"gateway answered {status}: {body}")
        self.status = status
        self.body = body


class GatewayClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0, attempts: int = 5):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.attempts = attempts

    def send(self, events: Sequence[Event]) -> list[str]:
        """Post the events as one NDJSON request; their ids once the broker confirmed all of them."""
        body = b"\n".join(event.to_json() for event in events)
        request = urllib.request.Request(f"{self.url}/v1/events", data=body, method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/x-ndjson"})
        for attempt in range(1, self.attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())["event_ids"]
            except urllib.error.HTTPError as exc:
                answer = _json(exc.read())
                if exc.code not in RETRIED or attempt == self.attempts:
                    raise GatewayError(exc.code, answer) from None
                time.sleep(float(exc.headers.get("Retry-After") or 1))
            except (urllib.error.URLError, OSError) as exc:
                if attempt == self.attempts:
                    raise GatewayError(0, f"gateway unreachable: {exc}") from None
                time.sleep(min(2.0 ** attempt / 4, 5.0))
        raise AssertionError("unreachable")

    def report_trial(self, model_run_id: str, *, spectral_norm: bool, hyperparams: Mapping | None = None,
                     curve: Sequence[Mapping[str, float]] = (), status: str = "completed",
                     final: Mapping[str, float] | None = None, error: str | None = None,
                     trial_id: str | None = None, dataset: str = "unknown", model: str = "unknown",
                     seed: int = 0) -> str:
        """Start, one metric event per epoch of `curve`, and stop, in one request; returns the trial id.
        `final` defaults to the last epoch's measurements prefixed with final_; `error` is required when failed."""
        trial = TrialEvents(trial_id or f"trial-{uuid.uuid4().hex[:16]}", model_run_id, producer_info())
        events: list[Event] = [trial.start(StartPayload(
            spectral_norm=spectral_norm, hyperparams=dict(hyperparams or {}), dataset=dataset, model=model,
            seed=seed))]
        events += [trial.metric(epoch, dict(measurements)) for epoch, measurements in enumerate(curve)]
        if final is None:
            final = {f"final_{k}": v for k, v in (curve[-1] if curve else {}).items()}
        events.append(trial.stop(status, spectral_norm, dict(final),
                                 RunError(type="exception", message=error) if error else None))
        self.send(events)
        return trial.trial_id


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
