"""Rules changed at runtime on the real broker: the project's producer and two detectors run while an
analyst changes the rules through `fraudstream rules`; a detector killed with -9 comes back with the
latest rules; an invalid rule written straight to the topic is dead-lettered and changes nothing.

Probe transactions ($600.00, in person, at home, at a grocery: only the amount rule can judge them) are
sent alongside the generator's stream, each stamped with the wall-clock time it was handed to the
producer. A probe handed over more than a second after a rule change was written is consumed after
that too, so it must be judged by the new rule set, on whichever detector owns its partition."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from fraudstream.consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_REASON, DLQ_TOPIC
from fraudstream.consumer.rules import COMPROMISED_TERMINAL, DEFAULT_RULES, LARGE_AMOUNT, RULE_NAMES
from fraudstream.consumer.rules_topic import (
    APPLIED,
    INVALID_RULE,
    MAX_RULE_VERSION,
    MAX_RULES,
    REFUSED,
    REMOVED,
    RULE_SET_HEADER,
    UNCHANGED,
    RulesCodec,
    read_changes,
    rule_thresholds,
    seed_records,
    write_records,
)
from fraudstream.errors import ConfigError
from fraudstream.records import Rule
from fraudstream.kafka import producer_config
from fraudstream.settings import Settings
from fraudstream.producer.loop import produce
from tests.integration.test_detector import RunningDetector, decode, encoder_for
from tests.support.detector_process import DetectorProcess
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until
from tests.support.rule_strategies import parameter_values
from tests.support.rules_cli import rules_command

PROBE_CENTS = 60_000  # under the default threshold ($900.00), over the lowered one
LOWERED_CENTS = 50_000
WITHIN_S = 1.0


class Probes:
    """A thread sending probe transactions at a steady rate; `sent` maps each id to when it was handed over."""

    def __init__(self, settings: Settings, rate: float = 100.0) -> None:
        self.settings, self.rate = settings, rate
        self.sent: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        encode = encoder_for(self.settings, self.settings.transactions_topic)
        producer = Producer(producer_config(self.settings))
        i = 0
        while not self.stop.is_set():
            tx = transaction(PROBE_CENTS, account=f"probe-{i % 30}", transaction_id=f"probe-{i}")
            producer.produce(self.settings.transactions_topic, encode(tx.to_dict()), tx.account_id.encode())
            self.sent[tx.transaction_id] = time.time()
            producer.poll(0)
            i += 1
            self.stop.wait(1 / self.rate)
        assert producer.flush(30) == 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def outputs(settings: Settings) -> dict[str, tuple[str, str, list]]:
    """transaction id -> (route, rule-set version that judged it, [(rule id, version) fired])."""
    found: dict[str, tuple[str, str, list]] = {}
    for message in read_topic(settings, settings.legit_topic):
        tid = decode(settings, message.value())["transaction_id"]
        assert tid not in found, f"{tid} routed twice"
        found[tid] = ("legit", dict(message.headers() or [])[RULE_SET_HEADER].decode(), [])
    for message in read_topic(settings, settings.fraud_topic):
        alert = decode(settings, message.value())
        tid = alert["transaction"]["transaction_id"]
        assert tid not in found, f"{tid} routed twice"
        found[tid] = ("fraud", alert["rule_set_version"], [(f["id"], f["version"]) for f in alert["fired"]])
    return found


def input_partitions(settings: Settings) -> dict[str, int]:
    return {
        decode(settings, m.value())["transaction_id"]: m.partition()
        for m in read_topic(settings, settings.transactions_topic)
    }


def rules_cli(settings: Settings, *args: str) -> None:
    assert rules_command(settings, *args) == 0


def large_amount_by_rule_set(settings: Settings) -> dict[str, tuple[int, bool, int] | None]:
    """Rule-set version -> large_amount's (version, enabled, threshold) in it, rebuilt from the rules topic alone."""
    rule_at: dict[str, tuple[int, bool, int] | None] = {}
    current = None
    for change in read_changes(settings, RulesCodec(settings))[1]:
        if change.message.key() == LARGE_AMOUNT.encode() and change.outcome in (APPLIED, REMOVED):
            record = change.record
            current = None if record is None else (record.version, record.enabled, record.parameters["threshold_cents"])
        rule_at[str(change.message.offset() + 1)] = current
    return rule_at


