"""`fraudstream backtest`: candidate rules over past transactions, beside the live rules, before promoting them.

    fraudstream backtest --rules CANDIDATE.toml --from 2026-01-05 --to 2026-01-11 [--baseline FILE]
                         [--model FILE] [--topic T] [--output backtest.json] [--fidelity]

The input topic is replayed through the detector's own decide code (consumer/backtest.py: the StatefulDecider
with its state in memory, built from the history before the window), once per rule set: the candidate (the
rules topic's rules with CANDIDATE.toml applied as `fraudstream rules set` would apply it) and the baseline
(the rules topic's rules in force, or those with --baseline FILE applied). Nothing is written to Kafka.

Per rule set, per day and overall (days of the transactions' event time, UTC): alerts, precision, recall per
fraud scenario, AUC ROC / AP / Card Precision@K (fraudstream evaluate's metrics, on its test set: labelled
transactions, cards already known compromised left out, labels counted after their delay); the analyst
workload (alerts per day); and the alerts only one side raises, counted, with the frauds among them, and a
sample with the rules that fired. `--fidelity` also compares the baseline's decision for every transaction
with the one the live detector wrote (route and fired rules), and names each difference.

A JSON report, and a PNG next to it (alerts per day and precision per day, both rule sets) when matplotlib is
installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections import Counter
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.errors import ConfigError, FraudstreamError
from fraudstream.evaluate import (
    DAY_MS,
    DEFAULT_TOP_K,
    Routed,
    _Schemas,
    _day_number,
    _day_text,
    _f,
    evaluate,
    parse_score,
    read_labels,
    read_to_end,
)
from fraudstream.settings import Settings

CANDIDATE, BASELINE = "candidate", "baseline"
SAMPLE = 10  # alerts shown per side among those only it raises
FIDELITY_LISTED = 100  # differences named one by one in the report (all are counted)
LEGIT_ROUTE, FRAUD_ROUTE, DEAD_ROUTE = 0, 1, 2  # consumer.decide.Route values
MODEL_RULE = "model"


class NothingToBacktest(FraudstreamError):
    """No transaction in the window: nothing can be measured."""


# ---------------------------------------------------------------- the rule sets
@dataclasses.dataclass(frozen=True)
class RuleSets:
    candidate: Any  # TopicRuleSet
    baseline: Any
    baseline_source: str  # where the baseline came from, for the report


def load_rule_sets(settings: Settings, candidate_file: Path, baseline_file: Path | None) -> RuleSets:
    """The candidate and the baseline as a detector would run them. A file is applied to the rules topic's
    rules as `fraudstream rules set FILE` applies it (its checks, one ConfigError line on the first problem)."""
    from fraudstream.consumer.rules_topic import (
        RulesCodec,
        RulesTopic,
        read_messages,
        rule_set,
        rule_thresholds,
        seed_records,
    )
    from fraudstream.rules_cli import _records_from_file

    codec = RulesCodec(settings)
    reader = RulesTopic(settings, codec=codec, on_log=lambda line: None)
    for message in read_messages(settings):
        reader.judge(message)
    live = dict(reader.rules)
    version, source = reader.version, f"rules topic {settings.rules_topic} (rule set {reader.version})"
    if not live:  # an empty topic: a detector would seed it from its rules file
        live = {
            r.id: (r, rule_thresholds(r, settings))
            for r in seed_records(settings, settings.rules_file, author="backtest")
        }
        version, source = "file", f"rules file {settings.rules_file} (the rules topic is empty)"

    def applied(path: Path, name: str):
        current = {rule_id: record for rule_id, (record, _) in live.items()}
        merged = dict(live)
        for record in _records_from_file(path, settings, current, author="backtest", comment=""):
            merged[record.id] = (record, rule_thresholds(record, settings))
        return rule_set(merged, name)

    candidate = applied(candidate_file, CANDIDATE)
    if baseline_file is not None:
        return RuleSets(candidate, applied(baseline_file, BASELINE), f"{source} with {baseline_file} applied")
    return RuleSets(candidate, rule_set(live, version), source)


def describe(rules) -> dict[str, Any]:
    return {
        "version": rules.version,
        "rules": {
            name: {
                "kind": getattr(rules, "kinds", {}).get(name, name),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in rules.thresholds[name].items()},
            }
            for name in rules.names
        },
    }


# ---------------------------------------------------------------- the report (pure)
def side_routed(result, side: str) -> tuple[Routed, np.ndarray]:
    """The side's routed transactions (dead letters left out) as evaluate takes them, and their rows in `result`."""
    route = result.sides[side]["route"]
    rows = np.flatnonzero((route == LEGIT_ROUTE) | (route == FRAUD_ROUTE))
    routed = Routed(
        transaction_id=result.transaction_id[rows].tolist(),
        card_id=result.card_id[rows].tolist(),
        event_ms=result.event_ms[rows].tolist(),
        flagged=(route[rows] == FRAUD_ROUTE).tolist(),
        score=result.sides[side]["score"][rows].tolist(),
    )
    return routed, rows


