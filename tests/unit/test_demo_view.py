"""The demo's bookkeeping and live view, offline: counts, the join with labels, rendering."""

from __future__ import annotations

import argparse
import io
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fraudstream.demo.bad_records import bad_record_times, malformed_record
from fraudstream.demo.options import add_arguments
from fraudstream.demo.pipeline import detector_command, producer_command
from fraudstream.demo.scoring import DemoState, DetectionScore, PipelineCounts
from fraudstream.demo.summary import summary_lines
from fraudstream.demo.view import Frame, LiveView, RateMeter, panel_lines, plain_line
from fraudstream.records import FraudAlert, Label, Transaction
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, DecodeError
from fraudstream.settings import Settings

SETTINGS = Settings(transactions_topic="payments")
DETECTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def tx(transaction_id: str, amount_cents: int = 1_000) -> Transaction:
    return Transaction(
        transaction_id=transaction_id,
        account_id="acc-1",
        card_id="c",
        merchant_id="m",
        merchant_category="5411",
        terminal_id="t",
        amount_cents=amount_cents,
        event_time=DETECTED,
        channel="ONLINE",
        country="US",
        city="Austin",
        latitude=30.3,
        longitude=-97.7,
    )


def alert(transaction_id: str, *rules: str) -> FraudAlert:
    return FraudAlert(transaction=tx(transaction_id, 95_000), rules=rules or ("large_amount",), detected_at=DETECTED)


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def frame(state: DemoState, *, elapsed: float = 3.0, phase: str = "producing") -> Frame:
    return Frame(
        topic="payments",
        detectors=2,
        rate=500,
        duration_s=30,
        elapsed_s=elapsed,
        phase=phase,
        state=state,
        in_per_s=498.0,
        out_per_s=490.0,
    )


def busy_state() -> DemoState:
    state = DemoState()
    for i in range(10):
        state.on_input(100.0 + i)
        state.on_label(
            Label(
                transaction_id=f"t{i}", is_fraud=i in (1, 2, 3), scenario="card_testing" if i in (1, 2, 3) else "legit"
            )
        )
    for i in (0, 4, 5, 6, 7):
        state.on_legit(tx(f"t{i}"))
    state.on_legit(tx("t3"))  # a fraud let through
    state.on_fraud(alert("t1", "large_amount", "velocity"))
    state.on_fraud(alert("t2"))
    state.on_fraud(alert("t8"))  # a false positive
    state.on_dead_letter()
    return state


def test_score_joins_decisions_and_labels_whichever_comes_first() -> None:
    score = DetectionScore()
    score.decided("a", flagged=True)
    score.labelled("a", True, "card_testing")  # decision first
    score.labelled("b", False, "legit")
    score.decided("b", flagged=True)  # label first: a false positive
    score.labelled("c", True, "far_from_home")
    score.decided("c", flagged=False)  # a missed fraud
    score.decided("d", flagged=False)
    score.labelled("d", False, "legit")
    score.decided("e", flagged=False)  # no label yet

    assert (score.true_positives, score.false_positives, score.false_negatives, score.true_negatives) == (1, 1, 1, 1)
    assert score.awaiting_labels == 1
    assert score.precision == 0.5 and score.recall == 0.5
    assert score.missed_by_scenario == {"far_from_home": 1} and score.caught_by_scenario == {"card_testing": 1}
    assert (score.verdict("a"), score.verdict("b"), score.verdict("e")) == (True, False, None)


def test_score_has_no_ratios_before_any_alert_or_fraud() -> None:
    assert DetectionScore().precision is None and DetectionScore().recall is None


def test_counts_add_up_only_when_everything_produced_is_routed() -> None:
    counts = PipelineCounts(produced=10, backlog=2, legit=8, fraud=2, dead_letter=1)
    assert (counts.routed, counts.expected, counts.in_flight, counts.add_up) == (11, 12, 1, False)
    counts.legit += 1
    assert counts.add_up