def expected_probe_decision(large_amount: tuple[int, bool, int] | None) -> tuple[str, list]:
    """(route, rules fired) for a probe: only large_amount can judge it."""
    if large_amount is not None and large_amount[1] and PROBE_CENTS > large_amount[2]:
        return "fraud", [(LARGE_AMOUNT, large_amount[0])]
    return "legit", []


def probes_after(probes: Probes, since: float) -> set[str]:
    return {tid for tid, at in list(probes.sent.items()) if at > since + WITHIN_S}


def judged_after(settings: Settings, probes: Probes, since: float, partitions_wanted: set[int]) -> bool:
    """Probes sent over a second after `since` are routed, in every wanted input partition."""
    late = probes_after(probes, since)
    routed = outputs(settings).keys() & late
    where = input_partitions(settings)
    return {where[tid] for tid in routed} >= partitions_wanted


@pytest.fixture
def two_detectors(pipeline: Settings):
    detectors = [RunningDetector(pipeline.replace(transactional_id=f"{pipeline.group_id}-{n}")) for n in (1, 2)]
    wait_until(
        lambda: (
            all(d.detector.tasks.partitions for d in detectors)
            and sum(len(d.detector.tasks.partitions) for d in detectors) == pipeline.partitions
        ),
        timeout_s=90,
        what="both detectors assigned",
    )
    yield detectors
    for d in detectors:
        d.stop()
        assert d.error is None, d.error


def partitions_of(detector: RunningDetector) -> set[int]:
    return detector.detector.tasks.partitions


def test_lowering_the_threshold_then_disabling_the_rule_reaches_both_detectors_within_a_second(
    pipeline: Settings, two_detectors, tmp_path
):
    stop_generator = threading.Event()
    generator = threading.Thread(
        target=produce, args=(pipeline,), kwargs=dict(rate=100, stop=stop_generator, seed=5), daemon=True
    )
    generator.start()
    probes = Probes(pipeline)
    try:
        started = time.time() - WITHIN_S
        wait_until(
            lambda: judged_after(pipeline, probes, started, set(range(pipeline.partitions))),
            timeout_s=60,
            what="probes routed under the seeded rules",
        )
        seeded = {d.detector.rules_topic.current.version for d in two_detectors}

        lower = tmp_path / "lower.toml"
        lower.write_text(f"[large_amount]\nthreshold_cents = {LOWERED_CENTS}\n")
        rules_cli(pipeline, "set", str(lower), "--author", "analyst", "--comment", "more large payments are fraud")
        lowered_at = time.time()
        wait_until(
            lambda: judged_after(pipeline, probes, lowered_at, set(range(pipeline.partitions))),
            timeout_s=60,
            what="probes routed after the threshold was lowered",
        )
        [lowered] = {d.detector.rules_topic.current.version for d in two_detectors}

        rules_cli(pipeline, "disable", LARGE_AMOUNT, "--comment", "too noisy")
        disabled_at = time.time()
        wait_until(
            lambda: judged_after(pipeline, probes, disabled_at, set(range(pipeline.partitions))),
            timeout_s=60,
            what="probes routed after the rule was disabled",
        )
    finally:
        probes.close()
        stop_generator.set()
        generator.join(60)

    wait_until(lambda: probes.sent.keys() <= outputs(pipeline).keys(), timeout_s=60, what="every probe routed")
    versions = [d.detector.rules_topic.current.version for d in two_detectors]
    assert versions[0] == versions[1] and versions[0] not in seeded | {lowered}
    found, where = outputs(pipeline), input_partitions(pipeline)
    # Every output, the generator's too, names the rule set that judged it.
    assert all(version for _, version, _ in found.values())
    # A probe sent around a change may be judged by either rule set; whichever judged it decided as it says.
    rule_at = large_amount_by_rule_set(pipeline)
    by_version: dict[str, set[str]] = defaultdict(set)
    for tid in probes.sent:
        route, version, fired = found[tid]
        assert (route, fired) == expected_probe_decision(rule_at[version]), (tid, found[tid], rule_at[version])
        by_version[version].add(tid)
    assert {lowered, versions[0]} <= by_version.keys() and by_version.keys() & seeded, "each rule set judged probes"
    assert rule_at[lowered] == (2, True, LOWERED_CENTS) and rule_at[versions[0]] == (3, False, LOWERED_CENTS)
    # Over a second after each change was written, only that rule set or a later one judged.
    assert all(int(found[tid][1]) >= int(lowered) for tid in probes_after(probes, lowered_at))
    assert {found[tid][1] for tid in probes_after(probes, disabled_at)} == {versions[0]}
    # Both detectors judged probes under each new rule set.
    for detector in two_detectors:
        mine = partitions_of(detector)
        assert any(where[tid] in mine for tid in by_version[lowered]), f"no lowered-threshold probe on {mine}"
        assert any(where[tid] in mine for tid in by_version[versions[0]]), f"no disabled-rule probe on {mine}"
    history = [
        c.record for c in read_changes(pipeline, RulesCodec(pipeline))[1] if c.message.key() == LARGE_AMOUNT.encode()
    ]
    assert [(r.version, r.enabled, r.parameters.get("threshold_cents")) for r in history][-2:] == [
        (2, True, LOWERED_CENTS),
        (3, False, LOWERED_CENTS),
    ]