def window_mask(event_ms: np.ndarray, first_day: date | None, last_day: date | None) -> np.ndarray:
    day = event_ms // DAY_MS
    mask = event_ms >= 0
    if first_day is not None:
        mask &= day >= _day_number(first_day)
    if last_day is not None:
        mask &= day <= _day_number(last_day)
    return mask


def build_report(
    result,
    labels: dict[str, tuple[bool, str]],
    *,
    first_day: date | None,
    last_day: date | None,
    top_k: int = DEFAULT_TOP_K,
    label_delay_days: float = 7.0,
    sample: int = SAMPLE,
    names: tuple[str, str] = (CANDIDATE, BASELINE),
) -> tuple[dict[str, Any], list[str]]:
    """The backtest's figures (JSON-ready) from a replay's decisions and the labels; and its warnings."""
    warnings: list[str] = []
    in_window = window_mask(result.event_ms, first_day, last_day)
    decided = int(in_window.sum())
    days_present = np.unique(result.event_ms[in_window] // DAY_MS)
    if not decided:
        span = result.event_ms[result.event_ms >= 0]
        warnings.append(
            f"no transactions between {first_day or 'the first day'} and {last_day or 'the last day'} on "
            f"{result.topic}"
            + (
                f" (it holds {len(span):,} from {_day_text(int(span.min() // DAY_MS))} to "
                f"{_day_text(int(span.max() // DAY_MS))})"
                if len(span)
                else " (it is empty)"
            )
        )
    if not labels:
        warnings.append(
            f"no labels on {result.topic}.labels: precision, recall and the ranking metrics need them; "
            "alerts and workload only"
        )
    report: dict[str, Any] = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "topic": result.topic,
        "window": {
            "from": _day_text(int(days_present.min())) if len(days_present) else None,
            "to": _day_text(int(days_present.max())) if len(days_present) else None,
        },
        "read": result.read,
        "in_window": decided,
        "labels": len(labels),
        "top_k": top_k,
        "speed": {
            "records": result.read,
            "decide_s": round(result.decide_s, 3),
            "decode_s": round(result.decode_s, 3),
            "total_s": round(result.read_s, 3),
            "cpu_s": round(result.cpu_s, 3),
            "records_per_decide_s": round(result.read / result.decide_s) if result.decide_s else None,
            "model_batches_scored": result.model_scored,
            "model_batches_shared": result.model_shared,  # scores one rule set's decider reused from another's
            "feature_batches_computed": result.features_computed,
            "feature_batches_shared": result.features_shared,  # card and terminal features, likewise
        },
        "sides": {},
        "workload": {},
        "differences": {},
    }
    flagged: dict[str, np.ndarray] = {}
    for name in names:
        route = result.sides[name]["route"]
        flagged[name] = route == FRAUD_ROUTE
        routed, rows = side_routed(result, name)
        keep = in_window[rows]
        if labels and routed.transaction_id:
            figures, _ = evaluate(
                routed, labels, top_k=top_k, label_delay_days=label_delay_days, first_day=first_day, last_day=last_day
            )
            side = {
                k: figures[k]
                for k in ("score_source", "labelled", "known_compromised_left_out", "evaluated", "overall", "days")
            }
        else:
            side = {"overall": None, "days": []}
        side["rules"] = describe(result.rule_sets[name])
        side["alerts"] = int((flagged[name] & in_window).sum())
        side["dead_letters"] = int(((route == DEAD_ROUTE) & in_window).sum())
        side["held"] = result.held.get(name, 0)  # the whole replay's, the history before the window included
        side["held_then_alerted"] = result.held_then_alerted.get(name, 0)
        report["sides"][name] = side
        day = result.event_ms[rows][keep] // DAY_MS
        alerts_per_day = Counter((day[np.asarray(routed.flagged, dtype=bool)[keep]]).tolist())
        report["workload"][name] = {
            "per_day": {_day_text(int(d)): int(alerts_per_day.get(int(d), 0)) for d in days_present.tolist()},
            "mean_per_day": (sum(alerts_per_day.values()) / len(days_present) if len(days_present) else None),
        }
    both_routed = (
        in_window
        & np.isin(result.sides[names[0]]["route"], (LEGIT_ROUTE, FRAUD_ROUTE))
        & np.isin(result.sides[names[1]]["route"], (LEGIT_ROUTE, FRAUD_ROUTE))
    )
    for mine, other in (names, names[::-1]):
        only = np.flatnonzero(both_routed & flagged[mine] & ~flagged[other])
        label_of = [labels.get(tx) for tx in result.transaction_id[only].tolist()]
        frauds = [i for i, label in zip(only.tolist(), label_of, strict=True) if label is not None and label[0]]
        by_scenario = Counter(labels[result.transaction_id[i]][1] for i in frauds)
        fired = result.fired[mine]
        shown = []
        for i in only[:sample].tolist():
            label = labels.get(result.transaction_id[i])
            shown.append(
                {
                    "transaction_id": result.transaction_id[i],
                    "card_id": result.card_id[i],
                    "event_time": datetime.fromtimestamp(int(result.event_ms[i]) / 1000, timezone.utc).isoformat(
                        timespec="milliseconds"
                    ),
                    "label": None if label is None else (label[1] if label[0] else "legit"),
                    "rules": list(fired.get(int(result.position[i]), ())),
                }
            )
        report["differences"][f"only_{mine}"] = {
            "alerts": len(only),
            "frauds": len(frauds),
            "frauds_by_scenario": dict(by_scenario),
            "unlabelled": sum(label is None for label in label_of),
            "sample": shown,
        }
    # The frauds the candidate lets through that the baseline caught, in the words of a fraud team.
    report["differences"]["missed_frauds"] = report["differences"][f"only_{names[1]}"]["frauds"]
    report["warnings"] = warnings
    return report, warnings


