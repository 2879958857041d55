"""Rules as records: the rules topic (`<topic>.rules`) read into the detector's current RuleSet.

The topic is compacted, keyed by rule id, with one partition, so every detector reads the same changes
in the same order; the offset just after the last change a reader applied names the rule set it runs
(its *rule-set version*). Each detector reads the whole topic with a consumer of its own, outside the
consumer group (assign mode, read_committed): first up to its end before judging anything, then between
batches without waiting (`poll`), so a change applies at a batch boundary and every record of a batch is
judged by one rule-set version.

A record is applied only if it is valid by the very checks `load_rules` applies to a rules file
(fraudstream.consumer.rules.checked_parameters), and if its version is the next one of the rule in force. Anything
else stays out of force (the rule's previous version keeps running) and becomes a dead letter with its
reason in headers, like the detector's other dead letters. A tombstone (null value) removes the rule.
An empty topic is seeded from the rules file.

Limits, so that no record can stop or wedge a detector (docs/how-to/rules.md): parameters
within PARAMETER_BOUNDS (consumer/rules.py); at most MAX_RULES rules on the topic at once; an id of
RULE_ID_PATTERN; author and comment of at most MAX_TEXT_CHARS; versions from 1 to MAX_RULE_VERSION, and a
change to a rule in force exactly its next version (so a version at the top of the range, or any jump, is
refused instead of blocking every later change). Text from a record reaches a log line or a terminal only
through fraudstream.printable.
"""

from __future__ import annotations

import getpass
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from fraudstream.consumer.decide import Decision, dead_letter
from fraudstream.consumer.rules import (
    _PREDICATES,
    DEFAULT_RULES_FILE,
    RULE_NAMES,
    RuleSet,
    checked_parameters,
    load_rules,
)
from fraudstream.errors import ConfigError, KafkaUnavailable, RegistryError
from fraudstream.kafka import admin, consumer_config, ensure_topics, producer_config
from fraudstream.printable import printable
from fraudstream.records import Rule
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, DecodeError, make_encoder
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.rules")

# On every legit output: the rule-set version that judged it (a FraudAlert carries it in a field).
RULE_SET_HEADER = "fraudstream.rule_set_version"
INVALID_RULE = "invalid_rule"
STALE_VERSION = "stale_rule_version"
TOO_MANY_RULES = "too_many_rules"

# Every rule runs on every batch (a rules x batch matrix of booleans, one predicate call per rule): 100 rules
# cost 0.7 ms per batch of 1,000 records (6 rules: 0.04 ms; docs/how-to/rules.md). Beyond it a new rule is refused; a
# change to one on the topic is not, and `fraudstream rules delete ID` makes room.
MAX_RULES = 100
# 2^31 - 1: a change a second for 68 years. A change to a rule in force must be exactly its next version.
MAX_RULE_VERSION = 2**31 - 1
RULE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # printable as it is, in logs and file names
MAX_TEXT_CHARS = 1_000  # author, comment

# Who wrote a change, on every record `fraudstream rules` writes (a tombstone has no value to carry it):
# the principal the cluster authenticated this client as, as its config says (absent: unauthenticated);
# and on a tombstone, the self-declared author and the comment.
PRINCIPAL_HEADER = "fraudstream.principal"
AUTHOR_HEADER = "fraudstream.author"
COMMENT_HEADER = "fraudstream.comment"


