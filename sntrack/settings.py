"""One settings object, read from SNTRACK_* environment variables; defaults work on local services.

The only reader of the environment: the libraries take the typed configs `publisher()` and `consumer()` build.
A frozen dataclass: each value is converted from its variable's text by the field's type and checked against the
bounds or the check its field gives (`_bounded`, `_checked`), whether it comes from the environment or from code.
It was a pydantic model: importing what `sntrack report` imports before it connects took 158-223 ms with it and
115-145 ms without (6 runs each, in turn); pydantic stays for the event contract (schemas/).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path

from common.errors import ConfigurationError
from common.urls import path_name
from consumers.config import ConsumerConfig, MlflowConfig
from producer.config import PublisherConfig


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "sntrack"


class Secret:
    """A setting that must not be printed (a password): its repr and str hide it; get_secret_value() gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _variable(field: str) -> str:
    """The environment variable a field is read from."""
    return f"SNTRACK_{field.upper()}"


def _env_value(value: object) -> str:
    if isinstance(value, Secret):
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


def _bounded(default: float, *, gt: float | None = None, ge: float | None = None, le: float | None = None):
    """A numeric field with its bounds (checked with the field's type)."""
    return dataclasses.field(default=default, metadata={"gt": gt, "ge": ge, "le": le})


def _checked(check: Callable[[str], str], default: str):
    """A text field that `check` accepts (it raises ValueError otherwise)."""
    return dataclasses.field(default=default, metadata={"check": check})


TRUE, FALSE = ("1", "true", "yes", "on", "t", "y"), ("0", "false", "no", "off", "f", "n")


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ValueError(f"must be true or false (also 1/0, yes/no, on/off), not {_shown(value)}")