# ---------------------------------------------------------------- fidelity: the baseline against the live outputs
LiveOutput = tuple[bool, tuple[str, ...], str, float, str]


def read_outputs(settings: Settings) -> dict[str, LiveOutput]:
    """What the live detector wrote: transaction id -> (routed to fraud, fired rules, rule-set version, score,
    the quiet partitions a held record's release did not wait for: empty for most)."""
    from fraudstream.consumer.held import RELEASED_EARLY_HEADER
    from fraudstream.consumer.rules_topic import RULE_SET_HEADER
    from fraudstream.registry import Registry

    schemas = _Schemas(Registry(settings))
    out: dict[str, LiveOutput] = {}

    def released_early(message) -> str:
        return (dict(message.headers() or ()).get(RELEASED_EARLY_HEADER) or b"").decode("utf-8", "replace")

    def on_legit(message) -> None:
        record = schemas.decode(message.value())
        version = dict(message.headers() or ()).get(RULE_SET_HEADER) or b""
        out[record["transaction_id"]] = (
            False,
            (),
            version.decode("utf-8", "replace"),
            parse_score(message.headers()),
            released_early(message),
        )

    def on_fraud(message) -> None:
        alert = schemas.decode(message.value())
        score = alert.get("score")
        out[alert["transaction"]["transaction_id"]] = (
            True,
            tuple(alert["rules"]),
            alert.get("rule_set_version") or "",
            math.nan if score is None else float(score),
            released_early(message),
        )

    read_to_end(settings, settings.legit_topic, on_legit)
    read_to_end(settings, settings.fraud_topic, on_fraud)
    return out


