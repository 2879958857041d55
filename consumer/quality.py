"""Offline detection quality: the generator on a simulated clock, through features and rules, scored
against its labels. No Kafka: the same feature and rule code the detector runs, in the same batches.

    python -m fraudstream.consumer.quality                       # the demo's configuration (60 s at 1,000 tx/s, --speedup 3600)
    python -m fraudstream.consumer.quality --count 600000        # a long stream
    python -m fraudstream.consumer.quality --rules my.toml --json out.json
    python -m fraudstream.consumer.quality --terminal-look-ahead-s 120   # what a look-ahead would catch

Per scenario: recall, and which rule caught what; overall: precision. Two rule sets are scored in
the same pass: the per-card rules alone, and with the per-terminal rule (what the stateful detector
runs: its terminal window, consumer/terminal.py, fed here as one partition in offset order). Also per scenario, the first transaction
of each episode: the one a detector that never looks ahead in event time has the least to go on.

The terminal rule's look-ahead (`compromised_terminal.look_ahead_s`, 120 s by default) is decided as the
detector decides it: every record at once with the window up to its own event time, except the records it
holds (decided legit, in person, far from home), which are decided again with the window's
[t - 10 min, t + look-ahead] once the window holds records past that. `--terminal-look-ahead-s L` scores
another look-ahead (0: none, nothing held).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Iterator
from itertools import count as count_from
from itertools import islice
from pathlib import Path

import numpy as np

from fraudstream.consumer.features import PROFILE_DTYPE, TERMINAL_WINDOW_MS, SESSION_GAP_MS, TxColumns, card_features
from fraudstream.consumer.rules import COMPROMISED_TERMINAL as COMPROMISED_TERMINAL_RULE
from fraudstream.consumer.rules import TERMINAL_RULES, RuleSet, load_rules
from fraudstream.consumer.terminal import TerminalWindow
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.errors import FraudstreamError
from fraudstream.producer.generator import (
    CARD_TESTING,
    COMPROMISED_TERMINAL,
    FAR_FROM_HOME,
    FRAUD_SCENARIOS,
    LEGIT,
    Generator,
    Pair,
)
from fraudstream.producer.loop import MAX_BATCH, WAKE_S

# The demo's configuration: 60 s at 1,000 transactions per wall-clock second, event time 3,600x faster.
DEMO_SECONDS = 60
DEMO_RATE = 1_000.0
DEMO_SPEEDUP = 3_600.0
BATCH = 2_000
START_MS = 1_767_600_000_000  # 2026-01-05 08:00 UTC: a fixed start, so runs repeat exactly
# Transactions of one episode: same card (card testing, far from home) or same terminal (compromised
# terminal) with no more than this between them; the first of each is "first of episode".
EPISODE_GAP_MS = {CARD_TESTING: SESSION_GAP_MS, FAR_FROM_HOME: SESSION_GAP_MS, COMPROMISED_TERMINAL: TERMINAL_WINDOW_MS}


@dataclass
class Score:
    """Detection of one rule set against the labels."""

    total: Counter = field(default_factory=Counter)  # scenario -> transactions
    caught: Counter = field(default_factory=Counter)  # scenario -> flagged
    false_positives: int = 0
    first_total: Counter = field(default_factory=Counter)  # scenario -> first transactions of episodes
    first_caught: Counter = field(default_factory=Counter)
    by_rule: dict[str, Counter] = field(default_factory=dict)  # rule -> scenario (or legit) -> fired

    @property
    def true_positives(self) -> int:
        return sum(self.caught[s] for s in FRAUD_SCENARIOS)

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else 0.0

    def recall(self, scenario: str | None = None) -> float:
        if scenario is None:
            total = sum(self.total[s] for s in FRAUD_SCENARIOS)
            return self.true_positives / total if total else 0.0
        return self.caught[scenario] / self.total[scenario] if self.total[scenario] else 0.0

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "recall": self.recall(),
            "false_positives": self.false_positives,
            "scenarios": {
                s: {
                    "transactions": self.total[s],
                    "caught": self.caught[s],
                    "recall": self.recall(s),
                    "first_of_episode": self.first_total[s],
                    "first_caught": self.first_caught[s],
                }
                for s in FRAUD_SCENARIOS
            },
            "rules": {rule: dict(counts) for rule, counts in self.by_rule.items()},
        }


@dataclass
class QualityReport:
    count: int
    rate: float
    speedup: float
    seed: int
    batch: int
    rules_version: str
    per_card: Score
    with_terminal: Score
    event_span_s: float = 0.0
    terminal_look_ahead_s: float = 0.0
    held: int = 0  # records held for the look-ahead (decided once the window reaches past them)

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "rate": self.rate,
            "speedup": self.speedup,
            "seed": self.seed,
            "batch": self.batch,
            "rules_version": self.rules_version,
            "event_span_s": self.event_span_s,
            "terminal_look_ahead_s": self.terminal_look_ahead_s,
            "held": self.held,
            "per_card_rules": self.per_card.as_dict(),
            "with_terminal_rule": self.with_terminal.as_dict(),
        }


def evaluate(
    *,
    count: int = int(DEMO_SECONDS * DEMO_RATE),
    rate: float = DEMO_RATE,
    speedup: float = DEMO_SPEEDUP,
    seed: int = 42,
    batch: int = BATCH,
    rules: RuleSet | None = None,
    start_ms: int = START_MS,
    accounts: int | None = None,
    terminal_look_ahead_s: float | None = None,
) -> QualityReport:
    """Run `count` transactions of the generator through the features and rules in batches of `batch`,
    and score them against the labels. Event time as `produce --rate R --speedup N` stamps it: the
    produce loop's wake-ups (rate x WAKE_S transactions each, every WAKE_S of wall time) share one
    event time, N x WAKE_S apart."""
    if count < 1 or rate <= 0 or speedup <= 0 or batch < 1:
        raise FraudstreamError("count, rate, speedup and batch must be positive")
    rules = rules or load_rules(None)
    if terminal_look_ahead_s is not None:
        if terminal_look_ahead_s < 0:
            raise FraudstreamError("the terminal look-ahead must be 0 or more seconds")
        rules = rules.with_look_ahead(terminal_look_ahead_s)
    ahead_ms = rules.look_ahead_ms
    from fraudstream.producer.generator import build_population

    population = build_population(seed, accounts=accounts) if accounts is not None else None
    stream = _as_produced(Generator(seed, population=population), start_ms, rate, speedup)
    cards, terminals = KeyedTable(PROFILE_DTYPE), TerminalWindow()
    card_rows = np.array([n not in TERMINAL_RULES for n in rules.names])
    per_card, with_terminal = Score(), Score()
    episode_last: dict[tuple[str, str], int] = {}
    last_ms = start_ms
    done = 0
    waiting: list[tuple[list[Pair], TxColumns, dict]] = []  # batches whose look-ahead the window does not hold yet

    held_total = 0

    def decide(pairs: list[Pair], tx: TxColumns, features: dict) -> None:
        nonlocal held_total
        features["terminal_cards"] = terminals.other_cards(tx.terminal_hash, tx.card_hash, tx.event_time_ms)
        fired = rules.evaluate(tx, features)
        if ahead_ms and COMPROMISED_TERMINAL_RULE in rules.names:
            # The held records, decided again with the look-ahead (the detector's release, consumer/held.py).
            is_fraud = np.asarray(fired.any(axis=0))  # fired is (rules, rows): one flag per row, an array
            held = np.flatnonzero(rules.to_hold(tx, features, is_fraud))
            held_total += len(held)
            ahead = terminals.other_cards(
                tx.terminal_hash[held], tx.card_hash[held], tx.event_time_ms[held], ahead_ms=ahead_ms
            )
            fired[rules.names.index(COMPROMISED_TERMINAL_RULE), held] = rules.fires_on_release(
                tx.channel[held], features["dist_home_km"][held], ahead
            )
        scenarios = [label.scenario for _, label in pairs]
        first = _firsts(pairs, tx, episode_last)
        _score(per_card, rules, fired, card_rows, scenarios, first)
        _score(with_terminal, rules, fired, np.ones(len(rules.names), dtype=bool), scenarios, first)

    while done < count:
        pairs = list(islice(stream, min(batch, count - done)))
        done += len(pairs)
        tx = TxColumns.from_records([t.to_dict() for t, _ in pairs])
        # The detector's terminal window, as one input partition read in offset order.
        terminals.add(
            np.zeros(len(tx), np.int64),
            np.arange(done - len(tx), done),
            tx.terminal_hash,
            tx.card_hash,
            tx.event_time_ms,
        )
        waiting.append((pairs, tx, card_features(cards, tx)))
        last_ms = int(tx.event_time_ms[-1])
        # Without a look-ahead, at once (the window holds the batch itself); with one, once a later record is
        # past the batch's latest event time + the look-ahead (or the stream ended).
        while waiting and (
            not ahead_ms or int(waiting[0][1].event_time_ms.max()) + ahead_ms < last_ms or done >= count
        ):
            decide(*waiting.pop(0))
    return QualityReport(
        count=count,
        rate=rate,
        speedup=speedup,
        seed=seed,
        batch=batch,
        rules_version=rules.version,
        per_card=per_card,
        with_terminal=with_terminal,
        event_span_s=(last_ms - start_ms) / 1000.0,
        terminal_look_ahead_s=ahead_ms / 1000,
        held=held_total,
    )


def _as_produced(generator: Generator, start_ms: int, rate: float, speedup: float) -> Iterator[Pair]:
    """The pairs the produce loop would send, paced at `rate` on a clock `speedup` times faster."""
    per_wake = max(1, min(MAX_BATCH, int(rate * WAKE_S)))
    for wake in count_from(1):
        now_ms = start_ms + int(wake * per_wake / rate * 1000.0 * speedup)
        yield from generator.next_batch(per_wake, now_ms)


def _firsts(pairs: list, tx: TxColumns, last: dict[tuple[str, str], int]) -> list[bool]:
    """Whether each labelled fraud transaction opens an episode (see EPISODE_GAP_MS)."""
    out = []
    for i, (transaction, label) in enumerate(pairs):
        gap = EPISODE_GAP_MS.get(label.scenario)
        if gap is None:
            out.append(label.scenario != LEGIT)  # single-transaction scenarios: every one is a first
            continue
        key = (
            label.scenario,
            transaction.terminal_id if label.scenario == COMPROMISED_TERMINAL else transaction.card_id,
        )
        t = int(tx.event_time_ms[i])
        previous = last.get(key)
        out.append(previous is None or t - previous > gap)
        last[key] = t
    return out


def _score(
    score: Score, rules: RuleSet, fired: np.ndarray, rows: np.ndarray, scenarios: list[str], first: list[bool]
) -> None:
    used = fired[rows]
    names = [n for n, keep in zip(rules.names, rows, strict=True) if keep]
    flagged = used.any(axis=0)
    for name, column in zip(names, used, strict=True):
        counts = score.by_rule.setdefault(name, Counter())
        counts.update(scenarios[i] for i in np.flatnonzero(column))
    for i, scenario in enumerate(scenarios):
        if scenario == LEGIT:
            score.total[LEGIT] += 1
            score.false_positives += bool(flagged[i])
            continue
        score.total[scenario] += 1
        score.caught[scenario] += bool(flagged[i])
        if first[i]:
            score.first_total[scenario] += 1
            score.first_caught[scenario] += bool(flagged[i])


def report_lines(report: QualityReport) -> list[str]:
    lines = [
        f"{report.count:,} transactions, seed {report.seed}, {report.rate:g} tx/s x speedup {report.speedup:g} "
        f"({report.event_span_s / 3600:.1f} h of event time), batches of {report.batch:,}; "
        f"rules version {report.rules_version}"
        + (
            f"; terminal look-ahead {report.terminal_look_ahead_s:g} s, {report.held:,} held "
            f"({100 * report.held / report.count:.1f}%)"
            if report.terminal_look_ahead_s
            else ""
        )
    ]
    for title, score in (
        ("per-card rules alone", report.per_card),
        ("with the per-terminal rule (the detector's rule set)", report.with_terminal),
    ):
        lines.append("")
        lines.append(
            f"{title}: precision {100 * score.precision:.1f}% ({score.true_positives:,} caught, "
            f"{score.false_positives:,} false positives), recall {100 * score.recall():.1f}%"
        )
        lines.append(f"  {'scenario':<22}{'recall':>8}{'caught':>14}{'first of episode':>20}")
        for s in FRAUD_SCENARIOS:
            lines.append(
                f"  {s:<22}{100 * score.recall(s):>7.1f}%{score.caught[s]:>7,}/{score.total[s]:<6,}"
                f"{score.first_caught[s]:>12,}/{score.first_total[s]:<6,}"
            )
        lines.append("  which rule caught what (a transaction may fire several):")
        for rule, counts in score.by_rule.items():
            parts = [f"{s} {counts[s]:,}" for s in FRAUD_SCENARIOS if counts[s]]
            lines.append(f"    {rule:<22}{', '.join(parts) or '-'}; false positives {counts[LEGIT]:,}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fraudstream.consumer.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=int(DEMO_SECONDS * DEMO_RATE), help="transactions [60000]")
    parser.add_argument("--rate", type=float, default=DEMO_RATE, help="transactions per wall-clock second [1000]")
    parser.add_argument("--speedup", type=float, default=DEMO_SPEEDUP, help="event time per wall-clock time [3600]")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rules", type=Path, help="rules file (TOML); default: the documented defaults")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--terminal-look-ahead-s",
        type=float,
        help="the terminal rule's look-ahead in seconds of event time, in place of the rules' "
        "look_ahead_s (0: hold nothing)",
    )
    args = parser.parse_args(argv)
    try:
        report = evaluate(
            count=args.count,
            rate=args.rate,
            speedup=args.speedup,
            seed=args.seed,
            batch=args.batch,
            rules=load_rules(args.rules),
            terminal_look_ahead_s=args.terminal_look_ahead_s,
        )
    except FraudstreamError as exc:
        print(f"fraudstream.consumer.quality: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(report)))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
