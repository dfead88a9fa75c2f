"""A small asyncio client of the MLflow tracking server's REST API (the calls sntrack needs, nothing more).

Why not `MlflowClient` in a thread: measured against the same server it costs ~2 ms more per call (per-call
host-credential and store resolution, retry adapters) plus the thread hop, it retries internally for minutes
(MLFLOW_HTTP_REQUEST_MAX_RETRIES) where the consumer wants to decide itself, and it cannot share one keep-alive
connection pool with cancellation. One aiohttp session per consumer: keep-alive, TCP_NODELAY, one timeout.

Errors are split by what the caller should do:
- `MlflowUnavailable`: connection refused/reset, timeout, 5xx, 429 — try again later;
- `MlflowRejected`: the server answered 4xx (bad request, deleted run, …) — retrying the same call will not help;
  `MlflowNotFound` is the 404 case (RESOURCE_DOES_NOT_EXIST).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from sntrack.settings import ConfigurationError, redact

API = "/api/2.0/mlflow"
MAX_RESULTS = 1000  # runs/search page size (the server's maximum for one page)
TAG_BATCH = 100  # log-batch limits: 100 tags, 1000 metrics per request


class MlflowError(Exception):
    """Any failed MLflow call."""


class MlflowUnavailable(MlflowError):
    """The server is away, slow or overloaded: the call may succeed later."""


class MlflowRejected(MlflowError):
    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(f"{status} {error_code}: {message}")
        self.status = status
        self.error_code = error_code


class MlflowNotFound(MlflowRejected):
    pass


@dataclass(frozen=True)
class RunRecord:
    """What sntrack reads of a run: identity, state, tags and latest metric values."""

    run_id: str
    status: str
    lifecycle_stage: str
    start_time: int
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: int = 0

    @classmethod
    def from_json(cls, run: Mapping) -> RunRecord:
        info, data = run["info"], run.get("data", {})
        return cls(
            run_id=info["run_id"], status=info.get("status", "RUNNING"),
            lifecycle_stage=info.get("lifecycle_stage", "active"), start_time=int(info.get("start_time") or 0),
            tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
            metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},
            params=len(data.get("params", [])),
        )

    @property
    def active(self) -> bool:
        return self.lifecycle_stage == "active"


def filter_string(key: str, value: str) -> str:
    """`tags.<key> = '<value>'` in MLflow's search syntax, quoted with a character the value does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"tags.{key} = {quote}{value}{quote}"
    raise MlflowRejected(400, "INVALID_PARAMETER_VALUE", f"cannot search for a tag value with both quotes: {value!r}")


def _auth_headers() -> dict[str, str]:
    """The standard MLflow client variables: a bearer token or basic auth for a protected server."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _basic_auth() -> aiohttp.BasicAuth | None:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return aiohttp.BasicAuth(user, password or "") if user else None


class MlflowRest:
    """Async MLflow REST client with one shared keep-alive session; create inside a running event loop."""

    def __init__(self, tracking_uri: str, timeout_s: float, *, connections: int = 8):
        parts = urlsplit(tracking_uri)
        if parts.scheme not in ("http", "https"):
            raise ConfigurationError(
                f"SNTRACK_MLFLOW_TRACKING_URI must be an http(s) URL of an MLflow tracking server, not "
                f"{redact(tracking_uri)!r} (start one with infra/mlflow/serve.sh)")
        self.base_url = tracking_uri.rstrip("/")
        self.timeout_s = timeout_s
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), headers=_auth_headers(), auth=_basic_auth(),
            connector=aiohttp.TCPConnector(limit=connections, keepalive_timeout=30))

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, *, json: Mapping | None = None,
                    params: Mapping | None = None) -> dict:
        url = f"{self.base_url}{API}/{path}"
        try:
            async with self._session.request(method, url, json=json, params=params) as response:
                if response.status >= 500 or response.status == 429:
                    text = (await response.text())[:300]
                    raise MlflowUnavailable(f"{method} {path}: HTTP {response.status} {text}")
                body = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise MlflowUnavailable(f"{method} {path}: {type(exc).__name__} {exc}".strip()) from None
        if response.status >= 400:
            body = body or {}
            error = (MlflowNotFound if response.status == 404 else MlflowRejected)
            raise error(response.status, body.get("error_code", "UNKNOWN"), body.get("message", "")[:500])
        return body or {}

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            async with self._session.get(f"{self.base_url}/health",
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def experiment_id(self, name: str) -> str:
        """The id of the experiment `name`, created when missing (a concurrent creator is fine)."""
        try:
            found = await self._call("GET", "experiments/get-by-name", params={"experiment_name": name})
        except MlflowNotFound:
            try:
                return (await self._call("POST", "experiments/create", json={"name": name}))["experiment_id"]
            except MlflowRejected as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = await self._call("GET", "experiments/get-by-name", params={"experiment_name": name})
        experiment = found["experiment"]
        if experiment.get("lifecycle_stage") == "deleted":
            raise ConfigurationError(
                f"MLflow experiment {name!r} is deleted; restore it or set SNTRACK_MLFLOW_EXPERIMENT")
        return experiment["experiment_id"]

    async def search_runs(self, experiment_id: str, filter_: str, *, include_deleted: bool = False) -> list[RunRecord]:
        runs: list[RunRecord] = []
        request = {"experiment_ids": [experiment_id], "filter": filter_, "max_results": MAX_RESULTS,
                   "run_view_type": "ALL" if include_deleted else "ACTIVE_ONLY"}
        while True:
            page = await self._call("POST", "runs/search", json=request)
            runs.extend(RunRecord.from_json(r) for r in page.get("runs", []))
            if not page.get("next_page_token"):
                return runs
            request["page_token"] = page["next_page_token"]

    async def get_run(self, run_id: str) -> RunRecord:
        return RunRecord.from_json((await self._call("GET", "runs/get", params={"run_id": run_id}))["run"])

    async def create_run(self, experiment_id: str, name: str, start_time_ms: int, tags: Mapping[str, str]) -> str:
        body = {"experiment_id": experiment_id, "run_name": name, "start_time": start_time_ms,
                "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        return (await self._call("POST", "runs/create", json=body))["run"]["info"]["run_id"]

    async def log_batch(self, run_id: str, *, tags: Mapping[str, str] | None = None,
                        metrics: Iterable[tuple[str, float, int, int]] = ()) -> None:
        """Tags and metrics (key, value, timestamp_ms, step) in one request."""
        body = {"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
                "metrics": [{"key": k, "value": v, "timestamp": ts, "step": step} for k, v, ts, step in metrics]}
        if len(body["tags"]) > TAG_BATCH:
            raise ValueError(f"log_batch takes at most {TAG_BATCH} tags")
        await self._call("POST", "runs/log-batch", json=body)

    async def set_tag(self, run_id: str, key: str, value: str) -> None:
        await self._call("POST", "runs/set-tag", json={"run_id": run_id, "key": key, "value": value})

    async def update_run(self, run_id: str, status: str, end_time_ms: int | None) -> None:
        body = {"run_id": run_id, "status": status}
        if end_time_ms is not None:
            body["end_time"] = end_time_ms
        await self._call("POST", "runs/update", json=body)

    async def delete_run(self, run_id: str) -> None:
        await self._call("POST", "runs/delete", json={"run_id": run_id})

    async def restore_run(self, run_id: str) -> None:
        await self._call("POST", "runs/restore", json={"run_id": run_id})
