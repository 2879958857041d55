"""`fraudstream produce` (also `python -m fraudstream.producer`): labelled synthetic transactions into Kafka.

Needs the schemas registered first (`fraudstream schemas register`). Prints progress on stdout (a live
line on a terminal, plain lines otherwise; none with --quiet), then one summary line. Exit status 0
when every transaction and label was delivered, 1 otherwise; SIGINT/SIGTERM stop sending, flush
what was sent, and exit the same way. A second signal gives up on the flush.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time

from confluent_kafka import KafkaError, KafkaException

from fraudstream.errors import ConfigError, KafkaUnavailable
from fraudstream.kafka import explain_denial
from fraudstream.settings import Settings
from fraudstream.signals import stop_requests
from fraudstream.producer import handbook
from fraudstream.producer.generator import DEFAULT_LARGE_LEGIT_SHARE, DEFAULT_SHARES, FRAUD_SCENARIOS
from fraudstream.producer.loop import DEFAULT_RATE, DEFAULT_SEED, DEFAULT_SPEEDUP, produce


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

    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        metavar="TX_PER_S",
        help=f"transactions per second, held on average; 0: as fast as possible [{DEFAULT_RATE:g}]",
    )
    parser.add_argument(
        "--speedup",
        type=speedup,
        default=DEFAULT_SPEEDUP,
        metavar="N",
        help="event time runs N times faster than the wall clock, from the wall clock at start; "
        "--rate stays per wall-clock second. The demo uses 3600: an hour of event time per "
        f"second, so each card pays every few hours, as cards do [{DEFAULT_SPEEDUP:g}]",
    )
    parser.add_argument("--count", type=int, metavar="N", help="stop after N transactions")
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (with --count: whichever comes first; neither: until Ctrl-C)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"seed of the population and the traffic [{DEFAULT_SEED}]"
    )
    parser.add_argument(
        "--scenario-share",
        action="append",
        default=[],
        metavar="NAME=FRACTION",
        help="fraction of all transactions made by a fraud scenario; repeatable. Defaults: "
        + ", ".join(f"{name}={share:g}" for name, share in DEFAULT_SHARES.items()),
    )
    parser.add_argument(
        "--large-legit-share",
        type=float,
        default=DEFAULT_LARGE_LEGIT_SHARE,
        metavar="FRACTION",
        help=f"fraction of genuine purchases above $900 [{DEFAULT_LARGE_LEGIT_SHARE:g}]",
    )
    parser.add_argument("--accounts", type=int, metavar="N", help="accounts in the population [5000]")
    parser.add_argument(
        "--no-labels", dest="labels", action="store_false", help="do not write ground-truth labels to <topic>.labels"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display, only the summary line")
    sim = parser.add_argument_group(
        "handbook profile (--profile handbook: the Fraud Detection Handbook's simulator, in simulated time; "
        "--rate, --scenario-share, --large-legit-share and --accounts do not apply)"
    )
    sim.add_argument(
        "--profile",
        choices=PROFILES,
        default="default",
        help="default: our generator, on the wall clock; handbook: Le Borgne et al.'s simulator [default]",
    )
    sim.add_argument(
        "--customers",
        type=int,
        default=handbook.DEFAULT_CUSTOMERS,
        metavar="N",
        help=f"customers [{handbook.DEFAULT_CUSTOMERS:,}]",
    )
    sim.add_argument(
        "--terminals",
        type=int,
        default=handbook.DEFAULT_TERMINALS,
        metavar="N",
        help=f"terminals [{handbook.DEFAULT_TERMINALS:,}]",
    )
    sim.add_argument(
        "--days",
        type=int,
        default=handbook.DEFAULT_DAYS,
        metavar="N",
        help=f"simulated days from {handbook.START:%Y-%m-%d} [{handbook.DEFAULT_DAYS}]",
    )
    sim.add_argument(
        "--days-per-second",
        type=float,
        default=0.0,
        metavar="D",
        help="simulated days per second of wall time; 0: as fast as possible [0]",
    )
    sim.add_argument(
        "--label-delay",
        type=float,
        metavar="DAYS",
        help="write each label once the simulated clock passes its transaction's time plus this many "
        f"days; 0: with the transaction [{handbook.DEFAULT_LABEL_DELAY_DAYS:g}]",
    )
    add_connection_arguments(parser)


PROFILES = ("default", "handbook")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.profile != "handbook" and args.label_delay:
        raise ConfigError("--label-delay needs --profile handbook (the default profile runs on the wall clock)")
    # First signal: finish cleanly (stop sending, flush); second: give up at once.
    with stop_requests(exit_on_second="fraudstream produce") as (stop, _):
        try:
            report = (
                produce_handbook(args, settings, stop)
                if args.profile == "handbook"
                else produce(
                    settings,
                    rate=args.rate,
                    count=args.count,
                    duration=args.duration,
                    seed=args.seed,
                    quiet=args.quiet,
                    stop=stop,
                    shares=parse_shares(args.scenario_share),
                    large_legit_share=args.large_legit_share,
                    accounts=args.accounts,
                    labels=args.labels,
                    speedup=args.speedup,
                )
            )
        except (KafkaException, SystemError) as exc:
            # confluent-kafka raises a producer's fatal error (e.g. the authorizer refusing its idempotent
            # producer id) from poll/flush, and the delivery reports it serves next fail with SystemError.
            fatal = exc if isinstance(exc, KafkaException) else exc.__cause__
            if not isinstance(fatal, KafkaException):
                raise
            text = fatal.args[0].str() if isinstance(fatal.args[0], KafkaError) else str(fatal)
            raise KafkaUnavailable(
                explain_denial(settings, text, settings.transactions_topic) or f"the producer stopped: {text}"
            ) from None
    print(report.summary(), flush=True)
    if report.ok:
        return 0
    reasons = "; ".join(report.errors) or "no delivery report"
    refusal = explain_denial(settings, reasons, settings.transactions_topic)
    if refusal:  # one cause for every record: say it plainly
        print(f"fraudstream produce: error: {refusal}", file=sys.stderr)
        return 1
    print(
        f"fraudstream produce: error: {report.failed + report.labels_failed:,} records not delivered: {reasons}",
        file=sys.stderr,
    )
    return 1


def produce_handbook(args: argparse.Namespace, settings: Settings, stop: threading.Event):
    """Simulate the whole run first (a few seconds at the book's size), then send it in event-time order."""
    if args.scenario_share or args.accounts is not None:
        raise ConfigError(
            "--scenario-share and --accounts belong to the default profile; the handbook profile "
            "takes --customers, --terminals and --days"
        )
    started = time.monotonic()
    simulation = handbook.simulate(customers=args.customers, terminals=args.terminals, days=args.days, seed=args.seed)
    if not args.quiet:
        counts = simulation.scenario_counts()
        print(
            f"simulated {len(simulation):,} transactions over {args.days} days from {handbook.START:%Y-%m-%d} in "
            f"{time.monotonic() - started:.1f}s: {simulation.fraud_rate:.2%} fraud ("
            + ", ".join(f"{name} {n:,}" for name, n in counts.items() if name != "legit")
            + ")",
            flush=True,
        )
    delay = handbook.DEFAULT_LABEL_DELAY_DAYS if args.label_delay is None else args.label_delay
    return produce(
        settings,
        count=args.count,
        duration=args.duration,
        seed=args.seed,
        quiet=args.quiet,
        stop=stop,
        labels=args.labels,
        simulation=simulation,
        label_delay_days=delay if args.labels else 0.0,
        days_per_second=args.days_per_second,
    )


def parse_shares(items: list[str]) -> dict[str, float]:
    shares = {}
    for item in items:
        name, sep, fraction = item.partition("=")
        if not sep or name not in FRAUD_SCENARIOS:
            raise ConfigError(
                f"--scenario-share wants NAME=FRACTION with NAME one of {', '.join(FRAUD_SCENARIOS)}, not {item!r}"
            )
        try:
            shares[name] = float(fraction)
        except ValueError as exc:
            raise ConfigError(f"--scenario-share {item!r}: {fraction!r} is not a number") from exc
    return shares
