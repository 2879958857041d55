"""The group probe's child against the real broker (fraudstream/group_probe.py)."""

from __future__ import annotations

import uuid

from fraudstream.group_probe import static_members
from fraudstream.settings import Settings
from tests.integration.test_detector import RunningDetector
from tests.support.kafka_io import wait_until


def test_the_real_child_names_the_member_holding_a_detector_s_instance_id(pipeline: Settings) -> None:
    """A running detector holds its transactional id as its group.instance.id: the child, asking the group's
    coordinator, finds exactly that member; an id nobody holds, none."""
    running = RunningDetector(pipeline)
    try:
        wait_until(lambda: running.detector.tasks.partitions, timeout_s=60, what="the detector assigned")
        ours = running.detector.consumer.memberid()
        members = static_members(pipeline, pipeline.group_id, running.detector.transactional_id, timeout_s=10)
        assert [m.member_id for m in members] == [ours]
        assert static_members(pipeline, pipeline.group_id, f"nobody-{uuid.uuid4().hex[:6]}", timeout_s=10) == []
    finally:
        running.stop()
    assert running.error is None