def test_an_invalid_rule_written_to_the_topic_is_dead_lettered_once_and_the_previous_version_stays(
    pipeline: Settings, two_detectors
):
    probes = Probes(pipeline)
    try:
        before = time.time()
        wait_until(
            lambda: judged_after(pipeline, probes, before, set(range(pipeline.partitions))),
            timeout_s=60,
            what="probes routed under the seeded rules",
        )
        in_force = two_detectors[0].detector.rules_topic.current
        # Straight to the topic, past the CLI's check: a negative threshold, and a kind nobody knows.
        codec = RulesCodec(pipeline)
        now = datetime.now(UTC)
        write_records(
            pipeline,
            codec,
            [
                Rule(
                    id=LARGE_AMOUNT,
                    version=2,
                    kind=LARGE_AMOUNT,
                    parameters={"threshold_cents": -5},
                    enabled=True,
                    author="mallory",
                    comment="",
                    written_at=now,
                ),
                Rule(
                    id="mystery",
                    version=1,
                    kind="mystery_kind",
                    parameters={},
                    enabled=True,
                    author="mallory",
                    comment="",
                    written_at=now,
                ),
            ],
        )
        written_at = time.time()
        wait_until(
            lambda: len(read_topic(pipeline, pipeline.dlq_topic)) >= 2,
            timeout_s=30,
            what="the invalid rules dead-lettered",
        )
        wait_until(
            lambda: judged_after(pipeline, probes, written_at, set(range(pipeline.partitions))),
            timeout_s=60,
            what="probes routed after the invalid rules",
        )
    finally:
        probes.close()

    letters = read_topic(pipeline, pipeline.dlq_topic)
    headers = [dict(m.headers()) for m in letters]
    assert len(letters) == 2, "every detector reads every rule record, but only one dead-letters it"
    assert {h[DLQ_TOPIC] for h in headers} == {pipeline.rules_topic.encode()}
    assert {h[DLQ_KIND] for h in headers} == {INVALID_RULE.encode()}
    reasons = sorted(h[DLQ_REASON].decode() for h in headers)
    assert "large_amount.threshold_cents must be at least 0, not -5" in reasons[0]
    assert "unknown kind 'mystery_kind'" in reasons[1]
    for detector in two_detectors:
        assert detector.detector.rules_topic.current == in_force
    assert sum(d.detector.rules_dead_lettered for d in two_detectors) == 2
    found = outputs(pipeline)
    assert {found[tid][:2] for tid in probes_after(probes, written_at)} == {("legit", in_force.version)}


