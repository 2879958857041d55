"""`fraudstream` command line: one subcommand per job.

Each subcommand lives next to the code it drives and contributes `add_arguments(parser)` and
`run(args, settings) -> int`. Expected failures (FraudstreamError) print one line, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import javaproperties

from pathlib import Path

from fraudstream import argtypes
from fraudstream.client_config import normalize_registry, parse_pairs, read_properties_file
from fraudstream.errors import FraudstreamError
from fraudstream.printable import printable
from fraudstream.settings import ENV, Settings

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "stack": ("fraudstream.stack_cli", "start, stop or inspect the local Kafka + schema registry"),
    "schemas": ("fraudstream.schemas_cli", "register schemas, check their evolution"),
    "produce": ("fraudstream.producer.cli", "generate labelled synthetic transactions into Kafka"),
    "detect": ("fraudstream.consumer.cli", "route transactions to legit/fraud topics, exactly once"),
    "rules": ("fraudstream.rules_cli", "list, show, change and disable the detection rules while detectors run"),
    "inspect": (
        "fraudstream.consumer.inspect",
        "print a topic's records as JSON lines (like kafka-avro-console-consumer)",
    ),
    "demo": ("fraudstream.demo", "run the whole pipeline on the local stack with a live view"),
    "backtest": ("fraudstream.backtest", "replay past transactions through candidate rules beside the live ones"),
    "evaluate": (
        "fraudstream.evaluate",
        "measure detection quality from the outputs and the labels (Handbook metrics)",
    ),
    "acl": ("fraudstream.acl", "print (or apply, as the admin) the least Kafka ACLs of each role for a topic"),
    "train": ("fraudstream.train", "train a model for detect --model from the transactions and labels topics"),
    "console": ("fraudstream.console", "the analysts' web application: review queue, verdicts, rules, dashboard"),
}


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that talks to Kafka and the registry (override the environment)."""
    group = parser.add_argument_group("connection (default: environment, then the local stack)")
    group.add_argument(
        "--bootstrap-servers", dest="bootstrap_servers", help="Kafka bootstrap servers [KAFKA_BOOTSTRAP_SERVERS]"
    )
    group.add_argument(
        "--schema-registry-url",
        dest="schema_registry_url",
        help="Confluent-compatible Schema Registry URL [SCHEMA_REGISTRY_URL]",
    )
    group.add_argument(
        "--topic", dest="transactions_topic", help="input topic; the others derive from it [FRAUDSTREAM_TOPIC]"
    )
    client = parser.add_argument_group(
        "client properties (for TLS, SASL, registry auth; a flag overrides the file, named flags override both)"
    )
    client.add_argument(
        "-F",
        "--kafka-config",
        dest="kafka_config",
        type=Path,
        metavar="FILE",
        help=f"librdkafka properties file, key=value lines as in client.properties [{ENV['kafka_config']}]",
    )
    client.add_argument(
        "-X",
        "--kafka-property",
        dest="kafka_property",
        action="append",
        default=[],
        type=argtypes.property_pair,
        metavar="KEY=VALUE",
        help="a librdkafka property, e.g. security.protocol=SASL_SSL; repeatable",
    )
    client.add_argument(
        "--registry-config",
        dest="registry_config",
        type=Path,
        metavar="FILE",
        help="schema registry client properties file: url, basic.auth.user.info, ssl.ca.location, "
        f"ssl.certificate.location, ssl.key.location, bearer.auth.* [{ENV['registry_config']}]",
    )
    client.add_argument(
        "-R",
        "--registry-property",
        dest="registry_property",
        action="append",
        default=[],
        type=argtypes.property_pair,
        metavar="KEY=VALUE",
        help="a schema registry client property, e.g. basic.auth.user.info=KEY:SECRET; repeatable",
    )


def client_flags(settings: Settings, private_dir: Path | None = None) -> list[str]:
    """Flags that give a child command the same client properties: the files, and -X/-R for what
    differs from them. Bootstrap servers and registry URL are left to the connection flags.

    `private_dir`: where a secret that differs from the files (a -X sasl.password=...) goes instead of the
    child's command line (visible in ps): a private properties file with the file's properties and the
    flags' values, passed as the child's file."""
    from fraudstream.client_config import is_secret
    from fraudstream.stack_secure import write_private

    flags: list[str] = []
    for option, pair_flag, path, properties, what, name in (
        ("--kafka-config", "-X", settings.kafka_config, settings.kafka_extra, "Kafka client properties", "kafka"),
        (
            "--registry-config",
            "-R",
            settings.registry_config,
            settings.registry_extra,
            "registry client properties",
            "registry",
        ),
    ):
        from_file: dict[str, str] = {}
        raw: dict[str, str] = {}
        if path:
            raw = read_properties_file(path, what)
            from_file = normalize_registry(raw) if pair_flag == "-R" else raw
        differing = {key: value for key, value in properties.items() if from_file.get(key) != value}
        if private_dir is not None and any(is_secret(key) for key in differing):
            merged = private_dir / f"{name}-client.properties"
            private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(
                merged,
                javaproperties.dumps({**raw, **{k: str(v) for k, v in differing.items()}}, timestamp=False).encode(),
            )
            flags += [option, str(merged)]
            continue
        if path:
            flags += [option, str(path)]
        for key, value in differing.items():
            flags += [pair_flag, f"{key}={value}"]
    return flags


SETTINGS_FLAGS = (
    "bootstrap_servers",
    "schema_registry_url",
    "transactions_topic",
    "partitions",
    "group_id",
    "transactional_id",
    "fraud_threshold_cents",
    "batch_max_records",
    "batch_max_ms",
    "decoder",
    "metrics_port",
    "compatibility",
    "stateful",
    "rules_file",
    "kafka_config",
    "registry_config",
    "model_file",
    "label_delay_days",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fraudstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        command.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = {name: getattr(args, name) for name in SETTINGS_FLAGS if hasattr(args, name)}
        settings = Settings.from_env(
            kafka_properties=parse_pairs(getattr(args, "kafka_property", []), "-X/--kafka-property"),
            registry_properties=parse_pairs(getattr(args, "registry_property", []), "-R/--registry-property"),
            **overrides,
        )
        return int(args.module.run(args, settings) or 0)
    except FraudstreamError as exc:
        print(f"fraudstream {args.command}: error: {printable(str(exc))}", file=sys.stderr)  # may quote input
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"fraudstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
