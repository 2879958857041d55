"""The demo's flags and their defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from fraudstream import argtypes

DEFAULT_DURATION_S = 60.0
DEFAULT_RATE = 1_000
# Event time runs this many times faster than the wall clock (`produce --speedup`): an hour of event
# time per second. At 1,000/s over 5,000 accounts, each account pays every ~5 s of wall time, so
# every few hours of event time, as cards do; card-testing bursts and cloned-card sprees (seconds
# to minutes of event time) stay intact, and a 60 s demo covers 2.5 days with every scenario in it.
DEFAULT_SPEEDUP = 3_600.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
DEFAULT_PLAIN_INTERVAL_S = 5.0
DEFAULT_BAD_RECORDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments
    from fraudstream.producer.cli import speedup

    parser.add_argument(
        "--duration",
        type=argtypes.seconds,
        default=DEFAULT_DURATION_S,
        metavar="S",
        help=f"seconds of traffic (default {DEFAULT_DURATION_S:.0f}; 0: until Ctrl-C)",
    )
    parser.add_argument(
        "--rate",
        type=argtypes.positive_int,
        default=DEFAULT_RATE,
        metavar="R",
        help=f"transactions per second from the generator (default {DEFAULT_RATE})",
    )
    parser.add_argument(
        "--speedup",
        type=speedup,
        default=DEFAULT_SPEEDUP,
        metavar="N",
        help=f"event time runs N times faster than the wall clock (default {DEFAULT_SPEEDUP:g}: "
        "an hour per second, so each card pays every few hours)",
    )
    parser.add_argument(
        "--detectors",
        type=argtypes.positive_int,
        default=1,
        metavar="N",
        help="detector processes in one consumer group, to show scaling out (default 1)",
    )
    parser.add_argument("--seed", type=int, help="generator seed, for a repeatable run")
    parser.add_argument(
        "--partitions",
        dest="partitions",
        type=argtypes.positive_int,
        help="partitions of the topics when the demo creates them [FRAUDSTREAM_PARTITIONS, default 6]",
    )
    parser.add_argument("--group-id", dest="group_id", help="the detectors' consumer group [FRAUDSTREAM_GROUP_ID]")
    parser.add_argument(
        "--drain-timeout",
        type=argtypes.seconds,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="S",
        help="after the producer stops, wait at most this long for the detectors to route "
        f"everything (default {DEFAULT_DRAIN_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--interval",
        type=argtypes.seconds,
        default=DEFAULT_PLAIN_INTERVAL_S,
        metavar="S",
        help="seconds between progress lines when the output is not a terminal "
        f"(default {DEFAULT_PLAIN_INTERVAL_S:.0f})",
    )
    parser.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    parser.add_argument(
        "--bad-records",
        type=argtypes.count,
        default=DEFAULT_BAD_RECORDS,
        metavar="N",
        help="malformed records the demo slips into the input topic during the run, to show the "
        f"dead-letter path (default {DEFAULT_BAD_RECORDS}; 0: none)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="where the producer's and detectors' logs go (default: a new temporary folder)",
    )
    parser.add_argument(
        "--stop-stack",
        action="store_true",
        help="stop the local stack at the end if the demo started it (default: leave it running "
        "for the inspect commands)",
    )
    parser.add_argument(
        "--console-port",
        type=argtypes.count,
        default=None,
        metavar="PORT",
        help="port of the analyst console the demo serves on 127.0.0.1 (default 8088, as `fraudstream console`)",
    )
    parser.add_argument("--no-console", dest="console", action="store_false", help="do not start the analyst console")
    add_connection_arguments(parser)