def test_state_keeps_the_latest_alerts_newest_first_and_counts_rules() -> None:
    state = DemoState()
    for i in range(7):
        state.on_fraud(alert(f"t{i}", "large_amount", "velocity"))

    assert [a.transaction_id for a in state.latest_alerts] == ["t6", "t5", "t4", "t3", "t2"]
    assert state.rules_fired == {"large_amount": 7, "velocity": 7}
    assert state.counts.fraud == 7


def test_rate_meter_measures_over_its_window() -> None:
    meter = RateMeter(window_s=2.0)
    for second in range(6):
        meter.add(float(second), 100 * second)
    assert meter.per_second() == pytest.approx(100.0)
    assert RateMeter().per_second() == 0.0


def test_plain_line_has_every_count_and_no_escape_codes() -> None:
    line = plain_line(frame(busy_state()))

    assert "\x1b" not in line and "\n" not in line
    for part in (
        "producing",
        "produced=10",
        "legit=6",
        "fraud=3",
        "dead_letter=1",
        "in_flight=0",
        "true_positives=2",
        "false_positives=1",
        "false_negatives=1",
    ):
        assert part in line


def test_panel_shows_counts_detection_and_the_latest_alerts_with_their_rules() -> None:
    text = "\n".join(panel_lines(frame(busy_state())))

    assert "legit 6" in text and "fraud 3" in text and "dead-letter 1" in text
    assert "true positives 2" in text and "false positives 1" in text and "missed frauds 1" in text
    assert "rules: large_amount, velocity" in text
    assert "FALSE POSITIVE" in text and "fraud (labelled)" in text


class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_not_a_terminal_gets_one_plain_line_per_interval() -> None:
    out, clock = FakeTerminal(tty=False), FakeClock()
    view = LiveView(out, interactive=LiveView.is_terminal(out), interval_s=5.0, clock=clock)
    state = busy_state()

    for clock.now in (0.0, 1.0, 4.9, 5.0, 7.0, 10.1):
        view.update(frame(state))
    view.update(frame(state, phase="done"), force=True)
    view.close()

    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].split("] ")[1].startswith("done:")
    assert "\x1b" not in out.getvalue()


def test_terminal_gets_the_panel_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out, clock = FakeTerminal(tty=True), FakeClock()
    view = LiveView(out, interactive=LiveView.is_terminal(out), interval_s=5.0, clock=clock)
    state = busy_state()

    view.update(frame(state))
    first = out.getvalue()
    clock.now = 1.0
    view.update(frame(state))
    second = out.getvalue()[len(first) :]
    view.close()

    panel_height = len(panel_lines(frame(state)))
    assert first.count("\n") == panel_height and "\x1b[" not in first.split("\x1b[?25l", 1)[1].split("\x1b[1m")[0]
    assert second.startswith(f"\x1b[{panel_height}F")  # back up over the previous panel, not scrolling
    assert out.getvalue().endswith("\x1b[?25h")  # the cursor comes back


def test_summary_ends_with_a_parseable_line_and_inspect_commands() -> None:
    state = busy_state()
    lines = summary_lines(
        frame(state, phase="done"), SETTINGS, extra_flags=[], log_dir=Path("/tmp/x"), stack_left_running=True
    )

    fields = dict(item.split("=", 1) for item in lines[-1].removeprefix("summary: ").split())
    assert lines[-1].startswith("summary: ")
    assert (fields["produced"], fields["legit"], fields["fraud"], fields["dead_letter"]) == ("10", "6", "3", "1")
    assert fields["counts_add_up"] == "yes"
    assert any(line.strip().startswith("fraudstream inspect payments.fraud --from-beginning") for line in lines)
    assert any(line.strip().startswith("fraudstream inspect payments.dlq") for line in lines)
    assert any("fraudstream stack down" in line for line in lines)


