"""What every peer script shares: its command line and a clean stop on SIGTERM or SIGINT.

Standard library only: the quixstreams peer runs in a virtual environment of its own."""

from __future__ import annotations

import argparse
import signal


def detector_arguments(description: str, *, registry: bool = True, dlq: bool = False) -> argparse.ArgumentParser:
    """A peer detector's flags: where Kafka (and the registry) are, its topics and group, the rule's threshold."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap-servers", required=True)
    if registry:
        parser.add_argument("--schema-registry-url", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--legit-topic", required=True)
    parser.add_argument("--fraud-topic", required=True)
    if dlq:
        parser.add_argument("--dlq-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--threshold-cents", type=int, default=90_000)
    return parser


def stop_requested() -> list[bool]:
    """A list that SIGTERM and SIGINT append to: the consume loop runs while it is empty."""
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    return stopping