def _shown(value: object) -> str:
    """The value as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    with contextlib.suppress(ValueError):
        return int(str(value).strip())
    with contextlib.suppress(ValueError):
        number = _float(value)  # "2.0" or 2.0: a whole number written as a decimal
        if number.is_integer():
            return int(number)
    raise ValueError(f"must be a whole number, not {_shown(value)}")


def _float(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ValueError(f"must be a number, not {_shown(value)}") from None
    if number != number:  # noqa: PLR0124 - NaN
        raise ValueError("must be a number, not NaN")
    return number


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text, not {type(value).__name__}")
    return value


def _secret(value: object) -> Secret:
    return value if isinstance(value, Secret) else Secret(_text(value))


CONVERTERS: dict[type, Callable[[object], object]] = {
    str: _text, int: _int, float: _float, bool: _bool, Path: Path, Secret: _secret}


def _converted(field: dataclasses.Field, kind: type, optional: bool, value: object) -> object:
    if value is None:
        if optional:
            return None
        raise ValueError("must be set")
    value = CONVERTERS[kind](value)
    limits = field.metadata
    if limits.get("gt") is not None and not value > limits["gt"]:
        raise ValueError(f"must be greater than {limits['gt']}, not {value}")
    if limits.get("ge") is not None and not value >= limits["ge"]:
        raise ValueError(f"must be at least {limits['ge']}, not {value}")
    if limits.get("le") is not None and not value <= limits["le"]:
        raise ValueError(f"must be at most {limits['le']}, not {value}")
    return limits["check"](value) if "check" in limits else value


@functools.cache
def _kinds() -> dict[str, tuple[type, bool]]:
    """Each field's type and whether it may be None (`X | None`), from the annotations."""
    out = {}
    for name, hint in typing.get_type_hints(Settings).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = (args[0], True) if args else (hint, False)
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/sntrack"
    rabbitmq_admin_url: str = "http://guest:guest@127.0.0.1:15672"
    # The daemons' login (a writer role in production); read-only commands use read_database_url, schema changes
    # (migrate, replay, hard deletes, gateway tokens) admin_database_url; both default to database_url.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sntrack"
    read_database_url: str | None = None
    admin_database_url: str | None = None
    # The roles `sntrack db migrate --roles` creates or updates (cluster-wide names), and their passwords.
    db_writer_role: str = _checked(_role_name, "sntrack_writer")
    db_reader_role: str = _checked(_role_name, "sntrack_reader")
    db_writer_password: Secret | None = None
    db_reader_password: Secret | None = None
    # The dashboard reads with this URL (a read-only role); unset: database_url, in read-only transactions anyway.
    dashboard_database_url: str | None = None
    dashboard_token: str | None = None  # when set, the dashboard asks for it (?token=, cookie or Bearer header)

    mlflow_enabled: bool = True
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_experiment: str = "sntrack/{study}"  # a name, or a template: {study} = the model_run_id
    mlflow_timeout_s: float = _bounded(10.0, gt=0)
    mlflow_max_attempts: int = _bounded(8, ge=1)
    mlflow_concurrency: int = _bounded(8, ge=1)  # trials the mlflow consumer syncs at once
    mlflow_start_wait_s: float = _bounded(2.0, gt=0)  # a trial's start event waits this long for its run id

    optuna_storage: str = "postgresql://postgres@127.0.0.1:5432/sntrack_optuna"
    # A running trial beats Optuna's heartbeat this often; after two missed beats another worker reports it lost.
    worker_heartbeat_s: int = _bounded(30, ge=1)

    spool_dir: Path = dataclasses.field(default_factory=lambda: _default_state_dir() / "spool")
    publish_buffer: int = _bounded(10_000, ge=1)
    publish_confirm_timeout_s: float = _bounded(10.0, gt=0)

    batch_size: int = _bounded(500, ge=1)
    prefetch: int = _bounded(1000, ge=1)
    max_message_bytes: int = _bounded(1_048_576, ge=1024)
    # Bodies a consumer may hold at once (prefetched, in the batch): the effective prefetch is at most
    # consumer_memory_mb MiB / max_message_bytes messages (consumers.runtime.effective_prefetch).
    consumer_memory_mb: int = _bounded(512, ge=1)

    worker_id: str | None = None
    stage_log: Path | None = None  # a folder for the consumers' per-batch stage timestamps (consumers.stages)
    prune_every_s: float = _bounded(60.0, gt=0)  # how often redundant bookkeeping is pruned (consumers.pruning)

    # `sntrack gateway` (HTTP ingest): its broker URL (a user that may only publish to ml.events; default amqp_url),
    # the request size limit, and each token's rate limit (a token bucket: burst, then rate_per_s requests/s).
    gateway_amqp_url: str | None = None
    gateway_max_request_bytes: int = _bounded(8_388_608, ge=1024)
    gateway_rate_per_s: float = _bounded(50.0, gt=0)
    gateway_burst: int = _bounded(100, ge=1)
    gateway_token_cache_s: float = _bounded(5.0, ge=0)
    log_json: bool | None = None  # None: JSON when stderr is not a terminal

    # `consume` and `worker` serve /healthz and /metrics on this port (--metrics-port); 0: not at all. Off by
    # default: several daemons share a machine, so each is given its own port (sntrack.ops).
    metrics_port: int = _bounded(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 lets a Prometheus on another machine scrape

    def __post_init__(self) -> None:
        """Each value converted to its field's type and checked; every problem named by its variable, in one line."""
        problems = []
        for field in dataclasses.fields(self):
            kind, optional = _kinds()[field.name]
            try:
                object.__setattr__(self, field.name, _converted(field, kind, optional, getattr(self, field.name)))
            except (ValueError, TypeError) as exc:
                problems.append(f"{_variable(field.name)}: {exc}")
        if problems:
            raise ConfigurationError(f"invalid configuration: {'; '.join(problems)}")

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None, **overrides: object) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            key = _variable(field.name)
            if key in environ:
                values[field.name] = environ[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: object) -> Settings:
        """These settings with `changes` (checked as from_env checks them)."""
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The SNTRACK_* variables from which `from_env` rebuilds these settings (for child processes)."""
        return {
            _variable(name): _env_value(value)
            for field in dataclasses.fields(self)
            if (value := getattr(self, name := field.name)) is not None
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