def test_summary_says_so_when_counts_do_not_add_up() -> None:
    state = busy_state()
    state.on_input(200.0)
    lines = summary_lines(
        frame(state),
        SETTINGS,
        extra_flags=["--bootstrap-servers", "h:1"],
        log_dir=Path("/tmp/x"),
        stack_left_running=False,
    )

    assert "counts_add_up=no" in lines[-1] and any("do NOT add up" in line for line in lines)
    assert all(
        line.endswith("--bootstrap-servers h:1")
        for line in lines
        if line.strip().startswith("fraudstream inspect") and "|" not in line
    )


def test_each_detector_gets_its_own_transactional_id() -> None:
    settings = SETTINGS.replace(group_id="g")
    ids = {
        detector_command(settings, i)[detector_command(settings, i).index("--transactional-id") + 1] for i in range(3)
    }

    assert len(ids) == 3
    assert detector_command(settings, 0)[:5] == ["detect", "--topic", "payments", "--group-id", "g"]


def test_producer_runs_for_the_duration_or_until_stopped() -> None:
    timed = producer_command(SETTINGS, parse_args("--duration", "12", "--rate", "300", "--seed", "7"))
    endless = producer_command(SETTINGS, parse_args("--duration", "0"))

    assert timed[timed.index("--duration") + 1] == "12" and timed[timed.index("--rate") + 1] == "300"
    assert timed[timed.index("--seed") + 1] == "7" and "--quiet" in timed
    assert "--duration" not in endless and "--seed" not in endless


class NoRegistry:
    """Knows the Transaction schema under id 1 and nothing else."""

    def schema_by_id(self, schema_id: int) -> dict:
        from fraudstream.registry import UnknownSchema

        if schema_id != 1:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        return load_schemas(SETTINGS.schemas_dir).expanded["Transaction"]


def test_malformed_records_cover_three_kinds_of_damage_the_detector_dead_letters() -> None:
    decoder = Decoder(NoRegistry(), load_schemas(SETTINGS.schemas_dir).expanded["Transaction"])
    kinds = []
    for index in range(3):
        key, value = malformed_record(index, transaction_schema_id=1)
        assert key == f"demo-malformed-{index}".encode()
        with pytest.raises(DecodeError) as caught:
            decoder.decode(value)
        kinds.append(caught.value.kind)

    assert kinds == ["no_magic_byte", "unknown_schema_id", "corrupt_avro"]


def test_bad_records_are_spread_over_the_traffic() -> None:
    assert bad_record_times(3, 8.0) == [2.0, 4.0, 6.0]
    assert bad_record_times(2, 0) == [10.0, 20.0]  # no set end: one every 10 s
    assert bad_record_times(0, 8.0) == []


def test_traffic_time_runs_from_the_first_input_record_to_the_last() -> None:
    state = busy_state()
    assert state.traffic_s == 9.0  # inputs seen at 100.0 .. 109.0
    assert DemoState().traffic_s == 0.0


def test_rule_changes_show_in_the_panel_newest_first() -> None:
    from fraudstream.demo.watcher import rule_line
    from fraudstream.records import Rule
    from fraudstream.serde import make_encoder
    from tests.unit.test_serde import FakeRegistry

    schemas = load_schemas(Settings().schemas_dir)
    decoder = Decoder(FakeRegistry({5: schemas.expanded["Rule"]}), schemas.expanded["Rule"])
    encode = make_encoder(5, schemas.parsed["Rule"])
    lowered = Rule(
        id="large_amount",
        version=2,
        kind="large_amount",
        parameters={"threshold_cents": 50_000},
        enabled=True,
        author="ana",
        comment="more fraud",
        written_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    state = busy_state()
    assert "rule changes" not in "\n".join(panel_lines(frame(state)))
    state.on_rule(rule_line(decoder, encode(lowered.to_dict())))
    state.on_rule(rule_line(decoder, b"junk"))
    text = "\n".join(panel_lines(frame(state)))
    assert "rule changes" in text
    assert text.index("unreadable rule record") < text.index(
        "large_amount v2 enabled threshold_cents=50000  by ana: more fraud"
    )
