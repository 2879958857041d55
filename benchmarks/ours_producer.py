"""Our producer (fraudstream.producer.loop.produce) in a process of its own; prints its report for the harness.

python -m benchmarks.ours_producer --topic T [--count N | --duration S] [--rate R] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys

REPORT_PREFIX = "BENCH-REPORT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--schema-registry-url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--rate", type=float, default=0.0, help="transactions per second; 0: unthrottled")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    from fraudstream.settings import Settings
    from fraudstream.producer.loop import produce

    settings = Settings.from_env(
        bootstrap_servers=args.bootstrap_servers,
        schema_registry_url=args.schema_registry_url,
        transactions_topic=args.topic,
    )
    report = produce(
        settings, rate=args.rate or None, count=args.count, duration=args.duration, seed=args.seed, quiet=True
    )
    # elapsed_s: until every record is acknowledged (sending + final flush), as the peer reports it.
    print(
        REPORT_PREFIX
        + json.dumps(
            {
                "sent": report.sent,
                "delivered": report.delivered,
                "failed": report.failed,
                "sending_s": report.elapsed_s,
                "elapsed_s": report.elapsed_s + report.flush_s,
            }
        ),
        flush=True,
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
