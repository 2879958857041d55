"""`fraudstream detect`: run one detector process of the consumer group until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from pathlib import Path

from fraudstream.consumer.detector import run_until_signalled
from fraudstream.errors import ConfigError
from fraudstream.settings import DECODERS, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument(
        "--group-id",
        dest="group_id",
        help="consumer group; run more processes with the same id to scale out [FRAUDSTREAM_GROUP_ID]",
    )
    parser.add_argument(
        "--transactional-id",
        dest="transactional_id",
        help="unique per running detector and stable across its restarts "
        "[FRAUDSTREAM_TRANSACTIONAL_ID, default <group>-<hostname>]",
    )
    parser.add_argument(
        "--fraud-threshold-cents",
        dest="fraud_threshold_cents",
        type=int,
        help="large_amount rule: fraud above this many cents [default 90000 = $900.00]",
    )
    parser.add_argument(
        "--rules",
        dest="rules_file",
        type=Path,
        help="rules file (TOML) over the documented defaults [FRAUDSTREAM_RULES, default rules/default.toml]",
    )
    parser.add_argument(
        "--stateless",
        dest="stateful",
        action="store_const",
        const=False,
        help="only the seed's threshold rule: no per-card state, no changelog topics [FRAUDSTREAM_STATEFUL=0]",
    )
    parser.add_argument(
        "--model",
        dest="model_file",
        type=Path,
        help="score with a model made by `fraudstream train` (needs the stateful rules) [FRAUDSTREAM_MODEL]",
    )
    parser.add_argument(
        "--label-delay",
        dest="label_delay_days",
        type=float,
        metavar="DAYS",
        help="days after a transaction's event time before its label may be used "
        "[FRAUDSTREAM_LABEL_DELAY_DAYS, default 7]",
    )
    parser.add_argument(
        "--batch-max-records",
        dest="batch_max_records",
        type=int,
        help="records per transaction at most (reached while the input is backlogged)",
    )
    parser.add_argument(
        "--batch-max-ms",
        dest="batch_max_ms",
        type=int,
        help="wait this long for a first record; a batch closes as soon as the input runs dry",
    )
    parser.add_argument(
        "--decoder",
        dest="decoder",
        choices=DECODERS,
        help="columnar (Arrow batches, default) or record (fastavro per record) [FRAUDSTREAM_DECODER]",
    )
    parser.add_argument("--metrics-port", dest="metrics_port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--log-interval", type=float, default=10.0, help="seconds between progress lines (default 10)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.model_file is not None and not settings.stateful:
        raise ConfigError("--model needs the stateful detector (its features are per-card state): drop --stateless")
    if settings.model_file is not None:
        from fraudstream.consumer.model import Model

        Model.load(settings.model_file)  # a missing or foreign file fails now, before anything connects
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s detect %(message)s", force=True)
    logging.getLogger("fraudstream.librdkafka").setLevel(logging.WARNING)
    for name in ("httpx", "httpx2"):  # the registry client logs one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    # `kill -USR1 <pid>`: every thread's stack to the log, to see where a detector that went quiet is waiting.
    faulthandler.register(signal.SIGUSR1, file=sys.stdout, all_threads=True)
    run_until_signalled(settings, log_interval_s=args.log_interval)
    return 0
