"""The report printed when the demo ends: counts, detection against the labels, the commands to look further."""

from __future__ import annotations

from pathlib import Path

from fraudstream.demo.scoring import DetectionScore
from fraudstream.demo.view import Frame, pct, ratio
from fraudstream.settings import Settings


def summary_lines(
    frame: Frame,
    settings: Settings,
    *,
    extra_flags: list[str],
    log_dir: Path,
    stack_left_running: bool,
    bad_records: int = 0,
    console_url: str | None = None,
) -> list[str]:
    c, s = frame.state.counts, frame.state.score
    topic = settings.transactions_topic
    traffic_s = frame.state.traffic_s
    per_s = f" ({c.produced / traffic_s:,.0f}/s)" if traffic_s > 0 else ""
    detectors = f"{frame.detectors} detector{'s' if frame.detectors > 1 else ''}"
    malformed = f", {bad_records} of them malformed on purpose" if bad_records else ""
    lines = [
        "",
        f"fraudstream demo: {c.produced:,} records in {traffic_s:.1f}s of traffic{per_s}{malformed}, "
        f"{frame.elapsed_s:.1f}s in all; topic {topic}, {detectors}",
        f"  legit        {c.legit:>10,}   -> {settings.legit_topic}",
        f"  fraud        {c.fraud:>10,}   -> {settings.fraud_topic}",
        f"  dead-letter  {c.dead_letter:>10,}   -> {settings.dlq_topic}",
    ]
    before = f" + {c.backlog:,} left from earlier runs" if c.backlog else ""
    relation = "=" if c.add_up else "!="
    lines.append(
        f"  produced {c.produced:,}{before} {relation} legit {c.legit:,} + fraud {c.fraud:,} "
        f"+ dead-letter {c.dead_letter:,}" + ("" if c.add_up else "   <- counts do NOT add up")
    )
    lines.append(
        f"  detection vs labels: {s.true_positives:,} true positives, {s.false_positives:,} false positives, "
        f"{s.false_negatives:,} missed frauds, {s.true_negatives:,} true negatives; "
        f"precision {ratio(s.precision)}, recall {ratio(s.recall)}"
    )
    if s.missed_by_scenario:
        missed = ", ".join(f"{name} {n:,}" for name, n in s.missed_by_scenario.most_common())
        lines.append(f"  missed frauds by scenario: {missed}")
    lines += scenario_lines(s)
    if frame.state.undecodable_outputs:
        lines.append(f"  {frame.state.undecodable_outputs:,} output or label records could not be decoded by the view")
    if frame.state.rules_fired:
        lines.append(
            "  rules fired: " + ", ".join(f"{name} {n:,}" for name, n in frame.state.rules_fired.most_common())
        )
    flags = (" " + " ".join(extra_flags)) if extra_flags else ""
    lines += [
        "",
        "look further (read_committed, like kafka-avro-console-consumer; add --follow to keep watching):",
        f"  fraudstream inspect {settings.fraud_topic} --from-beginning --max-messages 5{flags}",
        f"  fraudstream inspect {settings.dlq_topic} --from-beginning --max-messages 5{flags}",
        f"  fraudstream inspect {settings.legit_topic} --from-beginning --max-messages 5 --print-key --print-metadata{flags}",
        f"  fraudstream inspect {settings.labels_topic} --from-beginning --max-messages 5{flags}",
        f"  fraudstream inspect {settings.fraud_topic} --from-beginning{flags} | jq -r '.rules[]' | sort | uniq -c",
        f"producer and detector logs: {log_dir}",
    ]
    if console_url:
        lines.append(f"analyst console (review queue, verdicts, rules, dashboard): {console_url}")
    if stack_left_running:
        lines.append("the local stack is still running: `fraudstream stack down` stops it")
    lines.append(
        " ".join(
            [
                "summary:",
                f"topic={topic}",
                f"produced={c.produced}",
                f"backlog={c.backlog}",
                f"legit={c.legit}",
                f"fraud={c.fraud}",
                f"dead_letter={c.dead_letter}",
                f"in_flight={c.in_flight}",
                f"true_positives={s.true_positives}",
                f"false_positives={s.false_positives}",
                f"false_negatives={s.false_negatives}",
                f"true_negatives={s.true_negatives}",
                f"bad_records={bad_records}",
                f"traffic_s={traffic_s:.1f}",
                f"elapsed_s={frame.elapsed_s:.1f}",
                f"counts_add_up={'yes' if c.add_up else 'no'}",
                *(
                    f"recall_{name}={caught / total:.4f}"
                    for name, (caught, total) in sorted(s.recall_by_scenario().items())
                ),
            ]
        )
    )
    return lines


def scenario_lines(score: DetectionScore) -> list[str]:
    """Recall per fraud scenario, and which rule caught what (from the labels and FraudAlert.rules)."""
    recalls = score.recall_by_scenario()
    if not recalls and not score.by_rule:
        return []
    lines = ["  recall by scenario:"]
    for name, (caught, total) in recalls.items():
        lines.append(f"    {name:<22} {pct(caught, total):>6}  ({caught:,} of {total:,} caught)")
    if score.by_rule:
        lines.append("  which rule caught what (a transaction may fire several rules):")
        for rule, counts in sorted(score.by_rule.items()):
            fraud_caught = (
                ", ".join(f"{name} {n:,}" for name, n in counts.most_common() if name != "legit") or "no fraud"
            )
            lines.append(f"    {rule:<22} {fraud_caught}; false positives {counts['legit']:,}")
    return lines


def inspect_flags(settings: Settings) -> list[str]:
    """Connection flags the printed inspect commands need: none when the environment already gives the same."""
    plain = Settings.from_env()
    flags = []
    if settings.bootstrap_servers != plain.bootstrap_servers:
        flags += ["--bootstrap-servers", settings.bootstrap_servers]
    if settings.schema_registry_url != plain.schema_registry_url:
        flags += ["--schema-registry-url", settings.registry_url_display]
    from fraudstream.cli import client_flags
    from fraudstream.client_config import REDACTED, is_secret

    given = client_flags(settings)
    if given != client_flags(plain):  # client properties from flags: the printed commands need them too
        flags += [
            f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item and is_secret(item.split("=", 1)[0]) else item
            for item in given
        ]
    return flags