def test_a_detector_killed_with_minus_nine_comes_back_with_the_rules_changed_while_it_was_down(
    pipeline: Settings, tmp_path
):
    """Also the replay guarantee: every transaction is routed once, and its decision is the one the rule
    set it names gives, whether it was judged before the kill or re-read after it."""
    tid = f"{pipeline.group_id}-solo"
    detector = DetectorProcess(pipeline, tmp_path / "detector-1.log", transactional_id=tid)
    probes = Probes(pipeline, rate=200)
    try:
        first = time.time()
        wait_until(
            lambda: judged_after(pipeline, probes, first, set(range(pipeline.partitions))),
            timeout_s=90,
            what="probes routed before the kill",
        )
        detector.kill()
        lower = tmp_path / "lower.toml"
        lower.write_text(f"[large_amount]\nthreshold_cents = {LOWERED_CENTS}\n")
        rules_cli(pipeline, "set", str(lower))
        changed_at = time.time()
        detector = DetectorProcess(pipeline, tmp_path / "detector-2.log", transactional_id=tid)
        wait_until(
            lambda: judged_after(pipeline, probes, changed_at, set(range(pipeline.partitions))),
            timeout_s=90,
            what="probes routed after the restart",
        )
    finally:
        probes.close()
    wait_until(lambda: probes.sent.keys() <= outputs(pipeline).keys(), timeout_s=60, what="every probe routed")
    log = detector.stop_cleanly()

    found = outputs(pipeline)
    assert probes.sent.keys() <= found.keys()
    rule_at = large_amount_by_rule_set(pipeline)
    by_version = defaultdict(set)
    for tid in probes.sent:
        route, version, fired = found[tid]
        assert (route, fired) == expected_probe_decision(rule_at[version]), (tid, found[tid], rule_at[version])
        by_version[version].add(tid)
    assert len(by_version) == 2, "the probes were judged by the seeded rules, then by the lowered threshold"
    [latest] = {found[tid][1] for tid in probes_after(probes, changed_at)}
    assert all(found[tid] == ("fraud", latest, [(LARGE_AMOUNT, 2)]) for tid in probes_after(probes, changed_at))
    # Before judging anything, the restarted detector had read the change made while it was down.
    started_with = next(line for line in log.splitlines() if "(rule set " in line)
    assert f"(rule set {latest} of {pipeline.rules_topic})" in started_with, started_with


def test_the_rule_change_benchmark_runs_and_installs_changes(stack_settings: Settings):
    """Its short, real version: a few thousand records, a change every 0.2 s; no timed assertion. How many
    changes land while routing depends on the machine's speed; the one written first always does."""
    from benchmarks.rule_changes import run_side

    rate, _, amount_version = run_side(stack_settings, 20_000, 0.2)
    assert rate > 0 and amount_version >= 2


def test_a_rules_file_named_for_a_topic_that_already_holds_rules_is_reported_not_applied(pipeline: Settings, tmp_path):
    from fraudstream.consumer.rules import DEFAULT_RULES_FILE
    from fraudstream.consumer.rules_topic import RulesTopic

    first = RulesTopic(pipeline, on_log=lambda line: None)
    first.start(seed_from=DEFAULT_RULES_FILE)  # seeds the empty topic with the defaults
    first.close()
    lowered = tmp_path / "lowered.toml"
    lowered.write_text(f"[large_amount]\nthreshold_cents = {LOWERED_CENTS}\n")
    lines: list[str] = []
    second = RulesTopic(pipeline, on_log=lines.append)
    in_force = second.start(seed_from=lowered)
    second.close()

    assert in_force.thresholds[LARGE_AMOUNT]["threshold_cents"] == pipeline.fraud_threshold_cents  # the topic's
    [line] = [line for line in lines if "not applied" in line]
    assert str(lowered) in line and "differ from the file in large_amount" in line and "fraudstream rules set" in line


# ----- hostile rule records: generated (hypothesis), written to a real rules topic while one detector runs

