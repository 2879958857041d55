"""Client properties: Java-style files and KEY=VALUE flags for librdkafka and the registry client.

Keys are judged by the real clients (librdkafka, confluent-kafka's SchemaRegistryClient), errors are
one line naming the key, and secret values never show in a message, a repr or --help.
"""

from __future__ import annotations

import importlib

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from fraudstream import cli
from fraudstream.client_config import REDACTED, redact
from fraudstream.errors import ConfigError
from fraudstream.kafka import consumer_config, producer_config, transactional_producer_config
from fraudstream.settings import ENV, Settings

SECRET = "s3cr3t-Value-42"

# The client.properties of a Confluent Cloud-style cluster, as its console hands it out.
KAFKA_FILE = f"""\
# Required connection configs for Kafka producer, consumer, and admin
bootstrap.servers=pkc-abc12.eu-west-1.aws.example.net:9092
security.protocol=SASL_SSL
! a comment in the other style
sasl.mechanisms: PLAIN
sasl.username=ABCDEFGHIJKLMNOP
sasl.password={SECRET}
# a long value, continued on the next line
client.id=fraud\\
      stream
"""
# The registry part of the same file, in the Java client's names.
REGISTRY_FILE = f"""\
schema.registry.url=https://psrc-xyz.eu-west-1.aws.example.net
basic.auth.credentials.source=USER_INFO
schema.registry.basic.auth.user.info=SRKEY:{SECRET}
"""


@pytest.fixture
def files(tmp_path):
    kafka, registry = tmp_path / "client.properties", tmp_path / "registry.properties"
    kafka.write_text(KAFKA_FILE)
    registry.write_text(REGISTRY_FILE)
    return {ENV["kafka_config"]: str(kafka), ENV["registry_config"]: str(registry)}


def test_a_java_style_properties_file_configures_every_kafka_client(files):
    settings = Settings.from_env(files)
    assert settings.bootstrap_servers == "pkc-abc12.eu-west-1.aws.example.net:9092"
    assert dict(settings.kafka_extra) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": "ABCDEFGHIJKLMNOP",
        "sasl.password": SECRET,
        "client.id": "fraudstream",
    }
    for config in (
        producer_config(settings),
        consumer_config(settings, "g"),
        transactional_producer_config(settings, "t"),
    ):
        assert config["bootstrap.servers"] == settings.bootstrap_servers
        assert config["sasl.password"] == SECRET and config["security.protocol"] == "SASL_SSL"


def test_a_java_style_registry_file_gives_the_python_client_its_url_and_basic_auth(files):
    settings = Settings.from_env(files)
    assert settings.schema_registry_url == "https://psrc-xyz.eu-west-1.aws.example.net"
    conf = settings.registry_client_conf()
    assert conf == {"url": settings.schema_registry_url, "basic.auth.user.info": f"SRKEY:{SECRET}"}
    client = SchemaRegistryClient(conf)
    assert client._rest_client.auth == ("SRKEY", SECRET)  # sent as an HTTP Basic header


def test_order_defaults_environment_files_key_value_flags_then_named_flags(files):
    env = {**files, ENV["bootstrap_servers"]: "from-env:9092", ENV["schema_registry_url"]: "http://from-env:8081"}
    from_files = Settings.from_env(env)
    assert from_files.bootstrap_servers == "pkc-abc12.eu-west-1.aws.example.net:9092"
    assert from_files.schema_registry_url == "https://psrc-xyz.eu-west-1.aws.example.net"

    flagged = Settings.from_env(
        env,
        kafka_properties={"bootstrap.servers": "x:1", "sasl.username": "other"},
        registry_properties={"url": "https://y", "timeout": "30"},
    )
    assert (flagged.bootstrap_servers, flagged.kafka_extra["sasl.username"]) == ("x:1", "other")
    assert flagged.kafka_extra["sasl.password"] == SECRET  # the rest of the file stays
    assert flagged.registry_client_conf()["timeout"] == 30.0  # a number, as the registry client wants

    named = Settings.from_env(env, kafka_properties={"bootstrap.servers": "x:1"}, bootstrap_servers="named:1")
    assert named.bootstrap_servers == "named:1"


