"""One settings object, read from SNTRACK_* environment variables; defaults work on local services.

The only reader of the environment: the libraries take the typed configs `publisher()` and `consumer()` build."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from common.errors import ConfigurationError
from common.urls import path_name
from consumers.config import ConsumerConfig, MlflowConfig
from producer.config import PublisherConfig


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "sntrack"


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value).lower() if isinstance(value, bool) else str(value)


def _role_name(name: str) -> str:
    """A role `db migrate --roles` can create: PostgreSQL reserves public, none and pg_*, and cuts names at 63
    bytes; a quote or a control character would make a role that no connection URL names plainly."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}", name):
        raise ValueError("a role name is 1-63 of letters, digits, _, $ and -, starting with a letter or _")
    if name in ("public", "none") or name.startswith("pg_"):
        raise ValueError(f"PostgreSQL reserves the role name {name!r}")
    return name


RoleName = Annotated[str, AfterValidator(_role_name)]


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/sntrack"
    rabbitmq_admin_url: str = "http://guest:guest@127.0.0.1:15672"
    # The daemons' login (a writer role in production); read-only commands use read_database_url, schema changes
    # (migrate, replay, hard deletes, gateway tokens) admin_database_url; both default to database_url.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sntrack"
    read_database_url: str | None = None
    admin_database_url: str | None = None
    # The roles `sntrack db migrate --roles` creates or updates (cluster-wide names), and their passwords.
    db_writer_role: RoleName = "sntrack_writer"
    db_reader_role: RoleName = "sntrack_reader"
    db_writer_password: SecretStr | None = None
    db_reader_password: SecretStr | None = None
    # The dashboard reads with this URL (a read-only role); unset: database_url, in read-only transactions anyway.
    dashboard_database_url: str | None = None
    dashboard_token: str | None = None  # when set, the dashboard asks for it (?token=, cookie or Bearer header)

    mlflow_enabled: bool = True
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_experiment: str = "sntrack/{study}"  # a name, or a template: {study} = the model_run_id
    mlflow_timeout_s: float = Field(default=10.0, gt=0)
    mlflow_max_attempts: int = Field(default=8, ge=1)
    mlflow_concurrency: int = Field(default=8, ge=1)  # trials the mlflow consumer syncs at once
    mlflow_start_wait_s: float = Field(default=2.0, gt=0)  # a trial's start event waits this long for its run id

    optuna_storage: str = "postgresql://postgres@127.0.0.1:5432/sntrack_optuna"
    # A running trial beats Optuna's heartbeat this often; after two missed beats another worker reports it lost.
    worker_heartbeat_s: int = Field(default=30, ge=1)

    spool_dir: Path = Field(default_factory=lambda: _default_state_dir() / "spool")
    publish_buffer: int = Field(default=10_000, ge=1)
    publish_confirm_timeout_s: float = Field(default=10.0, gt=0)

    batch_size: int = Field(default=500, ge=1)
    prefetch: int = Field(default=1000, ge=1)
    max_message_bytes: int = Field(default=1_048_576, ge=1024)
    # Bodies a consumer may hold at once (prefetched, in the batch): the effective prefetch is at most
    # consumer_memory_mb MiB / max_message_bytes messages (consumers.runtime.effective_prefetch).
    consumer_memory_mb: int = Field(default=512, ge=1)

    worker_id: str | None = None
    stage_log: Path | None = None  # a folder for the consumers' per-batch stage timestamps (consumers.stages)
    prune_every_s: float = Field(default=60.0, gt=0)  # how often redundant bookkeeping is pruned (consumers.pruning)

    # `sntrack gateway` (HTTP ingest): its broker URL (a user that may only publish to ml.events; default amqp_url),
    # the request size limit, and each token's rate limit (a token bucket: burst, then rate_per_s requests/s).
    gateway_amqp_url: str | None = None
    gateway_max_request_bytes: int = Field(default=8_388_608, ge=1024)
    gateway_rate_per_s: float = Field(default=50.0, gt=0)
    gateway_burst: int = Field(default=100, ge=1)
    gateway_token_cache_s: float = Field(default=5.0, ge=0)
    log_json: bool | None = None  # None: JSON when stderr is not a terminal

    # `consume` and `worker` serve /healthz and /metrics on this port (--metrics-port); 0: not at all. Off by
    # default: several daemons share a machine, so each is given its own port (sntrack.ops).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 lets a Prometheus on another machine scrape

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            key = f"SNTRACK_{name.upper()}"
            if key in environ:
                values[name] = environ[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values, strict=False)
        except ValidationError as exc:
            problems = "; ".join(f"SNTRACK_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"invalid configuration: {problems}") from None

    def to_env(self) -> dict[str, str]:
        """The SNTRACK_* variables from which `from_env` rebuilds these settings (for child processes)."""
        return {
            f"SNTRACK_{name.upper()}": _env_value(value)
            for name in type(self).model_fields
            if (value := getattr(self, name)) is not None
        }

    def publisher(self) -> PublisherConfig:
        return PublisherConfig(amqp_url=self.amqp_url, spool_dir=self.spool_dir, buffer=self.publish_buffer,
                               confirm_timeout_s=self.publish_confirm_timeout_s, worker_id=self.worker_id)

    def consumer(self) -> ConsumerConfig:
        mlflow = MlflowConfig(enabled=self.mlflow_enabled, tracking_uri=self.mlflow_tracking_uri,
                              experiment=self.mlflow_experiment, timeout_s=self.mlflow_timeout_s,
                              max_attempts=self.mlflow_max_attempts, concurrency=self.mlflow_concurrency)
        return ConsumerConfig(amqp_url=self.amqp_url, database_url=self.database_url, batch_size=self.batch_size,
                              prefetch=self.prefetch, max_message_bytes=self.max_message_bytes,
                              memory_mb=self.consumer_memory_mb, worker_id=self.worker_id, mlflow=mlflow,
                              stage_log=self.stage_log, prune_every_s=self.prune_every_s)

    @property
    def read_url(self) -> str:
        """What read-only commands (report, export, trial, studies list/show, reconcile) connect with."""
        return self.read_database_url or self.database_url

    @property
    def admin_url(self) -> str:
        """What commands that change the schema or administer connect with: the tables' owner."""
        return self.admin_database_url or self.database_url

    @property
    def amqp_vhost(self) -> str:
        return path_name(self.amqp_url) or "/"

    @property
    def database_name(self) -> str:
        return path_name(self.database_url)
