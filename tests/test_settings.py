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


def test_every_bad_value_is_named_by_its_variable_in_one_message():
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"SNTRACK_BATCH_SIZE": "0", "SNTRACK_METRICS_PORT": "70000", "SNTRACK_MLFLOW_TIMEOUT_S": "0",
                           "SNTRACK_MLFLOW_ENABLED": "maybe", "SNTRACK_DB_READER_ROLE": "pg_reader",
                           "SNTRACK_PREFETCH": "1.5", "SNTRACK_PUBLISH_CONFIRM_TIMEOUT_S": "nan"})
    message = str(caught.value)
    assert message.startswith("invalid configuration: ") and "\n" not in message
    for expected in ("SNTRACK_BATCH_SIZE: must be at least 1, not 0", "SNTRACK_METRICS_PORT: must be at most 65535",
                     "SNTRACK_MLFLOW_TIMEOUT_S: must be greater than 0",
                     "SNTRACK_MLFLOW_ENABLED: must be true or false",
                     "SNTRACK_DB_READER_ROLE: PostgreSQL reserves the role name 'pg_reader'",
                     "SNTRACK_PREFETCH: must be a whole number, not '1.5'",
                     "SNTRACK_PUBLISH_CONFIRM_TIMEOUT_S: must be a number, not NaN"):
        assert expected in message


@pytest.mark.parametrize(("text", "value"), [("true", True), ("Yes", True), (" on ", True), ("1", True),
                                             ("false", False), ("NO", False), ("off", False), ("0", False)])
def test_booleans_read_as_people_write_them(text, value):
    assert Settings.from_env({"SNTRACK_MLFLOW_ENABLED": text}).mlflow_enabled is value


def test_values_from_code_are_converted_and_checked_as_from_the_environment(tmp_path):
    settings = Settings.from_env({}).replace(batch_size="7", spool_dir=str(tmp_path), db_writer_password="s3cret")
    assert (settings.batch_size, settings.spool_dir) == (7, tmp_path)
    with pytest.raises(ConfigurationError, match="SNTRACK_BATCH_SIZE: must be at least 1"):
        settings.replace(batch_size=0)
    with pytest.raises(ConfigurationError, match="SNTRACK_AMQP_URL: must be set"):
        settings.replace(amqp_url=None)


def test_passwords_are_hidden_when_printed_and_given_to_child_processes():
    settings = Settings.from_env({"SNTRACK_DB_WRITER_PASSWORD": "s3cret"})
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert settings.db_writer_password.get_secret_value() == "s3cret"
    assert settings.to_env()["SNTRACK_DB_WRITER_PASSWORD"] == "s3cret"
    assert Settings.from_env(settings.to_env()) == settings


def test_whole_numbers_may_be_written_as_decimals_and_long_values_are_cut_in_the_message():
    assert Settings.from_env({"SNTRACK_BATCH_SIZE": "2.0"}).batch_size == 2
    assert Settings.from_env({}).replace(prefetch=3.0).prefetch == 3
    for text in ("abc", "2.5", "x" * 5000):
        with pytest.raises(ConfigurationError, match="SNTRACK_BATCH_SIZE: must be a whole number, not '") as caught:
            Settings.from_env({"SNTRACK_BATCH_SIZE": text})
        assert len(str(caught.value)) < 140