def rule_thresholds(rule: Rule, settings: Settings | None = None) -> dict[str, Any]:
    """A rule's thresholds over its kind's defaults, after its id, version and texts are checked; or
    ConfigError (one line, printable)."""
    if not RULE_ID_PATTERN.fullmatch(rule.id):
        raise ConfigError(
            f"rule id {_short(rule.id)} must be 1 to 64 letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    if not 1 <= rule.version <= MAX_RULE_VERSION:
        raise ConfigError(
            f"rule {rule.id} v{rule.version}: versions run from 1 to {MAX_RULE_VERSION} "
            f"(`fraudstream rules delete {rule.id}` starts the rule again at 1)"
        )
    for name, text in (("author", rule.author), ("comment", rule.comment)):
        if len(text) > MAX_TEXT_CHARS:
            raise ConfigError(
                f"rule {rule.id} v{rule.version}: {name} has {len(text)} characters; at most {MAX_TEXT_CHARS}"
            )
    parameters = {k: list(v) if isinstance(v, tuple) else v for k, v in rule.parameters.items()}
    return checked_parameters(rule.kind, parameters, where=f"rule {rule.id} v{rule.version}", settings=settings)


def _short(text: str) -> str:
    """Untrusted text in an error line: repr (control characters escaped), cut short."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def same_content(a: Rule, b: Rule) -> bool:
    return (a.kind, a.parameters, a.enabled) == (b.kind, b.parameters, b.enabled)


@dataclass(frozen=True)
class TopicRuleSet(RuleSet):
    """A RuleSet whose rules are named by id, each running its kind's predicate at its own version."""

    kinds: Mapping[str, str]
    versions: Mapping[str, int]

    def evaluate(self, tx: Any, features: Mapping[str, np.ndarray]) -> np.ndarray:
        fired = np.zeros((len(self.names), len(tx.amount_cents)), dtype=bool)
        for row, rule_id in enumerate(self.names):
            fired[row] = _PREDICATES[self.kinds[rule_id]](self.thresholds[rule_id], tx, features)
        return fired


def rule_set(
    rules: Mapping[str, tuple[Rule, dict[str, Any]]], version: str, *, skip_kinds: Iterable[str] = ()
) -> TopicRuleSet:
    """The enabled rules, in the documented order of their kinds, then by id."""
    skip = set(skip_kinds)
    order = {kind: i for i, kind in enumerate(RULE_NAMES)}
    live = sorted(
        (r for r, _ in rules.values() if r.enabled and r.kind not in skip), key=lambda r: (order[r.kind], r.id)
    )
    names = tuple(r.id for r in live)
    return TopicRuleSet(
        names,
        {n: rules[n][1] for n in names},
        version,
        kinds={r.id: r.kind for r in live},
        versions={r.id: r.version for r in live},
    )


def seed_records(settings: Settings, rules_file: Path | None, *, author: str) -> list[Rule]:
    """Version 1 of every rule kind from the rules file (validated by load_rules); disabled ones stay disabled."""
    loaded = load_rules(rules_file, settings=settings)
    now = datetime.now(UTC)
    records = []
    for kind in RULE_NAMES:
        enabled = kind in loaded.names
        params = (
            {k: tuple(v) if isinstance(v, list) else v for k, v in loaded.thresholds[kind].items() if k != "enabled"}
            if enabled
            else {}
        )
        records.append(
            Rule(
                id=kind,
                version=1,
                kind=kind,
                parameters=params,
                enabled=enabled,
                author=author,
                comment=f"seeded from {rules_file}",
                written_at=now,
            )
        )
    return records


class RulesCodec:
    """Encode and decode Rule records with the registered schema (Confluent framing)."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        registry = registry or Registry(settings)
        schemas = load_schemas(settings.schemas_dir)
        self.schema = schemas.expanded["Rule"]
        self.decoder = Decoder(registry, self.schema)
        self._registry = registry
        self._encode: Callable[[dict], bytes] | None = None

    def encode(self, record: Rule) -> bytes:
        if self._encode is None:
            ids = current_ids(self.settings, self._registry)  # one clear line when the schemas are not registered
            self._encode = make_encoder(
                ids[self.settings.rules_topic], load_schemas(self.settings.schemas_dir).parsed["Rule"]
            )
        return self._encode(record.to_dict())

    def decode(self, value: bytes | None) -> Rule:
        return Rule.from_dict(self.decoder.decode(value))


def client_principal(settings: Settings) -> str | None:
    """Whom the cluster authenticates this client as, from its Kafka client config; None when it does not
    authenticate it (PLAINTEXT, or TLS without a client certificate). Kafka does not stamp the writer's
    principal on a record, so a writer names it (PRINCIPAL_HEADER); the rules topic's ACLs let only rules
    administrators write, so whatever it names is one of them, authenticated."""
    config = {str(k).lower(): str(v) for k, v in settings.kafka_extra.items()}
    protocol = config.get("security.protocol", "plaintext").lower()
    if protocol.startswith("sasl"):
        mechanism = config.get("sasl.mechanisms", config.get("sasl.mechanism", "GSSAPI")).upper()
        if mechanism == "OAUTHBEARER":
            if config.get("sasl.oauthbearer.method", "default").lower() == "oidc":
                return f"OAUTHBEARER client {config.get('sasl.oauthbearer.client.id', '?')}"
            found = re.search(r"(?:^|\s)principal=(\S+)", config.get("sasl.oauthbearer.config", ""))
            return f"OAUTHBEARER {found.group(1)}" if found else None
        if mechanism == "GSSAPI":
            return f"GSSAPI {config.get('sasl.kerberos.principal', 'kafkaclient')}"
        return f"{mechanism} {config['sasl.username']}" if config.get("sasl.username") else None
    if protocol == "ssl" and config.get("ssl.certificate.location"):
        return f"TLS certificate {_certificate_subject(config['ssl.certificate.location'])}"
    return None


def _certificate_subject(path: str) -> str:
    """The subject of a PEM client certificate (Kafka's default TLS principal), or its path when unreadable."""
    try:
        from cryptography import x509

        return x509.load_pem_x509_certificate(Path(path).read_bytes()).subject.rfc4514_string()
    except (ImportError, OSError, ValueError):
        return path


def write_records(settings: Settings, codec: RulesCodec, records: Iterable[Rule]) -> None:
    """Write rule versions (keyed by id), each naming the writer's principal, and wait until the broker has them all."""
    _write(settings, [(record.id, codec.encode(record), []) for record in records])


def write_tombstone(settings: Settings, rule_id: str, *, author: str, comment: str) -> None:
    """Remove a rule: a tombstone (null value), whose headers say who removed it and why."""
    _write(settings, [(rule_id, None, [(AUTHOR_HEADER, author.encode()), (COMMENT_HEADER, comment.encode())])])


def _write(settings: Settings, records: list[tuple[str, bytes | None, list[tuple[str, bytes]]]]) -> None:
    failures: list[str] = []

    def delivered(error, message) -> None:
        if error is not None:
            failures.append(error.str())

    principal = client_principal(settings)
    who = [(PRINCIPAL_HEADER, principal.encode())] if principal else []
    producer = Producer(producer_config(settings, **{"enable.idempotence": True, "on_delivery": delivered}))
    for key, value, headers in records:
        producer.produce(settings.rules_topic, value, key.encode(), headers=[*who, *headers])
    left = producer.flush(30)
    if left or failures:
        raise KafkaUnavailable(
            f"could not write to {settings.rules_topic}: "
            f"{failures[0] if failures else f'{left} records still unsent after 30 s'}"
        )


def check_rules_topic(settings: Settings) -> None:
    """Create the rules topic if missing; refuse one with several partitions (no single order of changes)."""
    ensure_topics(settings, (settings.rules_topic,))
    metadata = admin(settings).list_topics(settings.rules_topic, timeout=10).topics[settings.rules_topic]
    if len(metadata.partitions) != 1:
        raise ConfigError(
            f"rules topic {settings.rules_topic} has {len(metadata.partitions)} partitions; it must "
            "have exactly one, so that every detector applies rule changes in the same order"
        )


APPLIED, REMOVED, UNCHANGED, REFUSED = "applied", "removed", "unchanged", "refused"


@dataclass(frozen=True)
class Change:
    """One record of the rules topic as a reader judged it: APPLIED (a new rule or its next version),
    REMOVED (a tombstone), UNCHANGED (a repeat, or a tombstone of no rule) or REFUSED (with the reason)."""

    message: Any
    record: Rule | None  # None: a tombstone, or not a Rule record
    outcome: str
    reason: str = ""


class RulesTopic:
    """One detector's reader of the rules topic: its current rule set, and the dead letters it found."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry | None = None,
        skip_kinds: Iterable[str] = (),
        on_log: Callable[[str], None] | None = None,
        codec: RulesCodec | None = None,
        on_refused: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.settings = settings
        self.on_refused = on_refused  # a metrics counter, by error kind
        self.codec = codec or RulesCodec(settings, registry)
        self.skip_kinds = tuple(skip_kinds)
        self.on_log = on_log or log.info
        self.rules: dict[str, tuple[Rule, dict[str, Any]]] = {}
        self.version = "0"  # the position after the last change applied
        self.current = rule_set({}, self.version, skip_kinds=self.skip_kinds)
        self.dead_letters: list[Decision] = []  # invalid rule records, to route to the dead-letter topic
        self.changes = 0  # rule changes applied since start (the initial read included)
        self.refused = 0  # rule records refused since start (each one dead-lettered, and logged)
        self.consumer: Consumer | None = None

    # ----- start -----
    def start(self, *, seed_from: Path | None = None, timeout_s: float = 30.0) -> TopicRuleSet:
        """Read the whole topic (seeding it from the rules file first when it is empty); the rule set in force."""
        s = self.settings
        check_rules_topic(s)
        self.consumer = Consumer(
            consumer_config(
                s, f"{s.group_id}.rules-reader", **{"enable.auto.commit": False, "auto.offset.reset": "earliest"}
            )
        )
        partition = TopicPartition(s.rules_topic, 0, OFFSET_BEGINNING)
        self.consumer.assign([partition])
        low, high = self._watermarks()
        seeded = high == 0 and seed_from is not None
        if seeded:
            write_records(s, self.codec, seed_records(s, seed_from, author=f"seed ({getpass.getuser()})"))
            self.on_log(f"rules topic {s.rules_topic} was empty: seeded from {seed_from}")
            low, high = self._watermarks()
        # Until the position reaches the end taken now (a compacted topic may have gaps; never wait for
        # the record at high - 1, which compaction may have removed).
        deadline = time.monotonic() + timeout_s
        while self._position() < high:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read rules topic {s.rules_topic} to its end ({high}) within {timeout_s:g} s"
                )
            self.poll(timeout_s=0.2)
        if not seeded and seed_from is not None and Path(seed_from) != DEFAULT_RULES_FILE:
            # A rules file only seeds an empty topic: say so when one was named and is not what runs.
            if differing := self.differing_from(seed_from):
                self.on_log(
                    f"rules file {seed_from} not applied: {s.rules_topic} already holds rules, and those are "
                    f"in force (rule set {self.version}); they differ from the file in {', '.join(differing)}. "
                    f"`fraudstream rules set {seed_from}` writes the file's rules to the topic"
                )
        return self.current

    def differing_from(self, rules_file: Path) -> list[str]:
        """Ids of the rules whose rule in force (enabled, with its kind and thresholds) differs from the file's."""
        loaded = load_rules(rules_file, settings=self.settings)
        from_file = {
            name: (name, {k: v for k, v in loaded.thresholds[name].items() if k != "enabled"}) for name in loaded.names
        }
        in_force = {
            rule_id: (record.kind, thresholds) for rule_id, (record, thresholds) in self.rules.items() if record.enabled
        }
        return sorted(
            rule_id for rule_id in from_file.keys() | in_force.keys() if from_file.get(rule_id) != in_force.get(rule_id)
        )

    def _started(self) -> Consumer:
        assert self.consumer is not None, "start() first"
        return self.consumer

    def _watermarks(self) -> tuple[int, int]:
        try:
            return self._started().get_watermark_offsets(TopicPartition(self.settings.rules_topic, 0), timeout=10)
        except KafkaException as exc:
            raise KafkaUnavailable(f"rules topic {self.settings.rules_topic}: {exc.args[0].str()}") from exc

    def _position(self) -> int:
        position = self._started().position([TopicPartition(self.settings.rules_topic, 0)])[0].offset
        return position if position >= 0 else 0  # a logical offset: nothing read yet

    # ----- between batches -----
    def poll(self, *, timeout_s: float = 0.0) -> bool:
        """Apply the rule records fetched so far (no wait by default). True when the rule set changed."""
        changed = False
        consumer = self._started()
        for message in consumer.consume(500, timeout_s):
            error = message.error()
            if error is not None:
                self.on_log(f"rules reader: {printable(error.str())}")
                continue
            try:
                changed |= self.judge(message).outcome in (APPLIED, REMOVED)
            except RegistryError as exc:  # infrastructure: read this record again at the next poll
                self.on_log(f"rules reader: {printable(str(exc))}; will retry")
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                assert topic is not None and partition is not None and offset is not None  # a record: all set
                consumer.seek(TopicPartition(topic, partition, offset))
                break
        if changed:
            self.current = rule_set(self.rules, self.version, skip_kinds=self.skip_kinds)
        return changed

    def judge(self, message) -> Change:
        """Apply one record of the topic, or refuse it (one log line, one dead letter); what became of it."""
        raw_key = message.key() or b""
        key = raw_key.decode("utf-8", "replace")
        position = str(message.offset() + 1)
        if message.value() is None:  # tombstone: the rule is removed
            if self.rules.pop(key, None) is None:
                return Change(message, None, UNCHANGED)
            self.version, self.changes = position, self.changes + 1
            self.on_log(f"rule {printable(key)} removed (rule set {self.version})")
            return Change(message, None, REMOVED)
        try:
            record = self.codec.decode(message.value())
        except DecodeError as error:
            return self._refuse(message, None, error)
        if record.id.encode() != raw_key:
            return self._refuse(
                message,
                record,
                DecodeError(INVALID_RULE, f"record key {_short(key)} is not the rule id {_short(record.id)}"),
            )
        try:
            thresholds = rule_thresholds(record, self.settings)
        except ConfigError as error:
            return self._refuse(message, record, DecodeError(INVALID_RULE, str(error)))
        current = self.rules.get(record.id)
        if current is not None and record.version != current[0].version + 1:
            if record.version == current[0].version and same_content(record, current[0]):
                return Change(message, record, UNCHANGED)  # the same version twice (two detectors seeding at once)
            return self._refuse(
                message,
                record,
                DecodeError(
                    STALE_VERSION,
                    f"rule {record.id} v{record.version} is not the next version of v{current[0].version}, in force",
                ),
            )
        if current is None and len(self.rules) >= MAX_RULES:
            return self._refuse(
                message,
                record,
                DecodeError(
                    TOO_MANY_RULES,
                    f"rule {record.id} would be rule {len(self.rules) + 1} on the topic; at most "
                    f"{MAX_RULES} (`fraudstream rules delete ID` makes room)",
                ),
            )
        self.rules[record.id] = (record, thresholds)
        self.version, self.changes = position, self.changes + 1
        return Change(message, record, APPLIED)

    def _refuse(self, message, record: Rule | None, error: DecodeError) -> Change:
        reason = printable(error.reason)  # it may quote the record: never a control character in a log or header
        self.on_log(
            f"rule record at {message.topic()}[{message.partition()}]@{message.offset()} refused "
            f"({error.kind}): {reason}"
        )
        self.dead_letters.append(dead_letter(message, DecodeError(error.kind, reason)))
        self.refused += 1
        self.on_refused(error.kind)
        return Change(message, record, REFUSED, reason)

    def take_dead_letters(self) -> list[Decision]:
        letters, self.dead_letters = self.dead_letters, []
        return letters

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None


def read_changes(
    settings: Settings, codec: RulesCodec, *, timeout_s: float = 30.0
) -> tuple[dict[str, Rule], list[Change]]:
    """Every record still on the rules topic, oldest first, judged as a detector judges it (one code path, so
    `fraudstream rules` numbers the next version as detectors will accept it); and the rules in force after them."""
    reader = RulesTopic(settings, codec=codec, on_log=lambda line: None)
    changes = [reader.judge(message) for message in read_messages(settings, timeout_s=timeout_s)]
    return {rule_id: record for rule_id, (record, _) in reader.rules.items()}, changes


def read_messages(settings: Settings, *, timeout_s: float = 30.0) -> list[Any]:
    """Every record still on the rules topic, oldest first (read_committed)."""
    check_rules_topic(settings)
    consumer = Consumer(
        consumer_config(
            settings, f"{settings.group_id}.rules-cli", **{"enable.auto.commit": False, "auto.offset.reset": "earliest"}
        )
    )
    try:
        partition = TopicPartition(settings.rules_topic, 0, OFFSET_BEGINNING)
        consumer.assign([partition])
        low, high = consumer.get_watermark_offsets(TopicPartition(settings.rules_topic, 0), timeout=10)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while True:
            position = consumer.position([TopicPartition(settings.rules_topic, 0)])[0].offset
            if max(position, low) >= high:  # a logical position (nothing read yet) counts as the start
                return out
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"could not read rules topic {settings.rules_topic} within {timeout_s:g} s")
            out += [message for message in consumer.consume(500, 0.2) if message.error() is None]
    finally:
        consumer.close()
