"""Settings: defaults, then the environment, then CLI overrides; invalid values are one-line ConfigErrors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fraudstream.errors import ConfigError
from fraudstream.settings import APICURIO_CCOMPAT_PATH, COMPATIBILITY_LEVELS, ENV, Settings


def test_defaults_are_valid_and_equal_an_empty_environment():
    Settings().validate()
    assert Settings.from_env({}) == Settings()


def test_every_setting_except_the_extra_client_properties_has_one_environment_variable():
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert set(ENV) == fields - {"kafka_extra", "registry_extra"}
    assert len(set(ENV.values())) == len(ENV), "two settings share an environment variable"


def test_the_confluent_standard_names_are_kept_and_ours_are_prefixed():
    assert ENV["bootstrap_servers"] == "KAFKA_BOOTSTRAP_SERVERS"
    assert ENV["schema_registry_url"] == "SCHEMA_REGISTRY_URL"
    others = set(ENV.values()) - {"KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL"}
    assert all(name.startswith("FRAUDSTREAM_") for name in others), sorted(others)


def test_the_default_registry_url_is_the_local_stacks_confluent_compatible_api():
    defaults = Settings()
    assert defaults.schema_registry_url == f"http://127.0.0.1:{defaults.registry_port}{APICURIO_CCOMPAT_PATH}"
    assert defaults.bootstrap_servers == f"127.0.0.1:{defaults.kafka_port}"


def test_environment_values_are_converted_to_the_field_types():
    settings = Settings.from_env(
        {
            ENV["bootstrap_servers"]: "broker-1:9092,broker-2:9092",
            ENV["partitions"]: "12",
            ENV["schemas_dir"]: "/srv/schemas",
            ENV["compatibility"]: "BACKWARD",
        }
    )
    assert settings.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert settings.partitions == 12
    assert settings.schemas_dir == Path("/srv/schemas")
    assert settings.compatibility == "BACKWARD"


def test_an_empty_environment_variable_means_not_set():
    assert Settings.from_env({ENV["partitions"]: "", ENV["transactions_topic"]: ""}) == Settings()


def test_flags_override_the_environment_and_none_means_not_given():
    env = {ENV["transactions_topic"]: "from-env", ENV["partitions"]: "3"}
    settings = Settings.from_env(env, transactions_topic="from-flag", partitions=None)
    assert settings.transactions_topic == "from-flag"
    assert settings.partitions == 3


def test_a_non_numeric_number_names_the_variable():
    with pytest.raises(ConfigError, match=r"FRAUDSTREAM_PARTITIONS='six' is not a whole number"):
        Settings.from_env({ENV["partitions"]: "six"})


def test_an_unknown_override_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="unknown setting 'partition'"):
        Settings.from_env({}, partition=3)


def test_an_unknown_compatibility_level_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        Settings.from_env({ENV["compatibility"]: "FULLY"})
    message = str(error.value)
    assert "'FULLY'" in message
    assert all(level in message for level in COMPATIBILITY_LEVELS)


@pytest.mark.parametrize("name", ["partitions", "replication_factor", "batch_max_records", "batch_max_ms"])
def test_counts_must_be_positive(name):
    with pytest.raises(ConfigError, match=f"{name} must be at least 1"):
        Settings.from_env({ENV[name]: "0"})


def test_a_negative_threshold_is_rejected():
    with pytest.raises(ConfigError, match="must not be negative"):
        Settings(fraud_threshold_cents=-1).validate()


def test_a_registry_url_needs_a_scheme():
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        Settings.from_env({ENV["schema_registry_url"]: "127.0.0.1:8081"})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().partitions = 2  # type: ignore[misc]


def test_every_topic_name_derives_from_the_input_topic():
    settings = Settings(transactions_topic="payments")
    assert settings.all_topics == (
        "payments",
        "payments.legit",
        "payments.fraud",
        "payments.dlq",
        "payments.labels",
        "payments.rules",
        "payments.shadow",
    )
    assert settings.subject("payments.fraud") == "payments.fraud-value"


def test_client_configuration_carries_the_bootstrap_servers_and_the_extra_properties():
    from fraudstream.kafka import producer_config

    settings = Settings(bootstrap_servers="b:1", kafka_extra={"security.protocol": "SSL"})
    config = producer_config(settings)
    assert (config["bootstrap.servers"], config["security.protocol"]) == ("b:1", "SSL")
    assert settings.registry_client_conf() == {"url": settings.schema_registry_url}
