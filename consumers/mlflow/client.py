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

import aiohttp

from common.errors import ConfigurationError
from common.urls import scrub
from schemas.mlflow import tracking_uri_problem

API = "/api/2.0/mlflow"
MAX_RESULTS = 1000  # runs/search page size (the server's maximum for one page)
TAG_BATCH = 100  # log-batch limits: 100 tags, 100 params, 1000 metrics, 1000 items in all per request
METRIC_BATCH = 1000


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
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, run: Mapping) -> RunRecord:
        info, data = run["info"], run.get("data", {})
        return cls(
            run_id=info["run_id"], status=info.get("status", "RUNNING"),
            lifecycle_stage=info.get("lifecycle_stage", "active"), start_time=int(info.get("start_time") or 0),
            tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
            metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},
            params={p["key"]: p.get("value", "") for p in data.get("params", [])},
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


def check_tracking_uri(uri: str) -> None:
    """A configuration error, before any work starts, for a tracking URI that is not http(s)
    (tests/test_mlflow_identity.py::test_consumer_refuses_a_tracking_uri_without_scheme)."""
    if problem := tracking_uri_problem(uri):
        raise ConfigurationError(problem)


class MlflowRest:
    """Async MLflow REST client with one shared keep-alive session; create inside a running event loop."""

    def __init__(self, tracking_uri: str, timeout_s: float, *, connections: int = 8):
        check_tracking_uri(tracking_uri)
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
                    raise MlflowUnavailable(f"{method} {path}: HTTP {response.status} {scrub(text, self.base_url)}")
                body = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            problem = f"{method} {path}: {type(exc).__name__} {exc}".strip()
            raise MlflowUnavailable(scrub(problem, self.base_url)) from None
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

    async def create_run(self, experiment_id: str, name: str, start_time_ms: int,
                         tags: Mapping[str, str] | None = None) -> str:
        body = {"experiment_id": experiment_id, "run_name": name, "start_time": start_time_ms,
                "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        return (await self._call("POST", "runs/create", json=body))["run"]["info"]["run_id"]

    async def log_batch(self, run_id: str, *, tags: Mapping[str, str] | None = None,
                        params: Mapping[str, str] | None = None,
                        metrics: Iterable[tuple[str, float, int, int]] = ()) -> None:
        """Tags, params and metrics (key, value, timestamp_ms, step), in as few requests as MLflow's limits allow
        (1000 items, 100 params, 1000 metrics per request): params and tags go with the first."""
        points = [{"key": k, "value": v, "timestamp": ts, "step": step} for k, v, ts, step in metrics]
        body = {"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
                "params": [{"key": k, "value": v} for k, v in (params or {}).items()]}
        if len(body["tags"]) > TAG_BATCH or len(body["params"]) > TAG_BATCH:
            raise ValueError(f"log_batch takes at most {TAG_BATCH} tags and {TAG_BATCH} params")
        first = METRIC_BATCH - len(body["tags"]) - len(body["params"])
        await self._call("POST", "runs/log-batch", json={**body, "metrics": points[:first]})
        for start in range(first, len(points), METRIC_BATCH):
            chunk = points[start:start + METRIC_BATCH]
            await self._call("POST", "runs/log-batch", json={"run_id": run_id, "metrics": chunk})

    async def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """A metric's value by step (the last value logged at each step)."""
        request = {"run_id": run_id, "metric_key": key, "max_results": 25000}
        history = (await self._call("GET", "metrics/get-history", params=request)).get("metrics", [])
        return {int(m.get("step", 0)): float(m["value"]) for m in sorted(history, key=lambda m: m["timestamp"])}

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
