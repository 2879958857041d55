"""The group probe (fraudstream/group_probe.py): a group request asked by a child process, so that librdkafka
aborting on it, or hanging, costs one answer and never the detector."""

from __future__ import annotations

import sys

import pytest

from fraudstream.errors import KafkaUnavailable
from fraudstream.group_probe import static_members
from fraudstream.settings import Settings

SETTINGS = Settings(bootstrap_servers="127.0.0.1:9")  # nothing listens there


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_librdkafka_aborts_is_an_outage_to_wait_out_not_the_end_of_this_process() -> None:
    with pytest.raises(KafkaUnavailable, match="librdkafka aborted the child process"):
        static_members(SETTINGS, "g", "g-1", probe=child("import os, sys; sys.stdin.read(); os.abort()"))


def test_a_child_that_hangs_is_killed_at_its_deadline(monkeypatch) -> None:
    monkeypatch.setattr("fraudstream.group_probe.CHILD_GRACE_S", 0.5)
    with pytest.raises(KafkaUnavailable, match="child killed"):
        static_members(SETTINGS, "g", "g-1", timeout_s=0.5, probe=child("import time; time.sleep(60)"))


def test_the_real_child_answers_with_one_line_when_no_broker_does() -> None:
    """The default probe really runs `python -m fraudstream.group_probe`, settings through its stdin."""
    with pytest.raises(KafkaUnavailable, match="could not describe consumer group g"):
        static_members(SETTINGS, "g", "g-1", timeout_s=2)
