"""fraudstream.printable: untrusted text made safe for a terminal or a log line, and JSON kept valid."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fraudstream.consumer.inspect import dumps
from fraudstream.printable import printable


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain text, é, 日本", "plain text, é, 日本"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),  # ESC: clear screen, retitle; BEL
        ("a\r\nINFO forged line", "a\\r\\nINFO forged line"),
        ("\u202eevil\u2066\u200b", "\\u202eevil\\u2066\\u200b"),  # bidi override, isolate, zero-width space
        ("\x9b31m\x85", "\\x9b31m\\x85"),  # C1: CSI (an escape on some terminals), NEL
        ("\u2028\U000e0001", "\\u2028\\U000e0001"),  # line separator, a tag character
    ],
)
def test_control_characters_are_shown_escaped_and_letters_are_left_alone(text: str, shown: str) -> None:
    assert printable(text) == shown


@given(st.text())
def test_printed_text_is_always_one_printable_line(text: str) -> None:
    assert printable(text).isprintable()


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=10,
    )
)
def test_json_stays_the_same_value_with_nothing_a_terminal_acts_on(value) -> None:
    text = printable(json.dumps(value, ensure_ascii=False), json=True)
    assert json.loads(text) == value
    assert all(c.isprintable() or c == " " for c in text)


def test_inspect_prints_bytes_and_text_with_no_control_character() -> None:
    line = dumps({"raw": b"\x9b2J\x1b[31m", "comment": "ok\u202e\n"})  # bytes as ISO-8859-1: C1 controls
    assert line.isprintable() and json.loads(line) == {"raw": "\x9b2J\x1b[31m", "comment": "ok\u202e\n"}


def test_the_demo_view_shows_a_rule_record_s_author_and_comment_escaped() -> None:
    from datetime import UTC, datetime

    from fraudstream.demo.watcher import rule_line
    from fraudstream.records import Rule

    class Decoded:
        def decode(self, value):
            return Rule(
                id="r",
                version=1,
                kind="large_amount",
                parameters={},
                enabled=True,
                author="\x1b[2Jeve",
                comment="ok\r\nFORGED",
                written_at=datetime(2026, 1, 1, tzinfo=UTC),
            ).to_dict()

    assert rule_line(Decoded(), b"x") == "r v1 enabled  by \\x1b[2Jeve: ok\\r\\nFORGED"
