"""How a trial looks in MLflow: experiment, run name, tags, params and metric keys.

Part of the contract because two sides write the same run (the training worker and the `mlflow` consumer) and a
reader searches it (`params.spectral_norm = 'true'`): both must spell everything the same way. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.events import MetricPayload, StartPayload

DEFAULT_EXPERIMENT = "sntrack/{study}"
SINGULAR_VALUE_PREFIX = "singular_value/"  # per-layer spectral norms of a metric event: singular_value/<layer>


def experiment_name(template: str, model_run_id: str) -> str:
    """The experiment of a study: `{study}` in the template is replaced by the study (model_run_id); a plain name
    is used as it is (every study in one experiment)."""
    return template.replace("{study}", model_run_id)


def run_name(trial_id: str, spectral_norm: bool) -> str:
    """`sn-<trial>` or `base-<trial>`: the arm is readable in MLflow's run list."""
    return f"{'sn' if spectral_norm else 'base'}-{trial_id}"


def text(value: object) -> str:
    """One spelling for MLflow's string-only params and tags: booleans are `true`/`false`."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def trial_tags(trial_id: str, model_run_id: str, spectral_norm: bool, status: str | None) -> dict[str, str]:
    """The sntrack tags of a trial's run; `status` None leaves the status tag out (never overwrite a terminal one)."""
    tags = {
        "trial_id": trial_id,
        "model_run_id": model_run_id,
        "spectral_norm": text(spectral_norm),
        "constraint_method": "spectral_norm" if spectral_norm else "none",
    }
    if status is not None:
        tags["status"] = status
    return tags


def trial_params(start: StartPayload) -> dict[str, str]:
    """The run's params: the hyper-parameters and the start event's description of the trial."""
    params: Mapping[str, object] = {
        **start.hyperparams, "spectral_norm": start.spectral_norm, "dataset": start.dataset, "model": start.model,
        "seed": start.seed, "optuna_trial_number": start.optuna_trial_number, "paired_with": start.paired_with}
    return {key: text(value) for key, value in params.items() if value is not None}


def epoch_metrics(payload: MetricPayload) -> dict[str, float]:
    """One epoch's MLflow metrics (logged with step = epoch): the measurements and the per-layer singular values."""
    return {**payload.flat_measurements(),
            **{SINGULAR_VALUE_PREFIX + layer: value for layer, value in (payload.spectral_norms or {}).items()}}


def tracking_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot name an MLflow tracking server for sntrack (None: it can). Both sides speak HTTP(S) to one
    server; a bare `host:port` or a path would make MLflow's client write a local file store nobody reads."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return None
    return (f"SNTRACK_MLFLOW_TRACKING_URI must be an http(s) URL of an MLflow tracking server, such as "
            f"http://127.0.0.1:5000 (start one with infra/mlflow/serve.sh); got a value with "
            f"{'scheme ' + repr(scheme) if scheme else 'no scheme'}")
