"""`fraudstream produce --speedup N` against the real broker: event time runs N times faster than the
wall clock, the rate stays per wall-clock second."""

from __future__ import annotations

import subprocess
import sys
import time

from fraudstream.registry import Registry
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder
from fraudstream.settings import Settings
from tests.support.kafka_io import read_topic

SPEEDUP = 3_600


def test_produce_with_speedup_stamps_event_time_n_times_faster(pipeline: Settings) -> None:
    command = [
        sys.executable,
        "-m",
        "fraudstream.producer",
        "--topic",
        pipeline.transactions_topic,
        "--bootstrap-servers",
        pipeline.bootstrap_servers,
        "--schema-registry-url",
        pipeline.schema_registry_url,
        "--rate",
        "1000",
        "--count",
        "1500",
        "--speedup",
        str(SPEEDUP),
        "--no-labels",
        "--quiet",
    ]
    wall_before_ms = time.time() * 1000
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    wall_after_ms = time.time() * 1000
    assert done.returncode == 0, done.stderr

    decoder = Decoder(Registry(pipeline), load_schemas(pipeline.schemas_dir).expanded["Transaction"])
    times = sorted(
        decoder.decode(message.value())["event_time"].timestamp() * 1000
        for message in read_topic(pipeline, pipeline.transactions_topic)
    )
    assert len(times) == 1_500
    span_ms = times[-1] - times[0]
    # 1,500 at 1,000/s is about 1.5 s of sending: about 1.5 hours of event time. The clock starts at the
    # wall clock when the process starts, so every stamp lies between then and N times the run past it.
    run_ms = wall_after_ms - wall_before_ms
    assert wall_before_ms - 1 <= times[0] and times[-1] <= wall_before_ms + run_ms * SPEEDUP
    assert 0.5 * 1.5 * SPEEDUP * 1000 <= span_ms <= run_ms * SPEEDUP
