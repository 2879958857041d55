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

Shadow rules (a candidate rule set run beside the live one, issue #23) are Rule records of the same topic keyed
`shadow/<rule id>` (SHADOW_PREFIX; '/' is outside RULE_ID_PATTERN, so no shadow key is ever a live id) whose
`id` is the plain rule id. They are checked as live rules are, each shadow key has its own chain of versions,
MAX_RULES counts them apart from the live ones, and a tombstone on `shadow/<id>` removes one. A reader keeps
them beside the live rules: `current` is the live set, `shadow` the shadow set (None while no shadow rule is on
the topic), each named by the position after its own last change.

`fraudstream rules` writes each change (a rules file, a promotion: several records) in one Kafka transaction
(`write_change`), and `poll` applies a transaction's records together (see its docstring), so a detector never
runs a batch with half of a change in force.

Limits, so that no record can stop or wedge a detector (docs/how-to/rules.md): parameters
within PARAMETER_BOUNDS (consumer/rules.py); at most MAX_RULES rules on the topic at once; an id of
RULE_ID_PATTERN; author and comment of at most MAX_TEXT_CHARS; versions from 1 to MAX_RULE_VERSION, and a
change to a rule in force exactly its next version (so a version at the top of the range, or any jump, is
refused instead of blocking every later change). Text from a record reaches a log line or a terminal only
through fraudstream.printable.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from fraudstream.consumer.decide import Decision, dead_letter
from fraudstream.consumer.global_reader import GlobalReader
from fraudstream.consumer.rules import (
    _PREDICATES,
    DEFAULT_RULES_FILE,
    RULE_NAMES,
    RuleSet,
    checked_parameters,
    load_rules,
)
from fraudstream.errors import ConfigError, Fenced, KafkaUnavailable, NotAuthorized, RegistryError
from fraudstream.kafka import (
    admin,
    consumer_config,
    denied,
    ensure_topics,
    explain_denial,
    producer_config,
    refresh_metadata,
    transactional_producer_config,
)
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
# A shadow rule's key: SHADOW_PREFIX + its id. '/' is not in RULE_ID_PATTERN, so it never names a live rule.
SHADOW_PREFIX = "shadow/"
# How long a poll may keep reading to take in the rest of a transaction it has begun to read (its records come
# in one fetch but for the largest changes); past it, the change waits for the next poll, still whole.
CATCH_UP_S = 0.5
END_QUERY_S = 5.0  # the broker's answer to "where does the topic end", at most this long

# Who wrote a change, on every record `fraudstream rules` writes (a tombstone has no value to carry it):
# the principal the cluster authenticated this client as, as its config says (absent: unauthenticated);
# and on a tombstone, the self-declared author and the comment.
PRINCIPAL_HEADER = "fraudstream.principal"
AUTHOR_HEADER = "fraudstream.author"
COMMENT_HEADER = "fraudstream.comment"
# On each record of a change of several records (`rules set FILE`, `shadow set`, `promote`): "<change id> <i>/<n>",
# so that `rules history` shows which records one transaction wrote together.
CHANGE_HEADER = "fraudstream.change"


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


def shadow_key(rule_id: str) -> str:
    return SHADOW_PREFIX + rule_id


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


# One record of a change: key, value (None: a tombstone) and headers.
Header = tuple[str, str | bytes | None]
Write = tuple[str, bytes | None, list[Header]]


def rule_write(codec: RulesCodec, record: Rule, *, shadow: bool = False) -> Write:
    """A rule version, keyed by its id (or by `shadow/<id>` for a shadow rule)."""
    return (shadow_key(record.id) if shadow else record.id, codec.encode(record), [])


def removal(key: str, *, author: str, comment: str) -> Write:
    """A tombstone (null value) of a rule or shadow key, whose headers say who removed it and why."""
    return (key, None, [(AUTHOR_HEADER, author.encode()), (COMMENT_HEADER, comment.encode())])


def write_records(settings: Settings, codec: RulesCodec, records: Iterable[Rule]) -> None:
    """Rule versions written outside any transaction (a detector seeding an empty topic: several detectors may
    seed at once, and would fence one another on one transactional id), each naming the writer's principal."""
    writes = [rule_write(codec, record) for record in records]
    failures: list[str] = []

    def delivered(error, message) -> None:
        if error is not None:
            failures.append(error.str())

    producer = Producer(producer_config(settings, **{"enable.idempotence": True, "on_delivery": delivered}))
    for key, value, headers in _signed(settings, writes):
        producer.produce(settings.rules_topic, value, key.encode(), headers=headers)
    left = producer.flush(30)
    if left or failures:
        raise KafkaUnavailable(
            f"could not write to {settings.rules_topic}: "
            f"{failures[0] if failures else f'{left} records still unsent after 30 s'}"
        )


def write_change(settings: Settings, writes: list[Write], *, timeout_s: float = 30.0) -> None:
    """One change of `fraudstream rules` (any number of records) in one Kafka transaction, so that every reader
    applies it whole or not at all (RulesTopic.poll). The transactional id is the rules topic's
    (Settings.rules_transactional_id): one writer at a time; a second one started meanwhile fences this one,
    whose transaction is then aborted, and this raises Fenced. Each record names the writer's principal."""
    s, tid = settings, settings.rules_transactional_id
    # error_cb: the errors come back from the calls below; log_level 3 (errors): a new transactional id's
    # coordinator loading is logged as a warning ("Not coordinator: retrying") that is no failure.
    producer = Producer(transactional_producer_config(s, tid, error_cb=lambda error: None, log_level=3))
    committing = False
    change = uuid.uuid4().hex[:12]
    try:
        producer.init_transactions(timeout_s)
        producer.begin_transaction()
        for i, (key, value, headers) in enumerate(_signed(s, writes), 1):
            part: list[Header] = [(CHANGE_HEADER, f"{change} {i}/{len(writes)}".encode())] if len(writes) > 1 else []
            producer.produce(s.rules_topic, value, key.encode(), headers=[*headers, *part])
        committing = True
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                producer.commit_transaction(max(deadline - time.monotonic(), 1.0))
                return
            except KafkaException as exc:  # retry a commit that timed out; never abort after it (pitfalls 4)
                if not exc.args[0].retriable() or time.monotonic() > deadline:
                    raise
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.txn_requires_abort():
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(10)
        raise _write_failure(s, error, unknown=committing and error.retriable()) from None


def _write_failure(settings: Settings, error: KafkaError, *, unknown: bool) -> Exception:
    """One line for a change that could not be written: fenced, denied, or the broker's error."""
    topic, tid = settings.rules_topic, settings.rules_transactional_id
    outcome = (
        "whether it was written is unknown (`fraudstream rules history` shows it)"
        if unknown
        else "nothing of this change was written"
    )
    if error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH):
        return Fenced(
            f"another writer of {topic} started with the transactional id {tid} while this change was being "
            f"written, and fenced it: {outcome}; run the command again"
        )
    if error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
        return NotAuthorized(denied(settings, f"Write on transactional id {tid}"))
    if explained := explain_denial(settings, error.str(), topic):
        return NotAuthorized(explained)
    return KafkaUnavailable(f"could not write to {topic}: {error.str()}; {outcome}")


