"""What the view knows, pure: the pipeline's counts and the detectors' decisions scored against the labels."""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime

from fraudstream.records import FraudAlert, Label, Transaction

LATEST_ALERTS = 5
RULE_CHANGES_SHOWN = 3  # the latest rules-topic records in the live view


@dataclass(slots=True)
class PipelineCounts:
    produced: int = 0  # records appended to the input topic since the demo began
    backlog: int = 0  # input records the detectors' group had not processed when the demo began
    legit: int = 0
    fraud: int = 0
    dead_letter: int = 0

    @property
    def routed(self) -> int:
        return self.legit + self.fraud + self.dead_letter

    @property
    def expected(self) -> int:
        return self.backlog + self.produced

    @property
    def in_flight(self) -> int:
        return self.expected - self.routed

    @property
    def add_up(self) -> bool:
        return self.routed == self.expected


@dataclass(slots=True)
class DetectionScore:
    """The detectors' decisions joined with the generator's labels by transaction id.

    Either side may come first; a pair is scored once both are in, then forgotten.
    """

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    true_negatives: int = 0
    caught_by_scenario: Counter[str] = field(default_factory=Counter)
    missed_by_scenario: Counter[str] = field(default_factory=Counter)
    # Which rule caught what: rule -> scenario of the transactions it fired on ("legit": false positives).
    by_rule: dict[str, Counter[str]] = field(default_factory=dict)
    _decisions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rules fired (empty: legit), awaiting a label
    _labels: dict[str, tuple[bool, str]] = field(default_factory=dict)  # (is_fraud, scenario), awaiting a decision
    _recent_verdicts: OrderedDict[str, bool] = field(default_factory=OrderedDict)  # flagged id -> truly fraud

    def decided(self, transaction_id: str, flagged: bool, rules: tuple[str, ...] = ()) -> None:
        """A routing decision; `rules`: the FraudAlert's rules (a flagged record without any counts as one rule, "?")."""
        fired = (tuple(rules) or ("?",)) if flagged else ()
        label = self._labels.pop(transaction_id, None)
        if label is None:
            self._decisions[transaction_id] = fired
        else:
            self._score(transaction_id, fired, *label)

    def labelled(self, transaction_id: str, is_fraud: bool, scenario: str) -> None:
        fired = self._decisions.pop(transaction_id, None)
        if fired is None:
            self._labels[transaction_id] = (is_fraud, scenario)
        else:
            self._score(transaction_id, fired, is_fraud, scenario)

    def _score(self, transaction_id: str, fired: tuple[str, ...], is_fraud: bool, scenario: str) -> None:
        for rule in fired:
            self.by_rule.setdefault(rule, Counter())[scenario] += 1
        if fired:
            if is_fraud:
                self.true_positives += 1
                self.caught_by_scenario[scenario] += 1
            else:
                self.false_positives += 1
            self._recent_verdicts[transaction_id] = is_fraud
            if len(self._recent_verdicts) > 100:  # only the latest alerts on screen need one
                self._recent_verdicts.popitem(last=False)
        elif is_fraud:
            self.false_negatives += 1
            self.missed_by_scenario[scenario] += 1
        else:
            self.true_negatives += 1

    def recall_by_scenario(self) -> dict[str, tuple[int, int]]:
        """Scenario -> (caught, frauds labelled), most frauds first."""
        totals = self.caught_by_scenario + self.missed_by_scenario
        return {name: (self.caught_by_scenario[name], total) for name, total in totals.most_common()}

    def verdict(self, transaction_id: str) -> bool | None:
        """For a recent alert: True if it really was fraud, False for a false positive, None: no label yet."""
        return self._recent_verdicts.get(transaction_id)

    @property
    def awaiting_labels(self) -> int:
        return len(self._decisions)

    @property
    def precision(self) -> float | None:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        frauds = self.true_positives + self.false_negatives
        return self.true_positives / frauds if frauds else None


@dataclass(frozen=True, slots=True)
class AlertLine:
    transaction_id: str
    account_id: str
    amount_cents: int
    currency: str
    channel: str
    country: str
    rules: tuple[str, ...]
    detected_at: datetime


@dataclass(slots=True)
class DemoState:
    counts: PipelineCounts = field(default_factory=PipelineCounts)
    score: DetectionScore = field(default_factory=DetectionScore)
    latest_alerts: deque[AlertLine] = field(default_factory=lambda: deque(maxlen=LATEST_ALERTS))
    rules_fired: Counter[str] = field(default_factory=Counter)
    rule_changes: deque[str] = field(default_factory=lambda: deque(maxlen=RULE_CHANGES_SHOWN))
    undecodable_outputs: int = 0  # records on legit/fraud/labels the view could not read (should stay 0)
    traffic_started_at: float | None = None  # clock time of the first input record seen
    traffic_last_at: float | None = None

    def on_input(self, now: float) -> None:
        self.counts.produced += 1
        if self.traffic_started_at is None:
            self.traffic_started_at = now
        self.traffic_last_at = now

    @property
    def traffic_s(self) -> float:
        """From the first input record seen to the last: how long the generator really ran."""
        if self.traffic_started_at is None or self.traffic_last_at is None:
            return 0.0
        return self.traffic_last_at - self.traffic_started_at

    def on_legit(self, transaction: Transaction) -> None:
        self.counts.legit += 1
        self.score.decided(transaction.transaction_id, flagged=False)

    def on_fraud(self, alert: FraudAlert) -> None:
        self.counts.fraud += 1
        self.rules_fired.update(alert.rules)
        tx = alert.transaction
        self.latest_alerts.appendleft(
            AlertLine(
                tx.transaction_id,
                tx.account_id,
                tx.amount_cents,
                tx.currency,
                tx.channel,
                tx.country,
                alert.rules,
                alert.detected_at,
            )
        )
        self.score.decided(tx.transaction_id, flagged=True, rules=alert.rules)

    def on_dead_letter(self) -> None:
        self.counts.dead_letter += 1

    def on_label(self, label: Label) -> None:
        self.score.labelled(label.transaction_id, label.is_fraud, label.scenario)

    def on_rule(self, line: str) -> None:
        """A record on the rules topic: a rule changed (or was refused; detectors dead-letter those)."""
        self.rule_changes.appendleft(f"{datetime.now():%H:%M:%S}  {line}")