POOL = (LARGE_AMOUNT, "la-2", "la-3")  # large_amount rules the generated changes touch (the probes judge them)
SENTINEL = "sentinel"  # a disabled velocity rule, changed last in every example: the detector has read that far
HOSTILE_TEXT = st.sampled_from(
    ["", "ok", "\x1b[2J\x1b[31mred", "x\r\nFORGED 2026-01-01 INFO all good", "\u202egnp.exe", "\x9b31m"]
) | st.text(max_size=12)
# Parameters of their kind, typed and around their bounds, or anything the schema can carry; for rules that
# judge every batch (removed before the final probes).
PARAMETERS = st.sampled_from([LARGE_AMOUNT, "card_testing"]).flatmap(
    lambda kind: st.tuples(
        st.just("params"),
        st.just(kind),
        st.fixed_dictionaries(
            {},
            optional={
                key: parameter_values(key)
                for key in [*DEFAULT_RULES[kind], "threshold_cents"]
                if key != "enabled" and (key != "threshold_cents" or kind == LARGE_AMOUNT)
            },
        ),
    )
)
ACTIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(POOL), st.integers(0, 10**12), st.booleans(), HOSTILE_TEXT),
    st.tuples(
        st.just("bad_threshold"), st.sampled_from(POOL), st.integers(-(2**63), -1) | st.integers(10**12 + 1, 2**63 - 1)
    ),
    st.tuples(st.just("bad_look_ahead"), st.sampled_from([math.inf, -math.inf, math.nan, 1e300, 3_600.5, -1.0])),
    st.tuples(st.just("version"), st.sampled_from(POOL), st.sampled_from([-(2**63), 0, 2**31, "same", "-1"])),
    st.tuples(st.just("version"), st.sampled_from(POOL), st.sampled_from(["+2", "+1000", MAX_RULE_VERSION, 2**63 - 1])),
    st.tuples(st.just("raw"), st.binary(min_size=1, max_size=40)),  # an empty value is no tombstone, but close
    st.tuples(st.just("bad_id"), HOSTILE_TEXT),
    st.tuples(st.just("key_mismatch"), st.sampled_from(POOL)),
    st.tuples(st.just("unknown_kind"), st.text(max_size=8)),
    st.tuples(st.just("long_comment"), st.sampled_from(POOL)),
    st.tuples(st.just("delete"), st.sampled_from(POOL)),
    st.tuples(st.just("flood"), st.integers(1, MAX_RULES + 10)),
    st.tuples(st.just("unflood")),  # delete every flood rule: room again
    PARAMETERS,
)


