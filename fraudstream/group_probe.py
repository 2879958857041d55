"""Who holds a static member id in a consumer group, asked by a child process of its own.

The detector asks this after its producer was fenced, to tell a newer detector (stop) from a broker restart
(carry on): a DescribeConsumerGroups request, sent to the group's coordinator, often while that coordinator
is coming back. librdkafka (2.16.0, which every confluent-kafka release served here bundles, 2.16.2 included)
can abort the whole process when such an Admin API coordinator request fails on a disconnect: an assertion
in rd_kafka_enq_once_del_source_return (a use-after-free, upstream pull request 5397, not merged). In a child
process that abort costs one answer, asked again; in the detector it cost the process. A child is also
killed when it outlives its timeout, so a request that hangs cannot hang the detector.

The settings reach the child through its stdin (pickled), never its command line: they can hold secrets.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass

from fraudstream.errors import KafkaUnavailable
from fraudstream.settings import Settings

PROBE = [sys.executable, "-m", "fraudstream.group_probe"]
CHILD_GRACE_S = 10.0  # past the request's own timeout: Python and librdkafka start in the child first (about 1 s)


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    client_id: str
    host: str


def static_members(
    settings: Settings, group_id: str, instance_id: str, *, timeout_s: float = 10.0, probe: list[str] = PROBE
) -> list[Member]:
    """The members that hold `instance_id` (group.instance.id) in the group, as its coordinator sees it now;
    KafkaUnavailable when it could not say (no answer, the request failed, or librdkafka aborted the child)."""
    request = pickle.dumps((settings, group_id, instance_id, timeout_s))
    try:
        done = subprocess.run(probe, input=request, capture_output=True, timeout=timeout_s + CHILD_GRACE_S, check=False)
    except subprocess.TimeoutExpired:
        raise KafkaUnavailable(
            f"describing consumer group {group_id}: no answer within {timeout_s + CHILD_GRACE_S:g} s (child killed)"
        ) from None
    if done.returncode == 0:
        return [Member(*fields) for fields in json.loads(done.stdout)]
    said = done.stderr.decode(errors="replace").strip().splitlines()
    if done.returncode == -signal.SIGABRT:
        raise KafkaUnavailable(f"describing consumer group {group_id}: librdkafka aborted the child process")
    raise KafkaUnavailable(said[-1] if said else f"describing consumer group {group_id}: exit {done.returncode}")


def _answer() -> int:
    """The child: read the request from stdin, print the members as JSON, or one line on stderr and exit 2."""
    from fraudstream.kafka import admin, describe_static_members

    settings, group_id, instance_id, timeout_s = pickle.loads(sys.stdin.buffer.read())
    client = admin(settings)
    try:
        members = describe_static_members(client, group_id, instance_id, timeout_s=timeout_s)
    except KafkaUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps([[m.member_id, m.client_id, m.host] for m in members]))
    return 0


if __name__ == "__main__":
    sys.exit(_answer())
