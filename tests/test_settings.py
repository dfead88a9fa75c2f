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


def test_settings_build_the_libraries_configs_from_the_environment(tmp_path):
    settings = Settings.from_env({"SNTRACK_AMQP_URL": "amqp://u:p@h:1/v", "SNTRACK_DATABASE_URL": "postgresql://h/d",
                                  "SNTRACK_BATCH_SIZE": "7", "SNTRACK_PREFETCH": "9", "SNTRACK_CONSUMER_MEMORY_MB": "3",
                                  "SNTRACK_MLFLOW_ENABLED": "false", "SNTRACK_MLFLOW_MAX_ATTEMPTS": "2",
                                  "SNTRACK_SPOOL_DIR": str(tmp_path), "SNTRACK_PUBLISH_BUFFER": "5",
                                  "SNTRACK_PUBLISH_CONFIRM_TIMEOUT_S": "1.5", "SNTRACK_WORKER_ID": "w1"})
    consumer = settings.consumer()
    assert (consumer.amqp_url, consumer.database_url, consumer.batch_size, consumer.prefetch, consumer.memory_mb,
            consumer.worker_id) == ("amqp://u:p@h:1/v", "postgresql://h/d", 7, 9, 3, "w1")
    assert (consumer.mlflow.enabled, consumer.mlflow.max_attempts) == (False, 2)
    publisher = settings.publisher()
    assert (publisher.amqp_url, publisher.spool_dir, publisher.buffer, publisher.confirm_timeout_s,
            publisher.worker_id) == ("amqp://u:p@h:1/v", tmp_path, 5, 1.5, "w1")