class RulesModel:
    """What a detector must make of each record, by the documented rules (docs/how-to/rules.md):
    rule id -> (version, kind, enabled, parameters), from the rules the detector seeds the topic with."""

    def __init__(self, settings: Settings) -> None:
        self.rules = {
            r.id: (r.version, r.kind, r.enabled, r.parameters)
            for r in seed_records(settings, settings.rules_file, author="model")
        }
        self.floods = 0

    def next_version(self, rule_id: str) -> int:
        return self.rules[rule_id][0] + 1 if rule_id in self.rules else 1

    def records(self, action: tuple) -> list[tuple[bytes, Rule | bytes | None, str]]:
        """(key, Rule or raw bytes or None for a tombstone, expected outcome) for one generated action."""
        name, *args = action
        now = datetime.now(UTC)

        def rule(
            rule_id: str,
            version: int,
            kind: str = LARGE_AMOUNT,
            parameters=None,
            enabled=True,
            comment="",
            author="hypothesis",
        ) -> Rule:
            return Rule(
                id=rule_id,
                version=version,
                kind=kind,
                parameters=parameters or {},
                enabled=enabled,
                author=author,
                comment=comment,
                written_at=now,
            )

        if name == "set":
            rule_id, threshold, enabled, text = args
            record = rule(
                rule_id,
                self.next_version(rule_id),
                parameters={"threshold_cents": threshold},
                enabled=enabled,
                comment=text,
                author=text,
            )
            return [(rule_id.encode(), record, self._applies(record))]
        if name == "bad_threshold":
            rule_id, threshold = args
            return [
                (
                    rule_id.encode(),
                    rule(rule_id, self.next_version(rule_id), parameters={"threshold_cents": threshold}),
                    REFUSED,
                )
            ]
        if name == "bad_look_ahead":
            record = rule(
                COMPROMISED_TERMINAL,
                self.next_version(COMPROMISED_TERMINAL),
                COMPROMISED_TERMINAL,
                {"look_ahead_s": args[0]},
            )
            return [(COMPROMISED_TERMINAL.encode(), record, REFUSED)]
        if name == "version":
            rule_id, which = args
            current = self.rules.get(rule_id, (0,))[0]
            version = {"+2": current + 2, "+1000": current + 1000, "same": current, "-1": current - 1}.get(which, which)
            record = rule(rule_id, version, parameters={"threshold_cents": 12_345}, comment="not the next version")
            if current and version == current and self.rules[rule_id][1:] == (LARGE_AMOUNT, True, record.parameters):
                return [(rule_id.encode(), record, UNCHANGED)]  # the same version and content again: a repeat
            return [
                (
                    rule_id.encode(),
                    record,
                    REFUSED if current or not 1 <= version <= MAX_RULE_VERSION else self._applies(record),
                )
            ]
        if name == "raw":
            return [
                (LARGE_AMOUNT.encode(), args[0], REFUSED)
            ]  # not a framed Avro Rule (nor a tombstone: b"" is a value)
        if name == "bad_id":
            rule_id = f"{args[0]}\x1b[0m id"  # a space and ESC: never a valid id
            return [(rule_id.encode(), rule(rule_id, 1, comment=args[0]), REFUSED)]
        if name == "key_mismatch":
            return [(b"someone-else", rule(args[0], self.next_version(args[0])), REFUSED)]
        if name == "unknown_kind":
            return [(b"odd", rule("odd", self.next_version("odd"), kind=f"no-such-{args[0]}"), REFUSED)]
        if name == "long_comment":
            return [(args[0].encode(), rule(args[0], self.next_version(args[0]), comment="c" * 1_001), REFUSED)]
        if name == "delete":
            return [(args[0].encode(), None, REMOVED if args[0] in self.rules else UNCHANGED)]
        if name == "params":
            kind, parameters = args
            record = rule(f"gen-{kind}", self.next_version(f"gen-{kind}"), kind, parameters)
            try:  # which values are in bounds is the unit tests' business; here: whatever passes, the detector runs
                rule_thresholds(record)
            except ConfigError:
                return [(record.id.encode(), record, REFUSED)]
            return [(record.id.encode(), record, self._applies(record))]
        if name == "unflood":
            return [(i.encode(), None, REMOVED) for i in self.rules if i.startswith(("flood-", "gen-"))]
        out = []  # flood: new rules, each one more on the topic until MAX_RULES
        for _ in range(args[0]):
            self.floods += 1
            record = rule(f"flood-{self.floods}", 1, "velocity", enabled=False)
            out.append((record.id.encode(), record, self._applies(record)))
        return out

    def _applies(self, record: Rule) -> str:
        """Model the outcome of a valid record, and apply it (the caller writes it next)."""
        if not 1 <= record.version <= MAX_RULE_VERSION:
            return REFUSED  # a rule at the last version is deleted and set again
        if record.id in self.rules:
            if record.version != self.rules[record.id][0] + 1:
                return REFUSED
        elif len(self.rules) >= MAX_RULES:
            return REFUSED
        self.rules[record.id] = (record.version, record.kind, record.enabled, record.parameters)
        return APPLIED

    def remove(self, rule_id: str) -> None:
        self.rules.pop(rule_id, None)

    def names(self) -> list[str]:
        order = {kind: i for i, kind in enumerate(RULE_NAMES)}
        return sorted(
            (i for i, (_, _, enabled, _) in self.rules.items() if enabled), key=lambda i: (order[self.rules[i][1]], i)
        )

    def thresholds(self) -> dict[str, int]:
        """The enabled large_amount rules' thresholds: all that can judge a probe."""
        return {
            i: p["threshold_cents"]
            for i, (_, kind, enabled, p) in self.rules.items()
            if enabled and kind == LARGE_AMOUNT
        }