def fidelity(
    result,
    outputs: dict[str, LiveOutput],
    *,
    side: str,
    in_window: np.ndarray,
    listed: int = FIDELITY_LISTED,
) -> dict[str, Any]:
    """The baseline's decision for each transaction of the window beside the one the detector wrote: the same
    route and the same fired rules, or a difference named with its likely cause; and, of the same decisions, the
    same risk score (the legit header's 6 significant digits)."""
    route = result.sides[side]["route"]
    version = result.rule_sets[side].version
    fired = result.fired[side]
    compared = same = not_routed = other_version = scores_same = 0
    score = result.sides[side]["score"]
    differences: list[dict[str, Any]] = []
    causes: Counter = Counter()
    for i in np.flatnonzero(in_window & np.isin(route, (LEGIT_ROUTE, FRAUD_ROUTE))).tolist():
        tx = result.transaction_id[i]
        live = outputs.get(tx)
        if live is None:
            not_routed += 1
            continue
        if live[2] != version:
            other_version += 1
            continue
        compared += 1
        ours = (bool(route[i] == FRAUD_ROUTE), tuple(fired.get(int(result.position[i]), ())))
        if ours == live[:2]:
            same += 1
            scores_same += math.isclose(float(score[i]), live[3], rel_tol=1e-5, abs_tol=1e-9)
            continue
        rules = set(ours[1]) | set(live[1])
        cause = (
            f"released early: the live detector let this held record go before partitions {live[4]} were read "
            "past its look-ahead (they were quiet)"
            if live[4]
            else "model score (labels read late by the live detector)"
            if MODEL_RULE in rules
            else "unexplained"
        )
        causes[cause] += 1
        if len(differences) < listed:
            differences.append(
                {
                    "transaction_id": tx,
                    "live": {"fraud": live[0], "rules": list(live[1])},
                    "backtest": {"fraud": ours[0], "rules": list(ours[1])},
                    "cause": cause,
                }
            )
    return {
        "rule_set": version,
        "compared": compared,
        "same": same,
        "same_score": scores_same,
        "agreement": same / compared if compared else None,
        "different": compared - same,
        "causes": dict(causes),
        "differences": differences,
        "not_routed_live": not_routed,
        "decided_live_under_another_rule_set": other_version,
    }


