"""`fraudstream acl`: the least Kafka ACLs each role of the pipeline needs, for one input topic.

The table (ROLES) is data: `fraudstream acl` prints it as kafka-acls commands an operator can paste, and
`--apply` creates it with the admin's client properties (confluent-kafka's AdminClient.create_acls);
`stack up --secure` applies it for its topic, and on that stack nothing is allowed without an ACL
(StandardAuthorizer, allow.everyone.if.no.acl.found=false, the admin the only super user).

A role is a principal User:<role>. Topic names derive from the input topic T and the detector's group G as
Settings derives them: T.legit, T.fraud, T.dlq, T.labels, T.rules, and the changelogs G.T.<store>.changelog.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from enum import Enum

from fraudstream.errors import ConfigError, KafkaUnavailable
from fraudstream.settings import Settings

LITERAL, PREFIXED = "literal", "prefixed"
TOPIC, GROUP, TRANSACTIONAL_ID = "topic", "group", "transactional-id"
# The kafka-acls option that names each resource type.
RESOURCE_OPTION = {TOPIC: "--topic", GROUP: "--group", TRANSACTIONAL_ID: "--transactional-id"}
INSPECT_GROUP = "fraudstream-inspect"  # consumer/inspect.py's INSPECT_GROUP_ID (assign mode, never joined)


@dataclass(frozen=True, slots=True)
class Grant:
    role: str
    resource_type: str
    name: str
    pattern: str
    operations: tuple[str, ...]  # Kafka's operation names: Read, Write, Create, Describe, DescribeConfigs

    @property
    def principal(self) -> str:
        return f"User:{self.role}"


# role -> what it is for (the docs' ACL table is generated from ROLES and grants()).
ROLES: dict[str, str] = {
    "producer": "writes transactions and their ground-truth labels",
    "detector": "reads transactions and rules, writes legit/fraud/dlq and its changelogs, in its transactions",
    "rules-admin": "the only principal that may write the rules topic",
    "analyst": "reads alerts, writes verdicts (labels)",
    "inspector": "reads every topic of the pipeline, writes nothing",
}


def grants(settings: Settings) -> list[Grant]:
    """Every ACL of every role for settings' input topic and detector group."""
    s = settings
    t, g = s.transactions_topic, s.group_id
    read = ("Read", "Describe")
    write = ("Write", "Describe", "Create")  # Create: our commands create their own topics when missing
    table = [
        Grant("producer", TOPIC, t, LITERAL, write),
        Grant("producer", TOPIC, s.labels_topic, LITERAL, write),
        Grant("detector", TOPIC, t, LITERAL, read + ("Create",)),
        Grant("detector", TOPIC, s.rules_topic, LITERAL, read + ("Create",)),
        Grant("detector", TOPIC, s.labels_topic, LITERAL, read),
        *(
            Grant("detector", TOPIC, out, LITERAL, write + ("DescribeConfigs",))
            for out in (s.legit_topic, s.fraud_topic, s.dlq_topic, s.shadow_topic)
        ),
        # Its changelogs, G.T.<store>.changelog: made, written and restored by the detector alone.
        Grant("detector", TOPIC, f"{g}.{t}.", PREFIXED, ("Read", "Write", "Describe", "Create", "DescribeConfigs")),
        # Its group, and its readers' ids G.rules-reader, G.labels-reader (assign mode).
        Grant("detector", GROUP, g, PREFIXED, ("Read", "Describe")),
        # Transactional ids G-<host> (default) or G.<topic>.demo-<n> (the demo): all start with G.
        Grant("detector", TRANSACTIONAL_ID, g, PREFIXED, ("Write", "Describe")),
        Grant("rules-admin", TOPIC, s.rules_topic, LITERAL, ("Read", "Write", "Describe", "Create", "DescribeConfigs")),
        Grant("rules-admin", GROUP, f"{g}.rules-cli", LITERAL, ("Read",)),
        # `fraudstream rules` writes each change in one transaction of this id (T.rules.cli).
        Grant("rules-admin", TRANSACTIONAL_ID, s.rules_transactional_id, LITERAL, ("Write", "Describe")),
        Grant("analyst", TOPIC, s.fraud_topic, LITERAL, read),
        Grant("analyst", TOPIC, s.shadow_topic, LITERAL, read),  # `evaluate --shadow`
        Grant("analyst", TOPIC, s.labels_topic, LITERAL, ("Write", "Describe")),
        *(Grant("inspector", TOPIC, topic, LITERAL, read) for topic in s.all_topics),
    ]
    return table