class RulesWriter:
    """Writes records to the rules topic one by one, as they are (raw bytes too); their offsets."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.codec = settings, RulesCodec(settings)
        self.producer = Producer(producer_config(settings, **{"enable.idempotence": True}))

    def write(self, key: bytes, value: Rule | bytes | None) -> int:
        offsets: list[int] = []
        payload = self.codec.encode(value) if isinstance(value, Rule) else value
        self.producer.produce(
            self.settings.rules_topic, payload, key, on_delivery=lambda error, message: offsets.append(message.offset())
        )
        assert self.producer.flush(30) == 0 and offsets, "a rule record was not delivered"
        return offsets[0]


def test_generated_hostile_rule_records_never_stop_the_detector_and_each_is_refused_once(pipeline: Settings, tmp_path):
    """Good and bad rule records (out of range, non-finite, versions at the top of the range or jumping, floods,
    raw bytes, control characters) go to a real rules topic while one detector process runs with probes flowing.
    It stays up; each bad record is refused exactly once (one log line, one dead letter with its reason); the
    good ones are applied; and the probes are routed by the last good rule set."""
    detector = DetectorProcess(pipeline, tmp_path / "detector.log")
    model, writer = RulesModel(pipeline), RulesWriter(pipeline)
    expected: dict[int, str] = {}  # rules-topic offset -> applied | removed | unchanged | refused
    probes = None
    try:
        wait_until(
            lambda: f"(rule set {len(RULE_NAMES)} of {pipeline.rules_topic})" in detector.output(),
            timeout_s=90,
            what="the detector seeded the rules topic and started",
        )
        probes = Probes(pipeline, rate=20)  # held records and their release run under every rule set

        def write(records) -> int:
            offset = -1
            for key, value, outcome in records:
                offset = writer.write(key, value)
                expected[offset] = outcome
                if outcome == REMOVED:
                    model.remove(key.decode())
            return offset

        sentinel = Rule(
            id=SENTINEL,
            version=1,
            kind="velocity",
            parameters={},
            enabled=False,
            author="test",
            comment="",
            written_at=datetime.now(UTC),
        )
        assert model._applies(sentinel) == APPLIED
        write([(SENTINEL.encode(), sentinel, APPLIED)])

        def example(actions) -> None:
            """Write the records, then the next sentinel change; once the detector has read that far, the rules
            it says are in force are the model's."""
            for action in actions:
                write(model.records(action))
            version = model.next_version(SENTINEL)
            mark = Rule(
                id=SENTINEL,
                version=version,
                kind="velocity",
                parameters={"max_in_session": 3},
                enabled=False,
                author="test",
                comment="",
                written_at=datetime.now(UTC),
            )
            assert model._applies(mark) == APPLIED
            last = write([(SENTINEL.encode(), mark, APPLIED)])
            line = wait_until(
                lambda: _in_force_line(detector, last),
                timeout_s=30,
                what=f"the detector read the rules topic to offset {last}",
            )
            detector.assert_running()
            assert line == f"rules {', '.join(model.names())} now in force (rule set {last + 1})"

        examples = hypothesis_settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
        )
        examples(given(st.lists(ACTIONS, min_size=1, max_size=4))(example))()
        # Then parameter maps alone (a flood above can leave no room for a new rule): each rule that passes runs
        # on the probes' batches.
        write(model.records(("unflood",)))
        examples(given(st.lists(PARAMETERS, min_size=1, max_size=2))(example))()
        # The last good rule set, known whatever the examples left: two large_amount rules, no generated one.
        write(model.records(("unflood",)))
        for rule_id, threshold in ((LARGE_AMOUNT, 50_000), ("la-2", 70_000)):
            write(model.records(("delete", rule_id)))  # whatever version it reached: it starts again at 1
            assert expected[write(model.records(("set", rule_id, threshold, True, "final")))] == APPLIED
        wait_until(lambda: _in_force_line(detector, max(expected)), timeout_s=30, what="the final rules in force")
        final_version = str(max(expected) + 1)
        # Probes judged by the last good rule set: fraud exactly when an enabled large_amount rule is under them.
        thresholds = model.thresholds()
        amounts = sorted({a for t in thresholds.values() for a in (t, t + 1)} | {PROBE_CENTS})
        final = {}
        encode = encoder_for(pipeline, pipeline.transactions_topic)
        for n, amount in enumerate(amounts):
            tx = transaction(amount, account=f"final-{n}", transaction_id=f"final-{n}")
            final[tx.transaction_id] = amount
            produce_raw(pipeline, pipeline.transactions_topic, [(tx.account_id.encode(), encode(tx.to_dict()))])
        probes.close()
        wait_until(
            lambda: final.keys() | probes.sent.keys() <= outputs(pipeline).keys(),
            timeout_s=60,
            what="every probe routed",
        )
        detector.assert_running()
    finally:
        if probes is not None:
            probes.close()
        log = detector.stop_cleanly() if detector.process.poll() is None else detector.output()
        detector.ensure_ended()

    found = outputs(pipeline)  # asserts that no transaction was routed twice
    assert probes.sent.keys() <= found.keys(), "a probe sent while the rules changed was lost"
    for tid, amount in final.items():
        fired = sorted(i for i, t in thresholds.items() if amount > t)
        assert found[tid][0] == ("fraud" if fired else "legit") and found[tid][1] == final_version, (amount, found[tid])
        assert sorted(rule_id for rule_id, _ in found[tid][2]) == fired, (amount, found[tid], thresholds)
    # Each refused record: one log line and one dead letter, with its reason; nothing else refused.
    refused = {offset for offset, outcome in expected.items() if outcome == REFUSED}
    assert refused and set(expected.values()) >= {APPLIED, REFUSED}, "the examples held both good and bad records"
    lines = [line for line in log.splitlines() if " refused (" in line and f"{pipeline.rules_topic}[0]@" in line]
    assert sorted(int(line.split("]@")[1].split()[0]) for line in lines) == sorted(refused)
    letters = [dict(m.headers()) for m in read_topic(pipeline, pipeline.dlq_topic)]
    assert sorted(int(h[DLQ_OFFSET]) for h in letters) == sorted(refused)
    assert all(
        h[DLQ_TOPIC] == pipeline.rules_topic.encode() and h[DLQ_REASON].decode().isprintable() and h[DLQ_REASON]
        for h in letters
    )
    # No control character from a record reached the log: no escape sequence, no forged line.
    assert not any(c in log for c in ("\x1b", "\r", "\u202e", "\x9b")), "a control character reached the log"
    assert not any(line.startswith("FORGED") for line in log.splitlines())