def test_user_properties_change_our_defaults_but_never_what_exactly_once_depends_on():
    settings = Settings.from_env({}, kafka_properties={"linger.ms": "50", "session.timeout.ms": "30000"})
    assert producer_config(settings)["linger.ms"] == "50"
    assert transactional_producer_config(settings, "t")["linger.ms"] == "50"
    assert consumer_config(settings, "g")["session.timeout.ms"] == "30000"
    for key in ("enable.auto.commit", "isolation.level", "transactional.id", "group.id", "enable.idempotence"):
        with pytest.raises(ConfigError, match=f"^Kafka property {key} cannot be set"):
            Settings.from_env({}, kafka_properties={key: "x"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kafka_properties": {"sasl.pasword": SECRET}}, 'No such configuration property: "sasl.pasword"'),
        ({"kafka_properties": {"acks": "lots"}}, "Invalid value"),
        ({"kafka_properties": {"ssl.ca.location": "/no/such/ca.pem"}}, "ssl.ca.location: no such file /no/such/ca.pem"),
        ({"registry_properties": {"basic.auth.usr": SECRET}}, "unknown registry property basic.auth.usr"),
        ({"registry_properties": {"ssl.ca.location": "/no/such/ca.pem"}}, "ssl.ca.location: no such file"),
        ({"registry_properties": {"basic.auth.credentials.source": "SASL_INHERIT"}}, "is not supported"),
        ({"registry_properties": {"max.retries": "many"}}, "max.retries must be a number"),
    ],
)
def test_a_bad_key_or_value_is_judged_by_the_client_and_named_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({}, **kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert SECRET not in text


def test_the_cli_takes_files_and_repeatable_flags_on_every_client_command(files, monkeypatch):
    for var in (*files, ENV["bootstrap_servers"], ENV["schema_registry_url"]):
        monkeypatch.delenv(var, raising=False)
    seen = []
    argv = [
        "-F",
        files[ENV["kafka_config"]],
        "-X",
        "client.id=cli",
        "-X",
        "linger.ms=7",
        "--registry-config",
        files[ENV["registry_config"]],
        "-R",
        "timeout=12",
    ]
    for command in ("produce", "detect", "inspect", "schemas", "demo", "evaluate"):
        module = importlib.import_module(cli.COMMANDS[command][0])
        monkeypatch.setattr(module, "run", lambda args, settings: seen.append(settings) or 0)
        assert cli.main([command, *(["register"] if command == "schemas" else []), *argv]) == 0
    assert len(seen) == 6
    for settings in seen:
        assert settings.bootstrap_servers == "pkc-abc12.eu-west-1.aws.example.net:9092"
        assert (settings.kafka_extra["client.id"], settings.kafka_extra["linger.ms"]) == ("cli", "7")
        assert settings.registry_client_conf()["timeout"] == 12.0
        assert settings.registry_client_conf()["basic.auth.user.info"] == f"SRKEY:{SECRET}"


def test_an_unknown_key_at_the_cli_is_one_line_naming_it_and_exit_status_2(capsys):
    assert cli.main(["produce", "-X", "no.such.property=1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == 'fraudstream produce: error: Kafka client configuration: No such configuration property: "no.such.property"'
    )


def test_a_flag_without_equals_fails_without_repeating_what_was_typed(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["produce", "-X", f"sasl.password:{SECRET}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "wants KEY=VALUE" in err and SECRET not in err


def test_secrets_never_show_in_reprs_help_or_redacted_messages(files, capsys, monkeypatch):
    settings = Settings.from_env(files)
    bearer = Settings.from_env(
        {},
        registry_properties={
            "bearer.auth.credentials.source": "STATIC_TOKEN",
            "bearer.auth.token": SECRET + "t",
            "bearer.auth.logical.cluster": "lsrc-123",
        },
    )
    assert SECRET not in repr(settings) + repr(bearer) and REDACTED in repr(settings)
    assert "sasl.username" in repr(settings)  # only the secret values are hidden
    text = f"https://user:{SECRET}@registry.example/x failed; password {SECRET}; token {SECRET}t; {SECRET}"
    assert SECRET not in redact(text, settings.kafka_extra, settings.registry_extra, bearer.registry_extra)
    userinfo = Settings.from_env({}, registry_properties={"basic.auth.user.info": f"k:{SECRET}"}).registry_extra
    assert redact(f"refused {SECRET}", userinfo) == f"refused {REDACTED}"
    url = Settings(schema_registry_url=f"https://user:{SECRET}@registry.example/apis")
    assert url.registry_url_display == f"https://user:{REDACTED}@registry.example/apis"

    for var, path in files.items():
        monkeypatch.setenv(var, path)
    for command in ("produce", "detect", "inspect", "schemas", "demo", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert SECRET not in capsys.readouterr().out


def test_child_commands_get_the_same_client_properties(files):
    settings = Settings.from_env(files, kafka_properties={"linger.ms": "9"}, registry_properties={"timeout": "5"})
    flags = cli.client_flags(settings)
    assert SECRET not in flags  # the file's secrets stay in the file: the child reads it
    parser = cli.build_parser()
    args = parser.parse_args(["produce", *flags])
    again = Settings.from_env(
        {},
        kafka_config=args.kafka_config,
        registry_config=args.registry_config,
        kafka_properties=dict(p.split("=", 1) for p in args.kafka_property),
        registry_properties=dict(p.split("=", 1) for p in args.registry_property),
    )
    assert again == settings


def test_the_demos_printed_inspect_commands_carry_the_client_flags_with_secrets_masked(files, monkeypatch):
    from fraudstream.demo.summary import inspect_flags

    for var in (*files, ENV["bootstrap_servers"], ENV["schema_registry_url"]):
        monkeypatch.delenv(var, raising=False)
    settings = Settings.from_env(
        {},
        kafka_config=files[ENV["kafka_config"]],
        kafka_properties={"sasl.password": SECRET + "x", "client.id": "demo"},
    )
    flags = inspect_flags(settings)
    assert flags[flags.index("--kafka-config") + 1] == files[ENV["kafka_config"]]
    assert "client.id=demo" in flags and f"sasl.password={REDACTED}" in flags
    assert not any(SECRET in flag for flag in flags)


def test_a_demo_childs_secret_flags_go_to_a_private_file_never_to_its_command_line(files, tmp_path):
    settings = Settings.from_env(
        files,
        kafka_properties={"sasl.password": SECRET + "x", "linger.ms": "9"},
        registry_properties={"basic.auth.user.info": f"u:{SECRET}y"},
    )
    private = tmp_path / "children"
    flags = cli.client_flags(settings, private)
    assert not any(SECRET in flag for flag in flags)
    assert "-X" not in flags and "-R" not in flags
    for option in ("--kafka-config", "--registry-config"):
        path = flags[flags.index(option) + 1]
        assert path.startswith(str(private)) and (tmp_path / path).stat().st_mode & 0o077 == 0
    args = cli.build_parser().parse_args(["produce", *flags])
    again = Settings.from_env({}, kafka_config=args.kafka_config, registry_config=args.registry_config)
    # The child runs with exactly the same properties (only the files' names differ).
    assert again.replace(kafka_config=None, registry_config=None) == settings.replace(
        kafka_config=None, registry_config=None
    )


def test_the_assertion_key_passphrase_is_redacted():
    settings = Settings.from_env({}, kafka_properties={"sasl.oauthbearer.assertion.private.key.passphrase": SECRET})
    assert SECRET not in repr(settings) and SECRET not in redact(f"failed: {SECRET}", settings.kafka_extra)