# ---------------------------------------------------------------- rendering
def render(report: dict[str, Any], names: tuple[str, str] = (CANDIDATE, BASELINE)) -> str:
    sides = report["sides"]
    speed = report["speed"]
    lines = [
        f"backtest of {report['topic']}: {report['in_window']:,} transactions from {report['window']['from'] or '-'} "
        f"to {report['window']['to'] or '-'} ({report['read']:,} read, {report['labels']:,} labels; "
        f"decided in {speed['decide_s']:.1f} s, {speed['records_per_decide_s'] or 0:,} records/s per rule set pair)",
        "",
    ]
    lines.append(
        f"{'':<12} {'alerts':>8} {'per day':>8} {'precision':>9} {'recall':>7} {'AUC':>6} {'AP':>6} "
        f"{'CP@' + str(report['top_k']):>6}  rule set"
    )
    for name in names:
        side, o = sides[name], sides[name]["overall"] or {}
        lines.append(
            f"{name:<12} {side['alerts']:>8,} {_f(report['workload'][name]['mean_per_day'], 1):>8} "
            f"{_f(o.get('precision')):>9} {_f(o.get('recall')):>7} {_f(o.get('auc_roc')):>6} "
            f"{_f(o.get('average_precision')):>6} {_f(o.get('card_precision')):>6}  {side['rules']['version']}"
        )
    scenarios = sorted({s for name in names for s in ((sides[name]["overall"] or {}).get("scenarios") or {})})
    if scenarios:
        lines += ["", f"{'recall by scenario':<26}" + "".join(f"{n:>12}" for n in names)]
        for s in scenarios:
            lines.append(
                f"{s:<26}"
                + "".join(
                    f"{_f(((sides[n]['overall'] or {}).get('scenarios') or {}).get(s, {}).get('recall')):>12}"
                    for n in names
                )
            )
    lines.append("")
    for mine, _other in (names, names[::-1]):
        d = report["differences"][f"only_{mine}"]
        lines.append(
            f"alerts only the {mine} raises: {d['alerts']:,} ({d['frauds']:,} of them fraud"
            + (
                f": {', '.join(f'{k} {v:,}' for k, v in sorted(d['frauds_by_scenario'].items()))}"
                if d["frauds"]
                else ""
            )
            + ")"
        )
        for row in d["sample"][:5]:
            lines.append(
                f"    {row['transaction_id']} {row['event_time']} {row['label'] or 'unlabelled'}: "
                f"{', '.join(row['rules']) or '-'}"
            )
    lines.append(
        f"frauds the {names[0]} misses that the {names[1]} catches: {report['differences']['missed_frauds']:,}"
    )
    days = sorted(set(report["workload"][names[0]]["per_day"]))
    if days:
        by_day = {n: {d["day"]: d for d in sides[n]["days"]} for n in names}
        lines += ["", f"{'day':<10}" + "".join(f"{n + ' alerts':>18}{'precision':>10}" for n in names)]
        for day in days:
            lines.append(
                f"{day:<10}"
                + "".join(
                    f"{report['workload'][n]['per_day'][day]:>18,}{_f(by_day[n].get(day, {}).get('precision')):>10}"
                    for n in names
                )
            )
    fid = report.get("fidelity")
    if fid is not None:
        lines += [
            "",
            f"fidelity ({names[1]} against the detector's outputs, rule set {fid['rule_set']}): "
            f"{fid['same']:,} of {fid['compared']:,} the same"
            + (
                f" ({fid['same'] - fid['same_score']:,} of them with another score)"
                if fid["same_score"] != fid["same"]
                else ""
            )
            + (f" ({100 * fid['agreement']:.2f}%)" if fid["agreement"] is not None else "")
            + (f"; {fid['not_routed_live']:,} not routed live" if fid["not_routed_live"] else "")
            + (
                f"; {fid['decided_live_under_another_rule_set']:,} decided live under another rule set"
                if fid["decided_live_under_another_rule_set"]
                else ""
            ),
        ]
        for cause, count in fid["causes"].items():
            lines.append(f"    {count:,} different: {cause}")
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: Path, names: tuple[str, str] = (CANDIDATE, BASELINE)) -> bool:
    """Alerts per day and precision per day, both rule sets, as a PNG; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = sorted(report["workload"][names[0]]["per_day"])
    x = [datetime.fromisoformat(d) for d in days]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        left.plot(x, [report["workload"][name]["per_day"][d] for d in days], marker=".", label=name)
        precision = {d["day"]: d["precision"] for d in report["sides"][name]["days"]}
        right.plot(x, [math.nan if precision.get(d) is None else precision[d] for d in days], marker=".", label=name)
    left.set(ylabel="alerts", title="Alerts per day (analyst workload)")
    left.set_ylim(bottom=0)
    right.set(ylabel="precision", ylim=(0, 1.02), title="Precision per day")
    left.legend(loc="upper right")
    right.legend(loc="lower right")  # precision usually sits high
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument(
        "--rules",
        dest="candidate",
        type=Path,
        required=True,
        metavar="CANDIDATE.toml",
        help="the candidate rules, as `fraudstream rules set` takes them (applied to the rules in force)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="compare with the rules in force with FILE applied [the rules topic's rules in force]",
    )
    parser.add_argument(
        "--model",
        dest="model_file",
        type=Path,
        metavar="FILE",
        help="score with this model too, as `detect --model` (both rule sets)",
    )
    parser.add_argument(
        "--from",
        dest="first_day",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="first day reported (UTC, event time); earlier records build the state [the first]",
    )
    parser.add_argument(
        "--to",
        dest="last_day",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="last day reported, inclusive [the last]",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("backtest.json"),
        metavar="PATH",
        help="JSON report; the PNG chart goes next to it [backtest.json]",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"cards investigated per day for Card Precision@K [{DEFAULT_TOP_K}]",
    )
    parser.add_argument(
        "--label-delay",
        dest="label_delay_days",
        type=float,
        metavar="DAYS",
        help="days until a fraud's label arrives [FRAUDSTREAM_LABEL_DELAY_DAYS, 7]",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=SAMPLE,
        metavar="N",
        help=f"alerts listed per side among those only it raises [{SAMPLE}]",
    )
    parser.add_argument(
        "--fidelity",
        action="store_true",
        help="also compare the baseline's decisions with those the live detector wrote",
    )
    add_connection_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.consumer.backtest import Replay

    logging.getLogger("fraudstream.librdkafka").setLevel(logging.CRITICAL)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {args.top_k}")
    if args.first_day and args.last_day and args.first_day > args.last_day:
        raise ConfigError(f"--from {args.first_day} is after --to {args.last_day}")
    rule_sets = load_rule_sets(settings, args.candidate, args.baseline)  # a bad file: one line, nothing read
    model = labels_reader = None
    if settings.model_file is not None:
        from fraudstream.consumer.stateful import load_scoring

        model, labels_reader = load_scoring(
            settings, on_log=lambda line: print(line, file=sys.stderr), keep_verdicts=True
        )
    try:
        result = Replay(
            settings, {CANDIDATE: rule_sets.candidate, BASELINE: rule_sets.baseline}, model=model, labels=labels_reader
        ).run()
    finally:
        if labels_reader is not None:
            labels_reader.close()
    # With a model the labels were read for it, and kept for the report; otherwise read now.
    verdicts = labels_reader.verdicts if labels_reader is not None else None
    labels = verdicts if verdicts is not None else read_labels(settings)[0]
    report, warnings = build_report(
        result,
        labels,
        first_day=args.first_day,
        last_day=args.last_day,
        top_k=args.top_k,
        label_delay_days=settings.label_delay_days,
        sample=args.sample,
    )
    report["baseline_source"] = rule_sets.baseline_source
    report["speed"]["labels_read_once"] = verdicts is not None  # for the model and the report together
    if args.fidelity:
        report["fidelity"] = fidelity(
            result,
            read_outputs(settings),
            side=BASELINE,
            in_window=window_mask(result.event_ms, args.first_day, args.last_day),
        )
    print(render(report), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    chart = args.output.with_suffix(".png")
    wrote_chart = bool(report["in_window"]) and write_chart(report, chart)
    print(f"\nwrote {args.output}" + (f" and {chart}" if wrote_chart else ""), flush=True)
    for warning in warnings:
        print(f"fraudstream backtest: {warning}", file=sys.stderr)
    return 0 if report["in_window"] and labels else 1