def kafka_acls_commands(settings: Settings, *, admin_config: str = "admin.properties") -> list[str]:
    """The grants as kafka-acls commands (one per grant), as a cluster's operator would paste them."""
    lines = []
    for grant in grants(settings):
        ops = " ".join(f"--operation {op}" for op in grant.operations)
        pattern = " --resource-pattern-type prefixed" if grant.pattern == PREFIXED else ""
        lines.append(
            f"kafka-acls.sh --bootstrap-server {settings.bootstrap_servers} --command-config {admin_config} "
            f"--add --allow-principal {grant.principal} {ops} "
            f"{RESOURCE_OPTION[grant.resource_type]} {grant.name}{pattern}"
        )
    return lines


def table(settings: Settings) -> str:
    """The grants as a plain table: role, resource, pattern, operations."""
    rows = [("role", "resource", "pattern", "operations")]
    rows += [(g.role, f"{g.resource_type}:{g.name}", g.pattern, ",".join(g.operations)) for g in grants(settings)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}" for r in rows)


def acl_bindings(settings: Settings) -> list:
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    kinds = {TOPIC: ResourceType.TOPIC, GROUP: ResourceType.GROUP, TRANSACTIONAL_ID: ResourceType.TRANSACTIONAL_ID}
    patterns = {LITERAL: ResourcePatternType.LITERAL, PREFIXED: ResourcePatternType.PREFIXED}
    operation = {
        "Read": AclOperation.READ,
        "Write": AclOperation.WRITE,
        "Create": AclOperation.CREATE,
        "Describe": AclOperation.DESCRIBE,
        "DescribeConfigs": AclOperation.DESCRIBE_CONFIGS,
    }
    return [
        AclBinding(
            kinds[g.resource_type],
            g.name,
            patterns[g.pattern],
            g.principal,
            "*",
            operation[op],
            AclPermissionType.ALLOW,
        )
        for g in grants(settings)
        for op in g.operations
    ]


def apply(settings: Settings, extra_bindings: list | None = None) -> int:
    """Create the grants (and `extra_bindings`) on the cluster, as the principal of settings' client
    properties (the admin's); existing ACLs stay. Returns how many bindings were sent."""
    from confluent_kafka import KafkaException

    from fraudstream.kafka import admin

    bindings = acl_bindings(settings) + list(extra_bindings or ())
    client = admin(settings)
    for binding, future in client.create_acls(bindings, request_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            error = exc.args[0]
            raise KafkaUnavailable(
                f"could not create the ACL {_enum_name(binding.operation)} on "
                f"{_enum_name(binding.restype).lower()} {binding.name} for {binding.principal}: "
                f"{error.str()}"
            ) from None
    return len(bindings)


def _enum_name(value: Enum | str | int) -> str:
    """An AclBinding field by name: confluent-kafka turns the str or int it was given into its enum."""
    return value.name if isinstance(value, Enum) else str(value)


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    add_connection_arguments(parser)
    parser.add_argument("--group-id", dest="group_id", help="the detector's consumer group [FRAUDSTREAM_GROUP_ID]")
    parser.add_argument(
        "--format",
        choices=("kafka-acls", "table"),
        default="kafka-acls",
        help="kafka-acls commands to paste (default) or a table",
    )
    parser.add_argument(
        "--apply", action="store_true", help="create the ACLs on the cluster, with the admin's client properties (-F)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.apply:
        if not settings.kafka_extra.get("sasl.username") and not settings.kafka_extra.get("ssl.certificate.location"):
            raise ConfigError(
                "acl --apply needs the admin's client properties (-F, e.g. the secure stack's "
                "kafka-client-admin.properties)"
            )
        count = apply(settings)
        print(f"created {count} ACLs for the roles {', '.join(ROLES)} on {settings.transactions_topic}")
        return 0
    print(table(settings) if args.format == "table" else "\n".join(kafka_acls_commands(settings)))
    return 0