def _in_force_line(detector: DetectorProcess, offset: int) -> str | None:
    """The detector's log line saying the rule set up to `offset` is in force (None: not yet)."""
    detector.assert_running()
    marker = f"now in force (rule set {offset + 1})"
    for line in detector.output().splitlines():
        if line.endswith(marker):
            return line[line.index("rules ") :]
    return None


def test_delete_and_history_through_the_cli_on_the_real_topic(pipeline: Settings, tmp_path, capsys):
    """`rules delete` writes a tombstone the detector's reader honours; `rules history` lists every change with
    when (the broker's clock), who (self-declared here: the local broker does not authenticate) and what, the
    refused ones marked; a version at the top of the range written straight to the topic wedges nothing."""
    from fraudstream.consumer.rules_topic import RulesTopic

    rules_file = tmp_path / "two.toml"
    rules_file.write_text(
        '[large_amount]\nthreshold_cents = 50000\n[la-2]\nkind = "large_amount"\nthreshold_cents = 70000\n'
    )
    rules_cli(pipeline, "set", str(rules_file), "--author", "ann", "--comment", "two\x1b[31m\nFORGED line")
    rules_cli(pipeline, "delete", "la-2", "--author", "bob", "--comment", "replaced")
    top = Rule(
        id=LARGE_AMOUNT,
        version=2**63 - 1,
        kind=LARGE_AMOUNT,
        parameters={"threshold_cents": 1},
        enabled=True,
        author="mallory",
        comment="",
        written_at=datetime.now(UTC),
    )
    write_records(pipeline, RulesCodec(pipeline), [top])
    rules_cli(pipeline, "set", str(rules_file), "--author", "ann")  # numbered as the detector judges the topic
    capsys.readouterr()
    rules_cli(pipeline, "history")
    lines = capsys.readouterr().out.splitlines()

    assert len(lines) == 6 and all(line.isprintable() for line in lines)
    assert all("(broker)" in line for line in lines), lines  # the rules topic's time is the broker's (LogAppendTime)
    assert lines[1].endswith(
        'ann (self-declared): la-2 v1 large_amount enabled {"threshold_cents": 70000}  # two\\x1b[31m\\nFORGED line'
    ), lines[1]
    assert lines[2].endswith("bob (self-declared): la-2 deleted  # replaced"), lines[2]
    assert (
        "large_amount v9223372036854775807" in lines[3]
        and "REFUSED: rule large_amount v9223372036854775807: versions run from 1 to 2147483647" in lines[3]
    ), lines[3]
    assert "large_amount v2 " in lines[4] and "la-2 v1 " in lines[5]  # la-2 starts again at 1 after its deletion
    reader = RulesTopic(pipeline, on_log=lambda line: None)
    try:
        in_force = reader.start()
    finally:
        reader.close()
    assert in_force.versions == {LARGE_AMOUNT: 2, "la-2": 1} and reader.refused == 1