def _signed(settings: Settings, writes: Iterable[Write]) -> list[Write]:
    """Each record with the principal the cluster authenticated this client as (PRINCIPAL_HEADER), if any."""
    principal = client_principal(settings)
    who: list[Header] = [(PRINCIPAL_HEADER, principal.encode())] if principal else []
    return [(key, value, [*who, *headers]) for key, value, headers in writes]


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
    REMOVED (a tombstone), UNCHANGED (a repeat, or a tombstone of no rule) or REFUSED (with the reason);
    `shadow` when its key is a shadow rule's (`shadow/<id>`)."""

    message: Any
    record: Rule | None  # None: a tombstone, or not a Rule record
    outcome: str
    reason: str = ""
    shadow: bool = False


class RulesTopic(GlobalReader):
    """One detector's reader of the rules topic (a global reader: consumer/global_reader.py): its live rule set (`current`), its shadow rule set (`shadow`,
    None while the topic holds no shadow rule), and the dead letters it found. At a batch boundary:

        if topic.poll():  # the live set, the shadow set, or both changed
            decider.rules = topic.current
            decider.shadow_rules = topic.shadow

    (`live_changed` and `shadow_changed` say which one the last poll changed.)"""

    name = "rules reader"

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
        super().__init__(settings)
        self.on_refused = on_refused  # a metrics counter, by error kind
        self.codec = codec or RulesCodec(settings, registry)
        self.skip_kinds = tuple(skip_kinds)
        self.on_log = on_log or log.info
        self.rules: dict[str, tuple[Rule, dict[str, Any]]] = {}
        self.shadow_rules: dict[str, tuple[Rule, dict[str, Any]]] = {}  # by plain rule id
        self.version = "0"  # the position after the last change applied to the live rules
        self.shadow_version = "0"  # ... and to the shadow rules
        self.current = rule_set({}, self.version, skip_kinds=self.skip_kinds)
        self.shadow: TopicRuleSet | None = None
        self.live_changed = self.shadow_changed = False  # what the last poll() changed
        self._unpublished = {False: False, True: False}  # shadow? -> changes judged, not yet in current / shadow
        self.dead_letters: list[Decision] = []  # invalid rule records, to route to the dead-letter topic
        self.changes = 0  # rule changes applied since start (the initial read included)
        self.refused = 0  # rule records refused since start (each one dead-lettered, and logged)
        self._admin: AdminClient | None = None  # asks the topic's end (poll)
        self.live_records_read = 0  # records of live rules read (tombstones and refused ones too): not empty

    def skip(self, kinds: Iterable[str]) -> None:
        """Leave rules of `kinds` out of both sets from now on: a detector started without what they need (no
        terminal window) says so once, and a shadow rule of such a kind is left out like a live one."""
        self.skip_kinds = tuple(kinds)
        self._unpublished = {False: True, True: True}
        self._publish()

    # ----- start -----
    def start(self, *, seed_from: Path | None = None, timeout_s: float = 30.0) -> TopicRuleSet:
        """Read the whole topic (seeding it from the rules file when it holds no live rule); the rule set in force."""
        s = self.settings
        check_rules_topic(s)
        self.consumer = Consumer(
            consumer_config(
                s, f"{s.group_id}.rules-reader", **{"enable.auto.commit": False, "auto.offset.reset": "earliest"}
            )
        )
        self._admin = admin(s)  # made now: its first connection would otherwise delay the first change (0.3 s)
        partition = TopicPartition(s.rules_topic, 0, OFFSET_BEGINNING)
        self.consumer.assign([partition])
        self._read_to_end(timeout_s)
        # Seeded when no live rule was ever written: an empty topic, or one that holds only a shadow set
        # (`rules shadow set` before any detector ran). A topic whose live rules were all deleted is not, as long
        # as their tombstones are kept (compaction drops them after delete.retention.ms).
        seeded = self.live_records_read == 0 and seed_from is not None
        if seeded:
            seed = seed_records(s, seed_from, author=f"seed ({getpass.getuser()})")
            write_records(s, self.codec, seed)
            self.on_log(f"rules topic {s.rules_topic} held no live rule: seeded from {seed_from}")
            self._read_back(len(seed), timeout_s)
            self._read_to_end(timeout_s)
        if not seeded and seed_from is not None and Path(seed_from) != DEFAULT_RULES_FILE:
            # A rules file only seeds an empty topic: say so when one was named and is not what runs.
            if differing := self.differing_from(seed_from):
                self.on_log(
                    f"rules file {seed_from} not applied: {s.rules_topic} already holds rules, and those are "
                    f"in force (rule set {self.version}); they differ from the file in {', '.join(differing)}. "
                    f"`fraudstream rules set {seed_from}` writes the file's rules to the topic"
                )
        return self.current

    def _read_back(self, records: int, timeout_s: float) -> None:
        """Until at least `records` live-rule records are read: the seed just written, whatever the end offset says
        (asked right after the write, it came back stale in a 3-broker soak, and the detector started with no
        rule at all: the terminal rule never ran for its life)."""
        deadline = time.monotonic() + timeout_s
        while self.live_records_read < records:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read back the {records} rules written to {self.settings.rules_topic} "
                    f"within {timeout_s:g} s"
                )
            self.poll(timeout_s=0.2)

    def _read_to_end(self, timeout_s: float) -> None:
        """Until the position reaches the end taken now (a compacted topic may have gaps; never wait for the record
        at high - 1, which compaction may have removed), every change read whole (poll)."""
        high = self.call(
            f"reading where rules topic {self.settings.rules_topic} ends",
            self._ask_end,
            topic=self.settings.rules_topic,
            client=self._end_asker(),
        )
        deadline = time.monotonic() + timeout_s
        while self._position() < high or any(self._unpublished.values()):
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read rules topic {self.settings.rules_topic} to its end ({high}) within {timeout_s:g} s"
                )
            self.poll(timeout_s=0.2)

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

    def _position(self) -> int:
        return self.position(self.settings.rules_topic, 0)

    # ----- between batches -----
    def poll(self, *, timeout_s: float = 0.0) -> bool:
        """Apply the rule records fetched so far (no wait by default). True when the live rule set (`current`)
        or the shadow rule set (`shadow`) changed; `live_changed` and `shadow_changed` say which.

        A change written in one transaction (`fraudstream rules set FILE`, `promote`: several records) is
        applied whole: once a poll has records, it reads on until its position reaches the topic's end as the
        broker gives it now (the last stable offset, this reader being read_committed: a committed
        transaction's records are all below it) before it rebuilds the rule sets. A single `consume` returns
        what one fetch brought, which can be part of a transaction, and the detector would then judge a batch
        with half of a change in force. The read-on is bounded by CATCH_UP_S; past it the records judged stay
        out of `current` and `shadow` until a later poll reaches the end. With nothing new, a poll costs one
        `consume` on the local queue (no broker request)."""
        consumer = self._client()
        self.live_changed = self.shadow_changed = False
        messages = consumer.consume(500, timeout_s)
        if not messages and not any(self._unpublished.values()):
            return False
        if not self._apply(messages) or (end := self._end()) is None:
            return False  # asked once a poll: a registry or broker away costs a batch boundary END_QUERY_S at most
        deadline = time.monotonic() + CATCH_UP_S
        while self._position() < end:
            if time.monotonic() > deadline:
                return False
            if not self._apply(consumer.consume(500, min(0.05, max(deadline - time.monotonic(), 0.0)))):
                return False
        self._publish()
        return self.live_changed or self.shadow_changed

    def _apply(self, messages: list[Any]) -> bool:
        """Judge each record; False when the registry failed (that record is read again at the next poll)."""
        for message in messages:
            error = message.error()
            if error is not None:
                self.on_log(f"rules reader: {printable(error.str())}")
                continue
            try:
                change = self.judge(message)
            except RegistryError as exc:  # infrastructure: read this record again at the next poll
                self.on_log(f"rules reader: {printable(str(exc))}; will retry")
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                assert topic is not None and partition is not None and offset is not None  # a record: all set
                self._client().seek(TopicPartition(topic, partition, offset))
                return False
            if change.outcome in (APPLIED, REMOVED):
                self._unpublished[change.shadow] = True
        return True

    def _end_asker(self) -> AdminClient:
        if self._admin is None:
            self._admin = admin(self.settings)  # kept: a collected client fails its pending futures (pitfall 22)
        return self._admin

    def _ask_end(self) -> int:
        """The topic's last stable offset as the broker gives it now, asked once (at most END_QUERY_S). Asked by an
        admin client of its own: the consumer's query (get_watermark_offsets) waits behind its pending fetch,
        which the broker holds up to fetch.wait.max.ms (500 ms measured) when the topic has nothing new."""
        tp = TopicPartition(self.settings.rules_topic, 0)
        asked = self._end_asker().list_offsets(
            {tp: OffsetSpec.latest()}, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=END_QUERY_S
        )[tp]
        try:
            return asked.result(timeout=END_QUERY_S).offset
        except TimeoutError as exc:  # a broker away, as the outage policy sees it
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"no answer in {END_QUERY_S:g} s")) from exc

    def _end(self) -> int | None:
        """Between batches: `_ask_end` without waiting out a failure (the poll then publishes nothing, and a later
        one asks again: a broker away costs a batch boundary END_QUERY_S at most)."""
        try:
            return self._ask_end()
        except KafkaException as exc:
            self.on_log(f"rules reader: the end of {self.settings.rules_topic} unknown ({exc}); will retry")
            # The admin asks the leader its metadata names, and does not refresh it on FENCED_LEADER_EPOCH or
            # NOT_LEADER: in a 3-broker soak every ask for 20 s after a broker restart failed so, and the
            # detector gave up starting. A fresh answer moves the next ask to the new leader.
            refresh_metadata(self._end_asker(), self.settings.rules_topic, END_QUERY_S)
            return None

    def _publish(self) -> None:
        """Rebuild the rule sets that changed: every record judged so far is in them."""
        if self._unpublished[False]:
            self.current = rule_set(self.rules, self.version, skip_kinds=self.skip_kinds)
            self.live_changed = True
        if self._unpublished[True]:
            self.shadow = (
                rule_set(self.shadow_rules, self.shadow_version, skip_kinds=self.skip_kinds)
                if self.shadow_rules
                else None
            )
            self.shadow_changed = True
        self._unpublished = {False: False, True: False}

    def judge(self, message) -> Change:
        """Apply one record of the topic, or refuse it (one log line, one dead letter); what became of it.
        A key `shadow/<id>` is judged against the shadow rules, by the same checks."""
        raw_key = message.key() or b""
        key = raw_key.decode("utf-8", "replace")
        shadow = key.startswith(SHADOW_PREFIX)
        rule_id = key[len(SHADOW_PREFIX) :] if shadow else key
        rules, what = (self.shadow_rules, "shadow rule") if shadow else (self.rules, "rule")
        self.live_records_read += not shadow
        position = str(message.offset() + 1)
        if message.value() is None:  # tombstone: the rule is removed
            if rules.pop(rule_id, None) is None:
                return Change(message, None, UNCHANGED, shadow=shadow)
            self._changed(shadow, position)
            self.on_log(f"{what} {printable(rule_id)} removed ({self._named(shadow)})")
            return Change(message, None, REMOVED, shadow=shadow)
        try:
            record = self.codec.decode(message.value())
        except DecodeError as error:
            return self._refuse(message, None, error, shadow)
        if (shadow_key(record.id) if shadow else record.id).encode() != raw_key:
            return self._refuse(
                message,
                record,
                DecodeError(INVALID_RULE, f"record key {_short(key)} is not the {what} id {_short(record.id)}"),
                shadow,
            )
        try:
            thresholds = rule_thresholds(record, self.settings)
        except ConfigError as error:
            return self._refuse(message, record, DecodeError(INVALID_RULE, f"{'shadow ' * shadow}{error}"), shadow)
        current = rules.get(record.id)
        if current is not None and record.version != current[0].version + 1:
            if record.version == current[0].version and same_content(record, current[0]):
                # the same version twice (two detectors seeding at once)
                return Change(message, record, UNCHANGED, shadow=shadow)
            return self._refuse(
                message,
                record,
                DecodeError(
                    STALE_VERSION,
                    f"{what} {record.id} v{record.version} is not the next version of v{current[0].version}, "
                    f"{'in the shadow set' if shadow else 'in force'}",
                ),
                shadow,
            )
        if current is None and len(rules) >= MAX_RULES:
            room = "`fraudstream rules shadow clear`" if shadow else "`fraudstream rules delete ID`"
            return self._refuse(
                message,
                record,
                DecodeError(
                    TOO_MANY_RULES,
                    f"{what} {record.id} would be {what} {len(rules) + 1} on the topic; at most "
                    f"{MAX_RULES} ({room} makes room)",
                ),
                shadow,
            )
        rules[record.id] = (record, thresholds)
        self._changed(shadow, position)
        return Change(message, record, APPLIED, shadow=shadow)

    def _changed(self, shadow: bool, position: str) -> None:
        if shadow:
            self.shadow_version = position
        else:
            self.version = position
        self.changes += 1

    def _named(self, shadow: bool) -> str:
        return f"shadow set {self.shadow_version}" if shadow else f"rule set {self.version}"

    def _refuse(self, message, record: Rule | None, error: DecodeError, shadow: bool = False) -> Change:
        reason = printable(error.reason)  # it may quote the record: never a control character in a log or header
        self.on_log(
            f"rule record at {message.topic()}[{message.partition()}]@{message.offset()} refused "
            f"({error.kind}): {reason}"
        )
        self.dead_letters.append(dead_letter(message, DecodeError(error.kind, reason)))
        self.refused += 1
        self.on_refused(error.kind)
        return Change(message, record, REFUSED, reason, shadow=shadow)

    def take_dead_letters(self) -> list[Decision]:
        letters, self.dead_letters = self.dead_letters, []
        return letters

    def close(self) -> None:
        super().close()
        self._admin = None


@dataclass(frozen=True)
class TopicRules:
    """The rules topic as a detector judges it: the live rules, the shadow rules (by plain id), every change."""

    live: dict[str, Rule]
    shadow: dict[str, Rule]
    changes: list[Change]


def read_rules(settings: Settings, codec: RulesCodec, *, timeout_s: float = 30.0) -> TopicRules:
    """Every record still on the rules topic, oldest first, judged as a detector judges it (one code path, so
    `fraudstream rules` numbers the next version as detectors will accept it); and the rules after them."""
    reader = RulesTopic(settings, codec=codec, on_log=lambda line: None)
    changes = [reader.judge(message) for message in read_messages(settings, timeout_s=timeout_s)]
    return TopicRules(
        {rule_id: record for rule_id, (record, _) in reader.rules.items()},
        {rule_id: record for rule_id, (record, _) in reader.shadow_rules.items()},
        changes,
    )


def read_changes(
    settings: Settings, codec: RulesCodec, *, timeout_s: float = 30.0
) -> tuple[dict[str, Rule], list[Change]]:
    """The live rules and every change still on the topic (read_rules)."""
    rules = read_rules(settings, codec, timeout_s=timeout_s)
    return rules.live, rules.changes


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
