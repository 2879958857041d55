"""`fraudstream produce` (also `python -m producer`): labelled synthetic transactions into Kafka.

Needs the schemas registered first (`fraudstream schemas register`). Prints progress on stdout (a live
line on a terminal, plain lines otherwise; none with --quiet), then one summary line. Exit status 0
when every transaction and label was delivered, 1 otherwise; SIGINT/SIGTERM stop sending, flush
what was sent, and exit the same way. A second signal gives up on the flush.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from fraudstream.errors import ConfigError
from fraudstream.settings import Settings
from producer.generator import DEFAULT_LARGE_LEGIT_SHARE, DEFAULT_SHARES, FRAUD_SCENARIOS
from producer.loop import DEFAULT_RATE, DEFAULT_SEED, DEFAULT_SPEEDUP, produce


def speedup(text: str) -> float:
    """argparse type of --speedup: a positive, finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, metavar="TX_PER_S",
                        help=f"transactions per second, held on average; 0: as fast as possible [{DEFAULT_RATE:g}]")
    parser.add_argument("--speedup", type=speedup, default=DEFAULT_SPEEDUP, metavar="N",
                        help="event time runs N times faster than the wall clock, from the wall clock at start; "
                             "--rate stays per wall-clock second. The demo uses 3600: an hour of event time per "
                             f"second, so each card pays every few hours, as cards do [{DEFAULT_SPEEDUP:g}]")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N transactions")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="stop after this long (with --count: whichever comes first; neither: until Ctrl-C)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the population and the traffic [{DEFAULT_SEED}]")
    parser.add_argument("--scenario-share", action="append", default=[], metavar="NAME=FRACTION",
                        help="fraction of all transactions made by a fraud scenario; repeatable. Defaults: "
                             + ", ".join(f"{name}={share:g}" for name, share in DEFAULT_SHARES.items()))
    parser.add_argument("--large-legit-share", type=float, default=DEFAULT_LARGE_LEGIT_SHARE, metavar="FRACTION",
                        help=f"fraction of genuine purchases above $900 [{DEFAULT_LARGE_LEGIT_SHARE:g}]")
    parser.add_argument("--accounts", type=int, metavar="N", help="accounts in the population [5000]")
    parser.add_argument("--no-labels", dest="labels", action="store_false",
                        help="do not write ground-truth labels to <topic>.labels")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display, only the summary line")
    add_connection_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    with _stop_on_signals(stop):
        report = produce(
            settings, rate=args.rate, count=args.count, duration=args.duration, seed=args.seed, quiet=args.quiet,
            stop=stop, shares=parse_shares(args.scenario_share), large_legit_share=args.large_legit_share,
            accounts=args.accounts, labels=args.labels, speedup=args.speedup,
        )
    print(report.summary(), flush=True)
    if report.ok:
        return 0
    reasons = "; ".join(report.errors) or "no delivery report"
    print(f"fraudstream produce: error: {report.failed + report.labels_failed:,} records not delivered: {reasons}",
          file=sys.stderr)
    return 1


def parse_shares(items: list[str]) -> dict[str, float]:
    shares = {}
    for item in items:
        name, sep, fraction = item.partition("=")
        if not sep or name not in FRAUD_SCENARIOS:
            raise ConfigError(f"--scenario-share wants NAME=FRACTION with NAME one of {', '.join(FRAUD_SCENARIOS)}, "
                              f"not {item!r}")
        try:
            shares[name] = float(fraction)
        except ValueError as exc:
            raise ConfigError(f"--scenario-share {item!r}: {fraction!r} is not a number") from exc
    return shares


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish cleanly (stop sending, flush). Second: give up (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
