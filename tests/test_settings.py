"""The settings object: environment in, environment out (for child processes), clear errors."""

from pathlib import Path

import pytest

from common.errors import ConfigurationError
from sntrack.settings import Settings


def test_to_env_round_trips_through_from_env():
    settings = Settings.from_env({}, amqp_url="amqp://u:p@h:1/v", mlflow_enabled=False, batch_size=7,
                                 spool_dir=Path("/tmp/spool"), log_json=True)
    assert Settings.from_env(settings.to_env()) == settings
    assert settings.to_env()["SNTRACK_MLFLOW_ENABLED"] == "false"
    assert "SNTRACK_WORKER_ID" not in settings.to_env()  # unset stays unset


def test_bad_value_names_the_variable():
    with pytest.raises(ConfigurationError, match="SNTRACK_BATCH_SIZE"):
        Settings.from_env({"SNTRACK_BATCH_SIZE": "many"})
